"""Coverage beyond classification: torchvision detection / segmentation / optical flow / video models and a
broad list of timm architectures, fxprune side by side with torch-pruning in the same run.

Per model (random weights, eval mode, randomised norm layers, one forked child process per model):

* fxprune: ``fxprune.compile(model, inputs, importance="l2", ratio=0.5, verify="equivalence")`` with the
  default ``frontend="auto"`` (torch.fx, falling back to torch.export when tracing fails). ``ok`` = compile
  succeeded (incl. the float64 check against the masked reference, or its documented skip when lossy groups
  were pruned), every output keeps its shape and MACs decreased. The time is the compile wall time minus
  the verify pass.
* torch-pruning: ``MetaPruner(model, inputs, MagnitudeImportance(p=2), pruning_ratio=0.5,
  ignored_layers=<output layers>, num_heads=<attention qkv>)`` + ``step()`` on a deep copy, timed; ``ok`` =
  it ran and every output keeps its shape (torch-pruning does not verify numerics). Output layers = every
  module whose output shares storage with a network output, plus the heads' final layers by name.

Detection models are pruned whole (``<name>``): their pre/post-processing (resizing a list of images,
NMS, a variable number of boxes) is captured by neither torch.fx nor torch.export, so fxprune's default front
end falls back to the hierarchical one (backbone + FPN, RPN/box/mask heads pruned as regions with their
interfaces kept); the output check then compares structure, dtypes and every dim but the first (the number
of detections depends on the data). The images are resized to the input side (``min_size=max_size=side``)
instead of torchvision's 800 px. ``--core`` adds ``<name>:core`` rows (backbone + FPN + head as one graph,
returning the head's raw outputs: FPN channels coupled with the head can then be pruned too).

    python benchmarks/coverage_models.py                           # every suite (hours on 2 cores)
    python benchmarks/coverage_models.py --suites timm --models resnet18,vit_tiny_patch16_224
    python benchmarks/coverage_models.py --suites detection,segmentation --timeout 300
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common  # type: ignore[no-redef]
else:
    from . import common

import torch
from torch import nn

NAME = "coverage_models"
RATIO = 0.5

# timm: (name, input side); a broad, diverse list of families, small variants
TIMM = [
    ("resnet18", 128), ("resnet50d", 128), ("seresnext26d_32x4d", 128), ("res2net50_14w_8s", 128),
    ("efficientnet_b0", 128), ("tf_efficientnetv2_b0", 128), ("mobilenetv3_small_100", 128),
    ("mobilenetv4_conv_small", 128), ("ghostnet_100", 128), ("rexnet_100", 128), ("regnetx_002", 128),
    ("regnety_002", 128), ("convnext_atto", 128), ("cspdarknet53", 128), ("cspresnet50", 128),
    ("darknet53", 128), ("nf_resnet26", 128), ("densenet121", 128), ("dla34", 128), ("repvgg_a0", 128),
    ("hrnet_w18_small", 128), ("vgg11", 64), ("edgenext_xx_small", 128), ("mobilevit_xs", 128),
    ("poolformer_s12", 128), ("efficientvit_b0", 128), ("vit_tiny_patch16_224", 224),
    ("deit_tiny_patch16_224", 224), ("swin_tiny_patch4_window7_224", 224), ("maxvit_rmlp_pico_rw_256", 256),
    ("coatnet_nano_rw_224", 224), ("mixer_s16_224", 224), ("levit_128s", 224), ("fastvit_t8", 128),
]

# torch-pruning's own per-model configuration for torchvision detection / flow models (the layers its
# examples/torchvision_models script ignores; it also needs trainable_backbone_layers=5, no FrozenBatchNorm2d)
TP_IGNORE = {
    "fasterrcnn": ("rpn.head.cls_logits", "rpn.head.bbox_pred", "backbone.fpn", "roi_heads"),
    "fcos": ("head.classification_head.cls_logits", "head.regression_head.bbox_reg",
             "head.regression_head.bbox_ctrness"),
    "keypointrcnn": ("rpn.head.cls_logits", "backbone.fpn.layer_blocks", "rpn.head.bbox_pred", "roi_heads.box_head",
                     "roi_heads.box_predictor", "roi_heads.keypoint_predictor"),
    "maskrcnn": ("rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor", "roi_heads.mask_predictor"),
    "retinanet": ("head.classification_head.cls_logits", "head.regression_head.bbox_reg"),
    "ssd": ("head",),
    "raft_large": ("corr_block", "update_block", "mask_predictor"),
}

DETECTION_HEAD_LAYERS = ("cls_logits", "bbox_reg", "bbox_pred", "bbox_ctrness", "cls_score", "mask_fcn_logits",
                         "kps_score_lowres", "module_list", "low_classifier", "high_classifier")


def _suite_models(suite: str) -> list[str]:
    import torchvision

    if suite == "timm":
        return [n for n, _ in TIMM]
    mod = getattr(torchvision.models, suite)
    names = torchvision.models.list_models(module=mod)
    return names


class DetectionCore(nn.Module):
    """Backbone (+ FPN) and head of a torchvision detector, returning the head's raw outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.two_stage = hasattr(model, "rpn")
        self.head = model.rpn.head if self.two_stage else model.head

    def forward(self, x):
        feats = self.backbone(x)
        feats = list(feats.values()) if isinstance(feats, dict) else [feats]
        out = self.head(feats)
        if isinstance(out, dict):
            return tuple(out[k] for k in sorted(out))
        return tuple(t for part in out for t in part)  # rpn head: (objectness per level, deltas per level)


def build(suite: str, name: str, size: int | None, seed: int) -> tuple[nn.Module, tuple[torch.Tensor, ...], str]:
    """Model (eval, randomised norms), example inputs, and a description of the input."""
    import warnings

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if suite == "timm":
            import timm

            side = size or dict(TIMM)[name]
            model = timm.create_model(name, pretrained=False)
            inputs = (torch.randn(1, 3, side, side, generator=g),)
        else:
            import torchvision

            base = name.split(":")[0]
            kwargs: dict[str, Any] = {"weights": None}
            if suite in ("detection", "segmentation"):
                kwargs["weights_backbone"] = None
            if suite == "detection":
                kwargs["trainable_backbone_layers"] = 5  # plain BatchNorm2d (torch-pruning cannot prune FrozenBN)
            model = torchvision.models.get_model(base, **kwargs)
            if suite == "detection":
                side = size or 160
                if not base.startswith("ssd"):  # keep torchvision's resize at the input side
                    kwargs.update(min_size=side, max_size=side)
                    model = torchvision.models.get_model(base, **kwargs)
                if name.endswith(":core"):
                    model = DetectionCore(model)
                inputs = (torch.randn(1, 3, side, side, generator=g),)
            elif suite == "segmentation":
                side = size or 128
                inputs = (torch.randn(1, 3, side, side, generator=g),)
            elif suite == "optical_flow":
                side = size or 128
                inputs = (torch.randn(1, 3, side, side, generator=g), torch.randn(1, 3, side, side, generator=g))
            else:  # video
                t, side = (16, 224) if base.startswith("mvit") or base == "s3d" else (8, size or 64)
                if base.startswith("swin3d"):
                    side = size or 112
                inputs = (torch.randn(1, 3, t, side, side, generator=g),)
    model.eval()
    model._coverage_name = name
    common.randomize_norms(model, seed)
    return model, inputs, "x".join(str(s) for s in inputs[0].shape[1:])


def _leaves(out: Any) -> list[torch.Tensor]:
    from fxprune.passes.verify import flatten_outputs

    return flatten_outputs(out)


def _shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in _leaves(out)]


def _output_layers(model: nn.Module, inputs: tuple[torch.Tensor, ...], suite: str) -> list[nn.Module]:
    """Modules whose output is (a view of) a network output, plus detection heads' final layers."""
    ptrs: dict[int, nn.Module] = {}
    hooks = []

    def hook(m, _inp, out):
        if isinstance(out, torch.Tensor):
            ptrs.setdefault(out.untyped_storage().data_ptr(), m)

    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    found = [ptrs[p] for p in {t.untyped_storage().data_ptr() for t in _leaves(out)} if p in ptrs]
    if suite in ("detection", "segmentation"):
        for n, m in model.named_modules():
            if n.split(".")[-1] in DETECTION_HEAD_LAYERS or n.endswith(("classifier.4", "classifier.3")):
                found.append(m)
    name = getattr(model, "_coverage_name", "")
    for key, paths in TP_IGNORE.items():
        if name.startswith(key):
            found += [model.get_submodule(p) for p in paths if _has(model, p)]
    if hasattr(model, "get_classifier"):
        c = model.get_classifier()
        if isinstance(c, nn.Module):
            found.append(c)
    return list({id(m): m for m in found}.values())


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _num_heads(model: nn.Module) -> dict[nn.Module, int]:
    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            heads[m] = m.num_heads
        elif isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int):
            heads[m.qkv] = m.num_heads
    return heads


def run_fxprune(row: dict[str, Any], model: nn.Module, inputs: tuple[torch.Tensor, ...], want: list) -> None:
    import fxprune

    try:
        res = fxprune.compile(model, inputs, importance="l2", ratio=RATIO, verify="equivalence")
    except Exception as exc:  # noqa: BLE001 - every failure is a result
        row["fx_status"] = "error"
        row["fx_error"] = common.error_text(exc)
        row["fx_traceback"] = common.full_traceback(exc)
        return
    rep = res.report
    parts = list(res.regions.values()) or [res]  # hierarchical front end: one compile per region
    verify_s = sum(dt for r in parts for p, _, dt in r.context.log if p == "verify")
    checks = {next((st for p, st, _ in r.context.log if p == "verify"), {}).get("equivalence", "–") for r in parts}
    frontend = "export" if any("torch.export" in n for n in rep.notes) else "fx"
    if res.regions:
        frontend = f"hierarchical ({len(res.regions)} regions)"
    row.update(fx_s=rep.seconds - verify_s, fx_verify_s=verify_s, macs_before=rep.macs_before,
               fx_params_ratio=rep.params_after / max(rep.params_before, 1),
               macs_after=rep.macs_after, groups=f"{rep.groups_pruned}/{rep.groups_total}", frontend=frontend,
               equivalence=checks.pop() if len(checks) == 1 else ", ".join(sorted(checks)))
    with torch.no_grad():
        got = _shapes(res.module(*inputs))
    if res.regions:  # data-dependent output sizes (detections): compare all dims but the first
        got, want = [g[1:] for g in got], [w[1:] for w in want]
    problems = []
    if got != want:
        problems.append(f"output shapes {want} -> {got}")
    if not rep.macs_after < rep.macs_before:
        problems.append(f"MACs did not decrease ({rep.macs_before} -> {rep.macs_after})")
    row["fx_status"] = "ok" if not problems else "check failed"
    row["fx_error"] = "; ".join(problems) or None


def run_tp(row: dict[str, Any], model: nn.Module, inputs: tuple[torch.Tensor, ...], want: list, suite: str) -> None:
    import torch_pruning as tp

    try:
        m = copy.deepcopy(model)
        ignored = _output_layers(m, inputs, suite)
        t0 = time.perf_counter()
        pruner = tp.pruner.MetaPruner(m, inputs if len(inputs) > 1 else inputs[0],
                                      importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=RATIO,
                                      ignored_layers=ignored, num_heads=_num_heads(m))
        pruner.step()
        row["tp_s"] = time.perf_counter() - t0
        for mod in m.modules():  # untimed attribute fix-ups from torch-pruning's timm example
            qkv = getattr(mod, "qkv", None)
            if qkv in pruner.num_heads and hasattr(mod, "head_dim"):
                mod.num_heads = pruner.num_heads[qkv]
                mod.head_dim = qkv.out_features // (3 * mod.num_heads)
        with torch.no_grad():
            got = _shapes(m(*inputs))
        if suite == "detection":  # the number of detections depends on the data
            got, want = [g[1:] for g in got], [w[1:] for w in want]
        n_after = sum(p.numel() for p in m.parameters())
        n_before = sum(p.numel() for p in model.parameters())
        problems = []
        if got != want:
            problems.append(f"output shapes {want} -> {got}")
        if not n_after < n_before:
            problems.append("no parameter removed")
        row["tp_params_ratio"] = n_after / max(n_before, 1)
        row["tp_status"] = "ok" if not problems else "check failed"
        row["tp_error"] = "; ".join(problems) or None
    except Exception as exc:  # noqa: BLE001
        row["tp_status"] = "error"
        row["tp_error"] = common.error_text(exc)


def run_one(suite: str, name: str, size: int | None, seed: int, tools: tuple[str, ...]) -> dict[str, Any]:
    common.setup_torch(seed)
    row: dict[str, Any] = {"suite": suite, "model": name, "fx_status": "–", "tp_status": "–"}
    try:
        model, inputs, desc = build(suite, name, size, seed)
        row["input"] = desc
        row["params"] = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            want = _shapes(model(*inputs))
    except Exception as exc:  # noqa: BLE001
        row["fx_status"] = row["tp_status"] = "build failed"
        row["fx_error"] = row["tp_error"] = common.error_text(exc)
        return row
    common.progress(dict(row))
    if "fxprune" in tools:
        import fxprune

        fxprune.compile(common.tiny_net(), (torch.randn(1, 3, 8, 8),), ratio=RATIO, verify="none")  # warm-up
        run_fxprune(row, model, inputs, want)
        common.progress(dict(row))
    if "tp" in tools:
        run_tp(row, model, inputs, want, suite)
    return row


def _render(rows: list[dict[str, Any]], elapsed: float) -> str:
    headers = ["suite", "model", "input", "fxprune", "front end", "groups pruned", "MACs after/before",
               "params after/before", "equivalence", "fxprune s", "torch-pruning", "tp params after/before", "tp s",
               "tp/fx time", "fxprune error", "torch-pruning error"]
    body = []
    for r in rows:
        ratio = (f"{r['tp_s'] / r['fx_s']:.2f}" if r.get("tp_s") and r.get("fx_s") and r["fx_status"] == "ok"
                 and r["tp_status"] == "ok" else None)
        body.append([r["suite"], r["model"], r.get("input"), r["fx_status"], r.get("frontend"), r.get("groups"),
                     f"{r['macs_after'] / max(r['macs_before'], 1):.1%}" if r.get("macs_before") else None,
                     f"{r['fx_params_ratio']:.1%}" if r.get("fx_params_ratio") else None,
                     r.get("equivalence"), common.fmt_s(r.get("fx_s")), r["tp_status"],
                     f"{r['tp_params_ratio']:.1%}" if r.get("tp_params_ratio") else None, common.fmt_s(r.get("tp_s")),
                     ratio, r.get("fx_error") or "", r.get("tp_error") or ""])
    fx_ok = {r["model"] for r in rows if r["fx_status"] == "ok"}
    tp_ok = {r["model"] for r in rows if r["tp_status"] == "ok"}
    both = [r for r in rows if r["model"] in fx_ok & tp_ok]
    lines = [
        "# Coverage: detection, segmentation, optical flow, video (torchvision) and timm",
        "",
        f"fxprune `compile(model, inputs, importance='l2', ratio={RATIO}, verify='equivalence')` (front end "
        "auto: fx, falling back to torch.export, then to the hierarchical front end) vs torch-pruning `MetaPruner(MagnitudeImportance(p=2), "
        f"pruning_ratio={RATIO}, ignored_layers=<output layers>)` + `step()`, same model, same process. "
        "Random weights, eval mode, randomised norm layers. " + common.machine_info() + ".",
        "",
        "fxprune s = compile wall time without the verify pass; tp s = pruner construction + step. "
        "`ok` = ran, output shapes unchanged (fxprune: also float64 equivalence with the masked reference, "
        "skipped only when lossy groups were pruned, and MACs decreased).",
        "",
        common.markdown_table(headers, body),
        "",
        f"**Summary: fxprune ok {len(fx_ok)} / {len(rows)}, torch-pruning ok {len(tp_ok)} / {len(rows)}; "
        f"torch-pruning ok but fxprune not: {', '.join(sorted(tp_ok - fx_ok)) or 'none'}; "
        f"fxprune ok but torch-pruning not: {', '.join(sorted(fx_ok - tp_ok)) or 'none'}.**",
    ]
    if both:
        fx_t = sum(r["fx_s"] for r in both)
        tp_t = sum(r["tp_s"] for r in both)
        lines.append(f"Over the {len(both)} models both handle: fxprune {fx_t:.1f}s total, torch-pruning "
                     f"{tp_t:.1f}s total (ratio {tp_t / max(fx_t, 1e-9):.2f}); median per-model ratio "
                     f"{common.median([r['tp_s'] / r['fx_s'] for r in both]):.2f}.")
    lines.append(f"Benchmark wall time {elapsed / 60:.1f} min.")
    return "\n".join(lines)


def _merge(files: list[str], out: str | None) -> list[dict[str, Any]]:
    import json

    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for f in files:
        for r in json.loads(open(f).read()):
            rows[(r["suite"], r["model"])] = r
    merged = list(rows.values())
    text = _render(merged, 0.0).replace("Benchmark wall time 0.0 min.", "Rows merged from runs in: " + ", ".join(
        os.path.basename(f) for f in files) + " (a later run's row replaces an earlier one's).")
    common.write_results(NAME, text, merged, out)
    print(text)
    return merged


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suites", default="detection,segmentation,optical_flow,video,timm")
    p.add_argument("--models", default="", help="comma-separated subset (names as in the table)")
    p.add_argument("--exclude", default="")
    p.add_argument("--size", type=int, default=None, help="override the input side")
    p.add_argument("--tools", default="fxprune,tp")
    p.add_argument("--timeout", type=float, default=600.0, help="per-model time limit (both tools) in seconds")
    p.add_argument("--max-rss-gb", type=float, default=common.DEFAULT_MAX_RSS_GB)
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--core", action="store_true", help="also prune detection models' backbone+FPN+head as one graph")
    p.add_argument("--merge", default="", help="comma-separated result .json files: render one table from their rows "
                   "(a later file's row replaces an earlier one's for the same model) instead of running")
    args = p.parse_args(argv)
    if args.merge:
        return _merge([f.strip() for f in args.merge.split(",") if f.strip()], args.out)
    want = {s.strip() for s in args.models.split(",") if s.strip()}
    drop = {s.strip() for s in args.exclude.split(",") if s.strip()}
    tools = tuple(t.strip() for t in args.tools.split(","))
    names = [(s.strip(), n) for s in args.suites.split(",") for n in _suite_models(s.strip())]
    if args.core:
        names = [(s, x) for s, n in names for x in ((f"{n}:core", n) if s == "detection" else (n,))]
    jobs = [(s, n) for s, n in names if (not want or n in want) and n not in drop]
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for i, (suite, name) in enumerate(jobs):
        common.log(f"[{i + 1}/{len(jobs)}] {suite} {name} ...")
        t0 = time.perf_counter()
        status, out, last = common.run_isolated(run_one, (suite, name, args.size, args.seed, tools),
                                                timeout=args.timeout, max_rss_gb=args.max_rss_gb)
        if status == "ok":
            row = out
        else:  # killed: keep what the child reported before it died
            row = dict(last or {"suite": suite, "model": name, "fx_status": "–", "tp_status": "–"})
            why = out.splitlines()[0]
            if row.get("fx_status") in (None, "–"):
                row["fx_status"], row["fx_error"] = "error", why
            elif row.get("tp_status") in (None, "–") and "tp" in tools:
                row["tp_status"], row["tp_error"] = "error", why
        common.log(f"    fxprune {row.get('fx_status')} / tp {row.get('tp_status')} in "
                   f"{time.perf_counter() - t0:.1f}s {row.get('fx_error') or ''} {row.get('tp_error') or ''}")
        rows.append(row)
        text = _render(rows, time.perf_counter() - t_start)
        common.write_results(NAME, text, [{k: v for k, v in r.items() if k != "fx_traceback"} for r in rows],
                             args.out)
    text = _render(rows, time.perf_counter() - t_start)
    print(text)
    return rows


if __name__ == "__main__":
    main()
