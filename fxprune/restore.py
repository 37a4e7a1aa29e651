"""The result a user keeps: their own model class, smaller, verified against the graph result.

When the pruning changes only leaf modules (``nn.Linear``, ``nn.Conv*``, ``nn.Embedding``, norms, Hugging
Face's ``Conv1D``…) and attributes the rules understand (head counts, inner widths), :func:`rebuild` makes a
copy of the user's model — its class, its ``forward``, its methods (``generate()``), its config — with:

1. every parameter and buffer replaced by the graph result's tensor of the same name (shared, not copied:
   the two forms are views of one set of weights; absorbed constants and refits included, tied weights
   stay tied);
2. every module whose tensors changed made consistent by its op family (:meth:`Rule.fix_module`: in/out
   channels, groups, ``normalized_shape``…) or, for a module without a rule, by renaming its integer
   attributes that were the old size of a changed dim;
3. head counts and widths of the modules above them updated where an attribute's name says what it is
   (``num_heads``, ``num_key_value_heads``, ``all_head_size``, ``inner_dim``, ``split_size``…) and its value
   is the old count;
4. the model's ``config`` updated the same way when every layer was pruned alike (so ``save_pretrained`` /
   ``from_pretrained`` round-trip), with ``head_dim`` kept explicit.

It is then **verified**: on the example inputs and on a second batch (and sequence) size, its outputs must
equal the graph result's. A forward that hard-codes a size the graph had to patch fails this check, and the
graph result is returned instead, with the reason in the report (``result="auto"``, the default).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .clone import copy_module, set_training
from .errors import summary
from .export import tensors_only
from .passes.verify import compare_outputs
from .rules import RULES, RuleTable
from .meta import shape_of
from .rules.axes import submodule
from .rules.base import RewriteContext
from .literals import update_literal_attributes
from .trace import eval_mode

__all__ = ["rebuild", "verify_rebuilt", "same_program", "second_inputs", "Rebuilt"]

#: attribute names by what they count (matched on the whole name, case-insensitive)
_HEADS = re.compile(r"^(num_|n_)?(attention_|attn_)?heads?$|^num_(key_value|kv)_heads$|^n_kv_heads?$")
_INNER = re.compile(r"^(all_head_size|inner_dim|inner_size|split_size|attention_dim|qkv_dim)$")
_FFN = re.compile(r"^(intermediate_size|d_ff|ffn_dim|n_inner|ffn_hidden_size|mlp_dim)$")
_HIDDEN = re.compile(r"^(hidden_size|d_model|n_embd|embed_dim|model_dim|hidden_dim|emb_dim)$")
_FX_CONSTANT = re.compile(r"_tensor_constant\d+")  # torch.fx's name for a tensor its trace computed
_SKIP = {"training", "layer_idx", "layer_id", "vocab_size", "num_layers", "num_hidden_layers", "n_layer"}


@dataclass
class Rebuilt:
    """A rebuilt model and what was changed on it (for the report)."""

    module: nn.Module
    attributes: list[str]
    config: list[str]
    #: '' when ``config`` describes the pruned model (save_pretrained/from_pretrained round-trip), else why not
    config_mismatch: str
    #: True when every changed module is the graph result's own module and nothing else was changed (no
    #: attribute, no config): the copy's forward then traces to the captured program with those swapped in
    swaps_only: bool = False


def _walk(m: nn.Module) -> list[tuple[str, nn.Module]]:
    """``m.named_modules(remove_duplicate=False)``: every path, a module shared by several listed under each."""
    return list(m.named_modules(remove_duplicate=False))


def _first_paths(walk: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``named_modules()`` (each module once, at its first path) from a :func:`_walk`."""
    seen: set[int] = set()
    out = []
    for name, mod in walk:
        if id(mod) not in seen:
            seen.add(id(mod))
            out.append((name, mod))
    return out


def _named_tensors(walk: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, mod in walk:
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                if t is not None:
                    out.setdefault(f"{name}.{k}" if name else k, t)
    return out


def _changed_modules(modules: list[tuple[str, nn.Module]], changed: frozenset[str]) -> list[str]:
    """Paths of the modules whose own parameters or buffers lose positions (``changed``: their names,
    :meth:`Analysis.changed_tensors`)."""
    out = []
    for name, mod in modules:
        for store in (mod._parameters, mod._buffers):
            if any(t is not None and (f"{name}.{k}" if name else k) in changed for k, t in store.items()):
                out.append(name)
                break
    return out


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def _fix_plain_attributes(new: nn.Module, old: nn.Module) -> list[str]:
    """A module without a rule: integer attributes that were the old size of a changed tensor dim (Hugging
    Face's ``Conv1D.nf``) take the new size, where that is unambiguous: a size that is also the size of an
    unchanged dim (``Conv1D(64, 64)`` pruned on one side) or that became two different sizes is left alone
    (the verification that follows decides whether the copy is right)."""
    sizes: dict[int, set[int]] = {}
    for store_old, store_new in ((old._parameters, new._parameters), (old._buffers, new._buffers)):
        for k, t in store_old.items():
            n = store_new.get(k)
            if t is None or n is None:
                continue
            for a, b in zip(t.shape, n.shape, strict=True):
                sizes.setdefault(int(a), set()).add(int(b))
    changed = []
    for k, v in vars(old).items():
        if k.startswith("_") or k in _SKIP or isinstance(v, bool) or not isinstance(v, int):
            continue
        if v in sizes and len(sizes[v]) == 1 and v not in sizes[v]:
            setattr(new, k, next(iter(sizes[v])))
            changed.append(k)
    return changed


def _counts(old: nn.Module, new: nn.Module, head_dim: int | None, paths: Sequence[str]) -> dict[str, dict[int, int]]:
    """Old -> new head counts and widths below a module: inner and FFN widths and head counts from its 2-D
    weights, the hidden size from its embedding tables (the model width every layer reads and writes).
    ``paths``: the modules below ``old`` whose 2-D weight changed shape (:func:`_reshaped`)."""
    out: dict[str, dict[int, int]] = {"inner": {}, "heads": {}, "ffn": {}, "hidden": {}}
    for path in paths:
        m, n = submodule(old, path), submodule(new, path)
        w, nw = m.weight, n.weight
        if isinstance(m, nn.Embedding):
            if w.shape[1] != nw.shape[1]:
                out["hidden"].setdefault(int(w.shape[1]), int(nw.shape[1]))
            continue
        for a, b in zip(w.shape, nw.shape, strict=True):
            if a != b:
                out["inner"].setdefault(int(a), int(b))
                out["ffn"].setdefault(int(a), int(b))
                if head_dim and a % head_dim == 0 and b % head_dim == 0:
                    out["heads"].setdefault(a // head_dim, b // head_dim)
    return out


def _kind(name: str, hidden: bool = True) -> str | None:
    """What an integer attribute or config entry counts, by its name."""
    k = name.lower()
    if _HEADS.match(k):
        return "heads"
    if _INNER.match(k):
        return "inner"
    if _FFN.match(k):
        return "ffn"
    return "hidden" if hidden and _HIDDEN.match(k) else None


def _head_dim(m: nn.Module) -> int | None:
    for k in ("head_dim", "attention_head_size", "head_size", "d_kv", "key_value_proj_dim", "dim_head"):
        v = getattr(m, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _weight(m: nn.Module) -> Any:
    """``getattr(m, "weight", None)`` without the failed-lookup exception of modules that have none."""
    for store in (m._parameters, m._buffers, m.__dict__):
        if "weight" in store:
            return store["weight"]
    return getattr(m, "weight", None) if hasattr(type(m), "weight") else None  # a property (parametrize)


def _reshaped(old: list[tuple[str, nn.Module]], new: nn.Module) -> list[str]:
    """Paths of the modules (``old``: a :func:`_walk` of the model) whose 2-D ``weight`` has another shape in
    ``new`` (tied aliases included)."""
    new_mods = dict(new.named_modules(remove_duplicate=False))
    out = []
    for name, m in old:
        w, n = _weight(m), new_mods.get(name)
        nw = _weight(n) if n is not None else None
        if isinstance(w, torch.Tensor) and isinstance(nw, torch.Tensor) and w.dim() == 2 and w.shape != nw.shape:
            out.append(name)
    return out


def _update_counts(new: nn.Module, old: list[tuple[str, nn.Module]], changed: list[str],
                   reshaped: list[str]) -> list[str]:
    """Head counts and inner/FFN widths of every module above a changed leaf (see the module docstring;
    ``old``: the model's modules, each once)."""
    done: list[str] = []
    leaf = set(changed)
    above = {c[:i] for c in changed for i, ch in enumerate(c) if ch == "."} | {""}  # ancestors of a changed leaf
    for name, m in old:
        if name in leaf or name not in above:
            continue
        counted: list[str] = [k for k, v in vars(m).items() if not k.startswith("_") and k not in _SKIP
                              and isinstance(v, int) and not isinstance(v, bool) and _kind(k) is not None]
        if not counted:  # no attribute that counts heads or widths: nothing to update here
            continue
        below = [c[len(name) + 1:] if name else c for c in reshaped if not name or c.startswith(name + ".")]
        target = submodule(new, name)
        counts = _counts(m, target, _head_dim(m), below)
        for k in counted:
            v = vars(m)[k]
            kind = _kind(k)
            if v not in counts[kind]:
                continue
            setattr(target, k, counts[kind][v])
            done.append(f"{name + '.' if name else ''}{k}: {v} -> {counts[kind][v]}")
    return done


def _update_config(new: nn.Module, old: nn.Module, reshaped: list[str]) -> tuple[list[str], str]:
    """The model's ``config`` (Hugging Face style): the head counts and widths the pruning changed.

    Returns the updates and '' when the updated config describes the pruned model (a fresh instance of the
    class built from it, on the meta device, has exactly the pruned model's tensor shapes: then
    ``save_pretrained``/``from_pretrained`` round-trip), else why it does not."""
    cfg = getattr(old, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return [], ""
    head_dim = getattr(cfg, "head_dim", None) or (
        cfg.hidden_size // cfg.num_attention_heads if getattr(cfg, "hidden_size", None) and getattr(
            cfg, "num_attention_heads", None) else None)
    counts = _counts(old, new, head_dim, reshaped)
    updates: dict[str, Any] = {}
    for k, v in cfg.to_dict().items():
        if isinstance(v, bool) or not isinstance(v, int) or k in _SKIP:
            continue
        kind = _kind(k)
        if kind == "inner" or kind is None or v not in counts[kind]:
            continue
        updates[k] = counts[kind][v]
    if not updates:
        return [], ""
    new_cfg = getattr(new, "config", None)  # the copy's own config (deep-copied with it, shared by its modules)
    if new_cfg is None or new_cfg is cfg:
        return [], "the model's config could not be copied"
    if head_dim and any(_HEADS.match(k.lower()) for k in updates):
        new_cfg.head_dim = head_dim  # a head's width stays: keep it explicit once the count changes
    for k, v in updates.items():
        setattr(new_cfg, k, v)
    return [f"config.{k}: {getattr(cfg, k)} -> {v}" for k, v in updates.items()], _describes(new, new_cfg)


def _describes(model: nn.Module, cfg: Any) -> str:
    """'' when ``type(model)(cfg)`` has ``model``'s tensor shapes, else the first difference."""
    try:
        with torch.device("meta"):
            fresh = type(model)(cfg)
    except Exception as exc:  # noqa: BLE001 - a class that cannot be built from its config alone
        return f"{type(model).__name__}(config) cannot be built ({type(exc).__name__}: {exc})"
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, v in fresh.state_dict().items():
        if k in want and tuple(v.shape) != want[k]:
            return f"a {type(model).__name__} built from the updated config has {k} of shape {tuple(v.shape)}, the " \
                   f"pruned model {want[k]} (layers pruned to different widths, or a width the config derives)"
    return ""


def rebuild(model: nn.Module, graph_module: nn.Module, analysis: Any, selection: Any, traced: fx.GraphModule,
            rules: RuleTable = RULES, literals: bool = False) -> Rebuilt:
    """A copy of ``model`` (its class) with the graph result's weights and consistent attributes;
    ``literals``: also the ``int`` attributes its forward read as literal sizes (:mod:`fxprune.literals`; the
    callers try this when the copy without it does not match the graph result)."""
    keep_of = analysis.keep_fn(selection)
    rw = RewriteContext(traced, None, keep_of, analysis.table.groups_of)
    graph_walk = _walk(graph_module)
    state = _named_tensors(graph_walk)
    memo: dict[int, Any] = {}
    model_walk = _walk(model)
    model_mods = _first_paths(model_walk)
    for name, mod in model_walk:  # tied tensors: every alias, one tensor
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                q = f"{name}.{k}" if name else k
                if t is not None and q in state:
                    memo.setdefault(id(t), state[q])
    changed = _changed_modules(model_mods, analysis.changed_tensors(selection))
    graph_mods = dict(_first_paths(graph_walk))
    calls: dict[str, list[fx.Node]] = {}
    for n in traced.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    own = {p: graph_mods[p] for p in changed if p in calls and type(graph_mods.get(p)) not in (nn.Module, type(None))}
    for path, g in own.items():  # fx: the rewrite's own module, put in the copy as it is (never copied first)
        memo.setdefault(id(submodule(model, path)), g)
    new = copy_module(model, memo)
    attributes: list[str] = []
    swaps_only = True
    for path in sorted(changed, key=lambda p: -p.count(".")):
        if path in own:
            continue
        old = model.get_submodule(path) if path else model
        cur = new.get_submodule(path) if path else new
        swaps_only = False
        rule = rules.module_rule(old)
        if rule is not None:
            fixed = rule.fix_module(cur, old, path, rw, calls.get(path, ()))
            if fixed is not cur:
                _set_module(new, path, fixed)
        else:
            attributes += [f"{path}.{a}" for a in _fix_plain_attributes(cur, old)]
    reshaped = _reshaped(model_walk, new)
    attributes += _update_counts(new, model_mods, changed, reshaped)
    if literals:
        attributes += update_literal_attributes(new, model, traced, graph_module, _SKIP)
    config, mismatch = _update_config(new, model, reshaped)
    set_training(new, model.training)
    return Rebuilt(new, attributes, config, mismatch, swaps_only and not attributes and not config)


def same_program(rebuilt: nn.Module, graph_module: fx.GraphModule,
                 trace_fn: Callable[[nn.Module], fx.GraphModule] | None = None, captured: fx.Graph | None = None) -> str:
    """'' when ``rebuilt``'s own ``forward`` is the graph result's program: the same nodes, in order, with the
    same targets, the same literal arguments, the very same modules (or modules of the same type, attributes
    and tensors) and tensors. Then the two compute one function at every input size, and no forward needs
    to run; else what differs (the caller falls back to comparing outputs).

    The program of ``rebuilt`` is ``trace_fn(rebuilt)`` (traced in eval mode), or ``captured``: the graph
    captured from the user's model, valid for ``rebuilt`` when the rebuild only swapped in the graph result's
    modules (:attr:`Rebuilt.swaps_only`: every attribute the forward reads is as it was when captured), its
    modules and tensors then looked up in ``rebuilt``."""
    if captured is not None:
        graph, root = captured, rebuilt
    else:
        assert trace_fn is not None
        try:
            with eval_mode(rebuilt):
                root = trace_fn(rebuilt)
        except Exception as exc:  # noqa: BLE001 - a class that does not trace is compared by its outputs
            return f"does not trace ({type(exc).__name__})"
        graph = root.graph
    a, b = list(graph.nodes), list(graph_module.graph.nodes)
    if len(a) != len(b):
        return f"traces to {len(a)} nodes, the graph result has {len(b)}"
    pos = {n: i for i, n in enumerate(a)}
    pos_b = {n: i for i, n in enumerate(b)}
    for x, y in zip(a, b, strict=True):
        if x.op != y.op or x.target != y.target:
            return f"node {y.name}: {x.op} {x.target} vs {y.op} {y.target}"
        if not _same_value((x.args, x.kwargs), (y.args, y.kwargs), pos, pos_b) and not _same_slices(x, y, pos, pos_b):
            return f"node {y.name}: arguments {x.args} vs {y.args}"
        if x.op == "call_module" and not _same_module(submodule(root, x.target), submodule(graph_module, y.target)):
            return f"module {x.target} differs"
        if x.op == "get_attr" and not _same_value(_attr(root, x.target, captured), _attr(graph_module, y.target),
                                                  {}, {}):
            return f"attribute {x.target} differs"
    return ""


def _same_slices(x: fx.Node, y: fx.Node, pos: dict, pos_b: dict) -> bool:
    """``x[idx_x]`` (the captured program) selects what ``y[idx_y]`` (the graph result) does: the indices
    differ only in slices over dims the rewrite shrank, which select the same positions of the pruned size
    (GhostNet's ``cat(...)[:, :self.out_chs]`` with ``out_chs`` unchanged and the graph's literal patched).
    A shrunk dim is a pruned channel dim, whose size the weights fix: the same at every input size."""
    if x.op != "call_function" or x.target is not operator.getitem or len(x.args) != 2 or len(y.args) != 2 \
            or x.kwargs or y.kwargs or not _same_value(x.args[0], y.args[0], pos, pos_b):
        return False
    before, after = shape_of(x.args[0]), shape_of(y.args[0])
    ix, iy = (a if isinstance(a, tuple) else (a,) for a in (x.args[1], y.args[1]))
    if before is None or after is None or len(before) != len(after) or max(len(ix), len(iy)) > len(after) or \
            not all(isinstance(a, slice) for a in (*ix, *iy)):
        return False
    full = slice(None)  # trailing dims not indexed are taken whole
    ix, iy = (i + (full,) * (len(after) - len(i)) for i in (ix, iy))
    for d, (a, b) in enumerate(zip(ix, iy, strict=True)):
        if _same_value(a, b, pos, pos_b):
            continue
        if before[d] == after[d] or not all(v is None or type(v) is int for s in (a, b)
                                            for v in (s.start, s.stop, s.step)):
            return False
        if a.indices(after[d]) != b.indices(after[d]):
            return False
    return True


def _attr(m: nn.Module, path: str, captured: fx.Graph | None = None) -> Any:
    """``m``'s attribute ``path``; with the ``captured`` program, a tensor torch.fx's trace computed and stored
    on the traced copy (``_tensor_constantN``: the forward makes it from no input) is read from that copy —
    the rebuilt model's own forward computes it again, as it did when captured."""
    owner, _, name = path.rpartition(".")
    if captured is not None and not owner and _FX_CONSTANT.fullmatch(name) and not hasattr(m, name):
        m = captured.owning_module
    return getattr(submodule(m, owner), name)


def _same_value(x: Any, y: Any, pos: dict, pos_b: dict) -> bool:
    if isinstance(x, fx.Node) or isinstance(y, fx.Node):
        return isinstance(x, fx.Node) and isinstance(y, fx.Node) and pos.get(x, -1) == pos_b.get(y, -2)
    if type(x) is not type(y):
        return False
    if isinstance(x, torch.Tensor):
        return x is y or (x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y)))
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(_same_value(u, v, pos, pos_b) for u, v in zip(x, y, strict=True))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same_value(x[k], y[k], pos, pos_b) for k in x)
    if isinstance(x, slice):
        return _same_value((x.start, x.stop, x.step), (y.start, y.stop, y.step), pos, pos_b)
    try:
        return bool(x == y)
    except Exception:  # noqa: BLE001 - a value that cannot be compared is not known to be the same
        return False


def _same_module(x: nn.Module, y: nn.Module) -> bool:
    """The same module, or one of the same type whose submodules have the same attributes and tensors."""
    if x is y:
        return True
    xs, ys = dict(x.named_modules(remove_duplicate=False)), dict(y.named_modules(remove_duplicate=False))
    if xs.keys() != ys.keys():
        return False
    for k, u in xs.items():
        v = ys[k]
        if type(u) is not type(v):
            return False
        du, dv = ({a: w for a, w in vars(m).items() if a not in ("_modules", "training")} for m in (u, v))
        if du.keys() != dv.keys() or not all(_same_value(du[a], dv[a], {}, {}) for a in du):
            return False
    return True


def second_inputs(args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The example arguments at another size: one more sample in the batch, and one token fewer for
    integer (token id) and 2-D mask inputs longer than 2."""
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
    out = []
    seq = all(x.dim() == 2 and x.shape[1] > 2 for x in leaves
              if isinstance(x, torch.Tensor) and x.dim() >= 2 and not x.is_floating_point()) and any(
        isinstance(x, torch.Tensor) and x.dim() == 2 and not x.is_floating_point() for x in leaves)
    for x in leaves:
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            x = torch.cat([x, x[:1]])
            if seq and x.dim() == 2 and not x.is_floating_point():
                x = x[:, :-1]
        out.append(x)
    a, k = pytree.tree_unflatten(out, spec)
    return tuple(a), k


def _outputs(m: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    was = m.training
    m.eval()
    try:
        with torch.no_grad():
            out = m(*args, **kwargs)
    finally:
        m.train(was)
    return [t for t in pytree.tree_leaves(tensors_only(out, [])) if isinstance(t, torch.Tensor)]


def _run(m: nn.Module, args: Sequence[Any], kwargs: dict[str, Any], what: str) -> list[torch.Tensor] | str:
    try:
        return _outputs(m, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - reported as the reason the class copy is not used
        return f"raised {type(exc).__name__} {what}: {summary(exc)}"


def verify_rebuilt(rebuilt: nn.Module, graph_module: nn.Module, args: Sequence[Any],
                   kwargs: dict[str, Any] | None = None) -> tuple[str, bool]:
    """('' or what went wrong, whether a second input size was checked): the rebuilt model against the graph
    result, on the example inputs and on :func:`second_inputs` (when the graph result accepts those).
    Floating outputs must agree to 1e-4 of their largest magnitude (float32 kernels of one op may differ in
    summation order between the two forms; a wrong width or head count differs at order 1)."""
    kwargs = dict(kwargs or {})
    checked = False
    for i, (a, k) in enumerate(((tuple(args), kwargs), second_inputs(args, kwargs))):
        what = "on the example inputs" if i == 0 else "on inputs of another batch/sequence size"
        ref = _run(graph_module, a, k, what)
        if isinstance(ref, str):
            if i == 0:
                return f"the graph result {ref}", False
            break  # the graph result is specialised to the example size: nothing to compare against
        got = _run(rebuilt, a, k, what)
        if isinstance(got, str):
            return got, checked
        scale = max([float(t.abs().max()) for t in ref if t.is_floating_point() and t.numel()] + [1.0])
        msg = compare_outputs(got, ref, 1e-4, 1e-4 * scale)
        if msg:
            return f"differs from the graph result {what}: {msg}", checked
        checked = i == 1
    return "", checked
