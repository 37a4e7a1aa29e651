"""Element-wise ops: activations, dropout, identity-like methods, broadcasting binary/ternary ops.

Families register in one line each. A broadcasting op ties every output dim to the same-sized dim of each
input (aligned from the right); a size-1 input dim is a broadcast and carries no channel. Size/shape
arithmetic (``x.size(1) * 2``) produces no tensor and needs no tie.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import nn

from .base import RULES, Rule, RuleContext
from .examples import ex_binary, ex_unary_fn, ex_unary_module, ex_prelu

__all__ = ["Unary", "Broadcast", "PReLURule"]


class Unary(Rule):
    """Output has the input's shape, position by position (activations, dropout, casts, clones)."""

    name = "unary"

    def __init__(self, name: str = "unary", example=None) -> None:
        self.name = name
        self.example = example

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        if not rc.is_tensor(x):
            x = next(iter(rc.tensor_args()), None)
        if x is None or rc.out_shape() is None:
            return
        if rc.shape(x) != rc.out_shape():
            raise ValueError(f"{self.name}: output shape differs from input shape at {node.name}")
        rc.tie_same_shape(x)
        for other in rc.tensor_args():  # e.g. type_as(other): reads only dtype
            if other is not x:
                for a in rc.all_dims(other):
                    rc.free(a)


class Broadcast(Rule):
    """Broadcasting element-wise op over all tensor arguments (add, mul, where, masked_fill...)."""

    def __init__(self, name: str = "broadcast", example=None) -> None:
        self.name = name
        self.example = example

    def analyze(self, node, rc: RuleContext) -> None:
        if rc.out_shape() is None:  # size arithmetic on ints
            return
        rc.tie_broadcast(rc.tensor_args())


class PReLURule(Rule):
    name = "prelu"
    example = staticmethod(ex_prelu)

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        rc.tie_same_shape(x)
        m = rc.module
        if m.num_parameters > 1:
            rc.tie(rc.out(1 if len(rc.out_shape()) > 1 else 0), rc.param(f"{rc.module_name}.weight", 0, "norm"))
        else:
            rc.free(rc.param(f"{rc.module_name}.weight", 0, "norm"))

    def fix_attributes(self, module) -> None:
        module.num_parameters = module.weight.shape[0]


_SPECIAL_ACTIVATIONS = {"MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "Softmax2d", "GLU", "PReLU"}


def _activation_modules() -> list[type]:
    out = []
    for _, cls in inspect.getmembers(nn.modules.activation, inspect.isclass):
        if issubclass(cls, nn.Module) and cls.__module__ == nn.modules.activation.__name__:
            if cls.__name__ not in _SPECIAL_ACTIVATIONS:
                out.append(cls)
    return out


UNARY_MODULES = _activation_modules() + [
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
]
try:  # torchvision's stochastic depth is mode-dependent: keep it a leaf so train() still works
    from torchvision.ops import StochasticDepth

    UNARY_MODULES.append(StochasticDepth)
except ImportError:  # pragma: no cover - torchvision is a dependency, but stay importable without it
    pass

_UNARY_NAMES = [
    "relu", "relu_", "relu6", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "elu", "selu", "celu", "leaky_relu", "softplus", "softsign", "hardtanh", "logsigmoid",
    "tanhshrink", "softshrink", "hardshrink", "threshold", "rrelu", "exp", "log", "log1p", "expm1", "abs",
    "neg", "sqrt", "rsqrt", "square", "sin", "cos", "erf", "reciprocal", "sign", "floor", "ceil", "round",
    "clamp", "clamp_", "clip", "clamp_min", "clamp_max", "nan_to_num", "dropout", "alpha_dropout",
    "dropout1d", "dropout2d", "dropout3d", "feature_alpha_dropout", "silu_", "hardswish_", "gelu_",
]
UNARY_FUNCTIONS = [operator.neg, operator.pos, operator.abs]
for _name in _UNARY_NAMES:
    for _ns in (torch, F, torch.special):
        _fn = getattr(_ns, _name, None)
        if callable(_fn) and _fn not in UNARY_FUNCTIONS:
            UNARY_FUNCTIONS.append(_fn)

UNARY_METHODS = [n for n in _UNARY_NAMES if hasattr(torch.Tensor, n)] + [
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type", "type_as",
    "requires_grad_", "cpu", "cuda", "pow_", "relu_", "sigmoid_", "zero_",
]

_BINARY = ["add", "sub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow", "maximum",
           "minimum", "atan2", "where", "masked_fill", "lerp", "addcmul", "addcdiv", "eq", "ne", "lt", "le",
           "gt", "ge", "logical_and", "logical_or", "bitwise_and", "bitwise_or", "hypot", "copysign", "rsub"]
BINARY_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.mod, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.and_,
    operator.or_, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
] + [getattr(torch, n) for n in _BINARY if hasattr(torch, n)]
BINARY_METHODS = _BINARY + [n + "_" for n in _BINARY if hasattr(torch.Tensor, n + "_")] + [
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "expand_as_tensor_op",
]

unary = Unary("unary", example=ex_unary_fn)
RULES.register_module(UNARY_MODULES, Unary("unary-module", example=ex_unary_module))
RULES.register_function(UNARY_FUNCTIONS, unary)
RULES.register_method(UNARY_METHODS, unary)
broadcast = Broadcast("broadcast", example=ex_binary)
RULES.register_function(BINARY_FUNCTIONS, broadcast)
RULES.register_method(BINARY_METHODS, broadcast)
RULES.register_module(nn.PReLU, PReLURule())
