"""Element-wise ops: activations, dropout, casts and copies, broadcasting binary/ternary ops.

Each op is named once, in :data:`UNARY` or :data:`BROADCAST`; one registration binds the name in every
namespace where it exists (``torch``, ``torch.nn.functional``, ``torch.special``, ``Tensor`` methods and the
ATen overloads of the export front end). A unary op's output has its input's shape, position by position;
a broadcasting op ties every output dim to the same-sized dim of each input (aligned from the right), and a
size-1 input dim is a broadcast that carries no channel. Size arithmetic on ints (``x.size(1) * 2``)
produces no tensor and needs no tie.

:data:`SAME_DTYPE_FUNCTIONS` (floating arithmetic and activations: output = input shape and dtype when every
tensor operand has one shape) is what shape propagation may skip the kernel for.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .base import RULES, Rule, RuleContext, RuleTable
from .calls import aten_overloads

__all__ = ["Unary", "Broadcast", "PReLURule", "UNARY", "BROADCAST", "SAME_DTYPE_FUNCTIONS", "SAME_DTYPE_METHODS", "register_names",
           "unary", "broadcast"]

#: position-wise ops with one tensor operand (activations, casts, copies, dropout, fills of the same shape)
UNARY = (
    "relu", "relu6", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "sigmoid", "tanh", "elu", "selu",
    "celu", "leaky_relu", "softplus", "softsign", "softshrink", "hardshrink", "hardtanh", "logsigmoid",
    "log_sigmoid", "tanhshrink", "rrelu", "exp", "exp2", "log", "log2", "log10", "log1p", "expm1", "abs", "neg",
    "positive", "sqrt", "rsqrt", "square", "sin", "cos", "tan", "atan", "sinh", "cosh", "asinh", "acosh", "atanh",
    "erf", "erfinv", "reciprocal", "sign", "floor", "ceil", "round", "trunc", "frac", "clamp_min", "clamp_max",
    "nan_to_num", "logit", "isnan", "isinf", "bitwise_not", "logical_not", "dropout", "alpha_dropout",
    "feature_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "clone", "contiguous",
    "alias", "detach", "_to_copy", "to", "lift_fresh", "lift_fresh_copy", "float", "double", "half", "bfloat16",
    "type", "type_as", "requires_grad_", "cpu", "cuda", "zeros_like", "ones_like", "empty_like", "full_like",
    "rand_like", "randn_like", "randint_like", "fill", "zero",
)
#: broadcasting ops over every tensor operand (arithmetic, comparisons, selects with tensor operands)
BROADCAST = (
    "add", "sub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow", "rsub", "maximum",
    "minimum", "fmax", "fmin", "atan2", "hypot", "copysign", "xlogy", "where", "masked_fill", "lerp", "addcmul",
    "addcdiv", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor", "bitwise_and",
    "bitwise_or", "bitwise_xor", "clamp", "clip", "threshold", "copy", "sigmoid_backward",
)
_UNARY_OPERATORS = (operator.neg, operator.pos, operator.abs, operator.invert)
_BINARY_OPERATORS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
                     operator.mod, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.and_,
                     operator.or_, operator.xor, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                     operator.ge)
_DUNDER = ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
           "__pow__", "__rpow__", "__and__", "__or__", "__xor__", "__invert__", "__neg__")
_FLOAT_SAME = ("relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "add", "sub",
               "mul", "div")


class Unary(Rule):
    """Output has the input's shape, position by position (activations, dropout, casts, clones)."""

    name = "unary"
    positionwise = True
    local = "channel_local"

    def __init__(self, name: str = "unary") -> None:
        self.name = name

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

    positionwise = True
    local = "channel_local"

    def __init__(self, name: str = "broadcast") -> None:
        self.name = name

    def analyze(self, node, rc: RuleContext) -> None:
        if rc.out_shape() is None:  # size arithmetic on ints
            return
        rc.tie_broadcast(rc.tensor_args())


class PReLURule(Rule):
    """``nn.PReLU``: one learned slope per channel (or one for all)."""

    name = "prelu"
    local = "channel_local"

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

    def macs(self, node, gm) -> int | None:
        return 0  # element-wise: free under the MACs conventions


def _spellings(names: Iterable[str]) -> tuple[list[Any], list[str]]:
    """(functions, Tensor method names) that spell ``names``: torch / F / torch.special functions, the
    in-place ``name_`` variants and the ATen overloads."""
    fns: list[Any] = []
    methods: list[str] = []
    for name in names:
        for ns in (torch, F, torch.special):
            fn = getattr(ns, name, None)
            if callable(fn) and not isinstance(fn, type) and fn not in fns:
                fns.append(fn)
        for m in (name, name + "_"):
            if hasattr(torch.Tensor, m):
                methods.append(m)
        fns += aten_overloads(name, name + "_")
    return fns, methods


def register_names(table: RuleTable, names: Iterable[str], rule: Rule) -> None:
    """Bind ``rule`` to every spelling of every op in ``names``."""
    fns, methods = _spellings(names)
    table.register_function(fns, rule)
    table.register_method(methods, rule)


def _activation_modules() -> list[type]:
    special = {"MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "Softmax2d", "GLU", "PReLU"}
    out = []
    for _, cls in inspect.getmembers(nn.modules.activation, inspect.isclass):
        if issubclass(cls, nn.Module) and cls.__module__ == nn.modules.activation.__name__ \
                and cls.__name__ not in special:
            out.append(cls)
    return out


UNARY_MODULES: list[type] = _activation_modules() + [nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                                                      nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout]
try:  # torchvision's stochastic depth is mode-dependent: keep it a leaf so train() still works
    from torchvision.ops import StochasticDepth

    UNARY_MODULES.append(StochasticDepth)
except ImportError:  # pragma: no cover - torchvision is a dependency, but stay importable without it
    pass

unary = Unary("unary")
broadcast = Broadcast("broadcast")
RULES.register_module(UNARY_MODULES, Unary("unary-module"))
register_names(RULES, UNARY, unary)
RULES.register_function(_UNARY_OPERATORS, unary)
register_names(RULES, BROADCAST, broadcast)
RULES.register_function(_BINARY_OPERATORS, broadcast)
RULES.register_method(_DUNDER, broadcast)
RULES.register_module(nn.PReLU, PReLURule())

#: functions whose output has the shape and dtype of their (same-shaped, floating) tensor operands
SAME_DTYPE_FUNCTIONS: frozenset[Any] = frozenset(
    [operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul]
    + [f for name in _FLOAT_SAME for f in (getattr(torch, name, None), getattr(F, name, None)) if callable(f)]
)
#: Tensor methods that are those functions (``x.mul(y)`` is ``torch.mul(x, y)``)
SAME_DTYPE_METHODS: frozenset[str] = frozenset(
    n for n in _FLOAT_SAME if hasattr(torch.Tensor, n) and getattr(torch, n, None) in SAME_DTYPE_FUNCTIONS)
