"""ISTA on BatchNorm scales (Ye et al. 2018, arXiv 1802.00124): exact zeros, then exact removal.

This module owns

* :class:`ISTA` — the proximal step for your training loop: ``optimizer.step(); ista.step()`` applies
  ``γ ← sign(γ)·max(|γ| − μ·ρ·λ_l, 0)`` to every BatchNorm scale, where μ is γ's learning rate (the
  optimiser's plain gradient step z = γ − μ∇γ is the first half of ISTA). γ must get **no momentum and
  no weight decay**: :meth:`ISTA.param_groups` splits the parameters into optimiser groups that ensure it,
  and :meth:`ISTA.check_optimizer` refuses an optimiser that would apply either to γ;
* :func:`ista_penalties` — the per-layer weights λ_l from the traced graph, the memory cost of one
  channel over the input image area: ``(k_l²·c_{l−1} + Σ_consumers k²·c_out + H_l·W_l) / (I_w·I_h)``.
  Computed per channel group from its parameter slices (producer filters, consumer kernels — for a
  linear after a flatten, all H·W positions of the channel) and the BatchNorm output maps; every BN of a
  group (a residual stream) gets the group's cost;
* :func:`scale_bn` / :meth:`BNScaling.unscale` — the optional γ–W rescaling: γ **and β** of every BN times
  α, the consumers' input kernels times 1/α. Exact when every path from the BNs to the consumers is
  positively homogeneous (ReLU, leaky ReLU, max/avg pooling, dropout, reshapes, concatenation, sums of
  rescaled tensors); groups where it is not are skipped and listed (or ``strict=True`` raises).

Channels whose γ reached exactly 0 output the constant β (after the activation: φ(β)); removing them with
``fxprune.compile(model, x, importance="bn_scale", threshold=0.0)`` folds that constant into the consumers'
biases (:mod:`fxprune.passes.absorb`), so the pruned network computes the same function (exactly without
zero padding).

These helpers modify the model you train — that is their purpose; the compiler never does.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from ..errors import ConfigError
from ..ir import ChannelGroup, ParamSlice, member_units
from ..passes.group import analyze_graph
from ..prepare import prepare
from .slimming import bn_modules, check_penalty

__all__ = ["ISTA", "ista_penalties", "scale_bn", "BNScaling"]

log = logging.getLogger(__name__)


def _analyse(model: nn.Module, example_inputs: Any):
    gm, inputs = prepare(model, example_inputs)
    return gm, inputs, analyze_graph(gm, unknown="block")


def _slice_positions(ps: ParamSlice) -> tuple[np.ndarray, np.ndarray]:
    """(units, positions per unit as a (units, width) array) of a parameter slice."""
    units = member_units(ps)
    try:
        return units, ps.span.indices()
    except ValueError:  # ragged explicit map: pad by repeating (only used for counting/indexing sets)
        rows = [np.asarray(r, dtype=np.int64) for r in ps.span.table]  # type: ignore[union-attr]
        w = max(len(r) for r in rows)
        return units, np.stack([np.resize(r, w) for r in rows])


def ista_penalties(model: nn.Module, example_inputs: Any, modules: Iterable[str] | None = None) -> dict[str, float]:
    """λ_l of every affine BatchNorm: memory cost of one of its channels / input image area (see module doc)."""
    layers = dict(bn_modules(model, modules))
    gm, inputs, analysis = _analyse(model, example_inputs)
    x0 = inputs[0]
    area = float(np.prod(x0.shape[2:])) if x0.dim() > 2 else 1.0
    shapes: dict[str, tuple[int, ...]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and str(n.target) in layers:
            tm = n.meta.get("tensor_meta")
            if tm is not None and hasattr(tm, "shape"):
                shapes[str(n.target)] = tuple(tm.shape)
    out: dict[str, float] = {}
    for g in analysis.groups:
        bns = sorted({ps.param.rpartition(".")[0] for ps in g.params
                      if ps.role == "norm" and ps.param.endswith(".weight") and ps.param.rpartition(".")[0] in layers})
        if not bns:
            continue
        cost = 0.0
        for ps in g.params:
            owner, _, attr = ps.param.rpartition(".")
            if attr != "weight" or ps.role not in ("out", "in") or ps.is_buffer:
                continue
            t = gm.get_parameter(ps.param)
            per_pos = t.numel() / t.shape[ps.dim]
            cost += per_pos * ps.span.width
        for b in bns:
            shp = shapes.get(b)
            cost += float(np.prod(shp[2:])) if shp is not None and len(shp) > 2 else 1.0
        for b in bns:
            out[b] = cost / area
    missing = [b for b in layers if b not in out]
    for b in missing:  # a BN the analysis could not place (should not happen): neutral weight
        out[b] = 1.0
    return out


class ISTA:
    """Proximal (ISTA) step on BatchNorm scales for your training loop.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    >>> ista = ISTA(net, torch.randn(1, 1, 8, 8), rho=10.0, lr=0.1)
    >>> opt = torch.optim.SGD(ista.param_groups(momentum=0.9, weight_decay=1e-4), lr=0.1)
    >>> net(torch.randn(2, 1, 8, 8)).sum().backward(); opt.step(); zeros = ista.step()

    ``rho``: the sparsity strength ρ ≥ 0. ``lr``: γ's learning rate μ (read from ``optimizer`` each step
    instead when one is given, so LR schedules apply). ``penalties``: ``"memory"`` (λ_l from the graph;
    needs ``example_inputs``), ``"uniform"`` (λ_l = 1) or a mapping BN name → λ_l.
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None, *, rho: float, lr: float | None = None,
                 penalties: str | Mapping[str, float] = "memory", modules: Iterable[str] | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        self.rho = check_penalty(rho, "rho")
        if optimizer is None and lr is None:
            raise ConfigError("ISTA needs lr= (γ's learning rate) or optimizer=")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                               or lr <= 0):
            raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
        self.lr = None if lr is None else float(lr)
        self.model = model
        self.layers = bn_modules(model, modules)
        names = [n for n, _ in self.layers]
        if isinstance(penalties, str):
            if penalties == "uniform":
                self.penalties = {n: 1.0 for n in names}
            elif penalties == "memory":
                if example_inputs is None:
                    raise ConfigError("penalties='memory' needs example_inputs (the graph gives the channel costs); "
                                      "pass them or use penalties='uniform'")
                pen = ista_penalties(model, example_inputs, names)
                self.penalties = {n: pen[n] for n in names}
            else:
                raise ConfigError(f"penalties must be 'memory', 'uniform' or a mapping, got {penalties!r}")
        elif isinstance(penalties, Mapping):
            bad = [n for n in names if n not in penalties]
            if bad:
                raise ConfigError(f"penalties: no weight for BatchNorm layer(s) {', '.join(bad[:5])}")
            self.penalties = {n: check_penalty(penalties[n], f"penalties[{n!r}]") for n in names}
        else:
            raise ConfigError(f"penalties must be 'memory', 'uniform' or a mapping, got {type(penalties).__name__}")
        self.optimizer = optimizer
        if optimizer is not None:
            self.check_optimizer(optimizer)

    # -- parameters and optimiser --------------------------------------------------------------------------
    def gamma_parameters(self) -> list[nn.Parameter]:
        return [m.weight for _, m in self.layers]

    def split_parameters(self, params: Iterable[nn.Parameter] | nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(other parameters, γ parameters) of ``params`` (a module or an iterable)."""
        ps = list(params.parameters() if isinstance(params, nn.Module) else params)
        gid = {id(g) for g in self.gamma_parameters()}
        return [p for p in ps if id(p) not in gid], [p for p in ps if id(p) in gid]

    def param_groups(self, params: Iterable[nn.Parameter] | nn.Module | None = None, **options: Any) -> list[dict]:
        """Optimiser groups: everything else with ``options``; γ with lr μ, no momentum, no weight decay.

        Meant for ``torch.optim.SGD``; for another optimiser (Adam keeps moments on γ) use a separate
        ``torch.optim.SGD(ista.gamma_parameters(), lr=...)``.
        """
        others, _ = self.split_parameters(self.model if params is None else params)
        lr = self.lr if self.lr is not None else options.get("lr")
        gamma_group: dict[str, Any] = {"params": self.gamma_parameters(), "momentum": 0.0, "weight_decay": 0.0}
        if lr is not None:
            gamma_group["lr"] = lr
        return [{"params": others, **options}, gamma_group]

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """:class:`ConfigError` when γ would get momentum, weight decay or adaptive moments."""
        gid = {id(g) for g in self.gamma_parameters()}
        found = set()
        for group in optimizer.param_groups:
            mine = [p for p in group["params"] if id(p) in gid]
            if not mine:
                continue
            found |= {id(p) for p in mine}
            bad = []
            if group.get("momentum", 0) not in (0, 0.0):
                bad.append(f"momentum={group['momentum']}")
            if group.get("weight_decay", 0) not in (0, 0.0):
                bad.append(f"weight_decay={group['weight_decay']}")
            if "betas" in group:
                bad.append(f"{type(optimizer).__name__} moments")
            if bad:
                raise ConfigError("ISTA: the BatchNorm scales must get a plain gradient step (no momentum, no weight "
                                  f"decay, no adaptive moments), but their optimiser group has {', '.join(bad)}; use "
                                  "ista.param_groups(...) or a separate SGD for ista.gamma_parameters()")
        if found != gid:
            raise ConfigError("ISTA: the optimiser does not update every BatchNorm scale; include "
                              "ista.gamma_parameters() (see ista.param_groups)")

    def _lr(self, lr: float | None) -> float:
        if lr is not None:
            return float(lr)
        if self.optimizer is not None:
            gid = {id(g) for g in self.gamma_parameters()}
            for group in self.optimizer.param_groups:
                if any(id(p) in gid for p in group["params"]):
                    return float(group["lr"])
        assert self.lr is not None  # checked in __init__
        return self.lr

    # -- the step ----------------------------------------------------------------------------------------
    def step(self, lr: float | None = None) -> int:
        """Soft-threshold every γ by μ·ρ·λ_l (after the optimiser's step); returns the number of zero γ."""
        mu = self._lr(lr)
        zeros = 0
        with torch.no_grad():
            for name, m in self.layers:
                g = m.weight
                t = mu * self.rho * self.penalties[name]
                g.copy_(torch.sign(g) * torch.clamp(g.abs() - t, min=0.0))
                zeros += int((g == 0).sum())
        return zeros

    def zeros(self) -> dict[str, int]:
        return {n: int((m.weight == 0).sum()) for n, m in self.layers}

    def sparsity(self) -> float:
        total = sum(m.weight.numel() for _, m in self.layers)
        return sum(self.zeros().values()) / max(total, 1)


# -- γ–W rescaling --------------------------------------------------------------------------------------------
_HOMOGENEOUS_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten,
)
_HOMOGENEOUS_FUNCTIONS = {
    F.relu, torch.relu, F.leaky_relu, F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.mean, torch.sum, torch.amax,
    operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "mean", "sum", "amax", "add", "add_", "sub", "sub_"}
_SCALAR_SCALE = {operator.mul, operator.truediv, torch.mul}
_SCALAR_METHODS = {"mul", "div", "__mul__", "__truediv__"}


class _Homogeneity:
    """``scaled(node)``: the group's channels at ``node`` are exactly α times their old value."""

    def __init__(self, gm: fx.GraphModule, group: ChannelGroup, bns: set[str], rules) -> None:
        self.gm, self.bns, self.rules = gm, bns, rules
        self.carrying = {ref.node for ref in group.channels}
        self.memo: dict[str, bool] = {}

    def scaled(self, node: Any) -> bool:
        if not isinstance(node, fx.Node):
            return False
        if node.name not in self.memo:
            self.memo[node.name] = False
            self.memo[node.name] = self._scaled(node)
        return self.memo[node.name]

    def _carrying_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [x for x in node.all_input_nodes if x.name in self.carrying]

    def _scaled(self, node: fx.Node) -> bool:
        if node.op == "call_module" and str(node.target) in self.bns:
            return True
        ins = self._carrying_inputs(node)
        if not ins:
            return False
        if node.op == "call_module":
            ok = isinstance(self.gm.get_submodule(str(node.target)), _HOMOGENEOUS_MODULES)
        elif node.op == "call_function":
            if node.target in _SCALAR_SCALE:  # x * c, x / c with a python number c
                tensors = node.all_input_nodes
                return len(tensors) == 1 and self.scaled(tensors[0]) and (
                    node.target is not operator.truediv or node.args[0] is tensors[0])
            rule = self.rules.lookup(self.gm, node)
            ok = node.target in _HOMOGENEOUS_FUNCTIONS or (rule is not None and rule.locality(node) == "positional")
            if node.target in (operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub):
                return len(ins) == len(node.all_input_nodes) and all(self.scaled(x) for x in ins)
        elif node.op == "call_method":
            if node.target in _SCALAR_METHODS:
                tensors = node.all_input_nodes
                return len(tensors) == 1 and self.scaled(tensors[0])
            rule = self.rules.lookup(self.gm, node)
            ok = node.target in _HOMOGENEOUS_METHODS or (rule is not None and rule.locality(node) == "positional")
            if node.target in ("add", "add_", "sub", "sub_"):
                return len(ins) == len(node.all_input_nodes) and all(self.scaled(x) for x in ins)
        else:
            return False
        return ok and all(self.scaled(x) for x in ins)


@dataclass
class BNScaling:
    """A γ–W rescaling applied by :func:`scale_bn`; :meth:`unscale` undoes it exactly (for any γ)."""

    model: nn.Module
    alpha: float
    norm_slices: list[tuple[str, int, np.ndarray]]  # (param name, dim, positions) of γ and β
    consumer_slices: list[tuple[str, ParamSlice]]
    scaled_layers: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)  # BN name -> why it was not rescaled
    active: bool = True

    def _apply(self, a: float) -> None:
        with torch.no_grad():
            for name, dim, pos in self.norm_slices:
                t = self.model.get_parameter(name)
                idx = torch.as_tensor(pos, dtype=torch.long)
                t.index_copy_(dim, idx, t.index_select(dim, idx) * a)
            for name, ps in self.consumer_slices:
                t = self.model.get_parameter(name)
                _scale_in_slice(t, ps, 1.0 / a)

    def unscale(self) -> None:
        """Undo the rescaling (γ, β / α; consumer kernels × α)."""
        if not self.active:
            raise ConfigError("this rescaling was already undone")
        self._apply(1.0 / self.alpha)
        self.active = False


def _scale_in_slice(t: torch.Tensor, ps: ParamSlice, factor: float) -> None:
    _, pos = _slice_positions(ps)
    pos = np.unique(pos.reshape(-1))
    if ps.groups > 1:
        og, cg = t.shape[0] // ps.groups, t.shape[1]
        for c in pos:
            q, j = divmod(int(c), cg)
            t[q * og : (q + 1) * og, j] *= factor
    else:
        idx = torch.as_tensor(pos, dtype=torch.long)
        t.index_copy_(ps.dim, idx, t.index_select(ps.dim, idx) * factor)


def scale_bn(model: nn.Module, alpha: float, example_inputs: Any, modules: Iterable[str] | None = None,
             strict: bool = False) -> BNScaling:
    """Rescale γ and β of the BatchNorms by α and their consumers' input kernels by 1/α, in place.

    The function computed by ``model`` does not change (checked structurally: every path from the BNs to
    the consumers must be positively homogeneous; a group where it is not is skipped and listed in
    ``.skipped``, or raises :class:`ConfigError` with ``strict=True``). Returns the handle whose
    :meth:`~BNScaling.unscale` undoes it.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"alpha must be a finite number > 0, got {alpha!r}")
    layers = dict(bn_modules(model, modules))
    gm, _, analysis = _analyse(model, example_inputs)
    calls: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    norm_slices: list[tuple[str, int, np.ndarray]] = []
    consumer_slices: list[tuple[str, ParamSlice]] = []
    scaled: list[str] = []
    skipped: dict[str, str] = {}
    for g in analysis.groups:
        bns = {ps.param.rpartition(".")[0] for ps in g.params if ps.role == "norm" and ps.param.endswith(".weight")
               and ps.param.rpartition(".")[0] in layers}
        if not bns:
            continue
        why = _check_group(gm, g, bns, calls, analysis.rules)
        if why:
            for b in bns:
                skipped[b] = why
            continue
        for ps in g.params:
            owner = ps.param.rpartition(".")[0]
            if ps.role == "norm" and owner in bns and ps.param.endswith((".weight", ".bias")):
                _, pos = _slice_positions(ps)
                norm_slices.append((ps.param, ps.dim, np.unique(pos.reshape(-1))))
            elif ps.role == "in":
                consumer_slices.append((ps.param, ps))
        scaled.extend(sorted(bns))
    if skipped and strict:
        first = next(iter(skipped.items()))
        raise ConfigError(f"scale_bn: cannot rescale {first[0]} exactly: {first[1]}")
    for b, why in skipped.items():
        log.warning("scale_bn: %s not rescaled: %s", b, why)
    sc = BNScaling(model, float(alpha), norm_slices, consumer_slices, tuple(scaled), skipped)
    sc._apply(float(alpha))
    return sc


def _check_group(gm: fx.GraphModule, g: ChannelGroup, bns: set[str], calls: Mapping[str, list[fx.Node]],
                 rules) -> str:
    """'' when rescaling the group's BNs by α and its consumers by 1/α is exact, else the reason."""
    for ps in g.params:
        owner = ps.param.rpartition(".")[0]
        if ps.role == "norm" and owner not in bns:
            return f"{ps.param} is a normalisation parameter that is not a rescaled BatchNorm"
        if ps.role == "other":
            return f"{ps.param} follows the channels in an unsupported way"
    hom = _Homogeneity(gm, g, bns, rules)
    consumers = {}
    for ps in g.params:
        if ps.role != "in":
            continue
        owner, _, attr = ps.param.rpartition(".")
        mod = gm.get_submodule(owner)
        if attr != "weight" or not (isinstance(mod, nn.Linear) or (isinstance(mod, _ConvNd)
                                                                     and not isinstance(mod, _ConvTransposeNd))):
            return f"consumer {ps.param} ({type(mod).__name__}) is not a conv/linear weight"
        for c in calls.get(owner, ()):
            if not hom.scaled(c.args[0]):
                return f"the input of {owner} is not a positively homogeneous function of the BatchNorm outputs"
            consumers[c.name] = c
    # every rescaled value must end in a consumer: no leak into a non-homogeneous op or the network output
    frontier = [c for b in bns for c in calls.get(b, ())]
    seen: set[str] = set()
    while frontier:
        node = frontier.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        for u in node.users:
            if u.name in consumers:
                continue
            if u.op == "output" or not hom.scaled(u):
                return f"the rescaled output of {node.name} reaches {u.name}, which is not positively homogeneous"
            frontier.append(u)
    return ""
