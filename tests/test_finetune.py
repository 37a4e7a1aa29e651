"""The fine-tuning utility and the iterative prune → fine-tune scheduler."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxprune.errors import ConfigError, InputError
from fxprune.finetune import IterativePruner, finetune, iterative_prune
from fxprune.sparsity import MagnitudePruner


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))


def data(n_batches: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(16, 6, generator=g)
        out.append((x, (x @ w).argmax(1)))
    return out


def test_finetune_equals_a_hand_written_loop():
    loader = data()
    a, b = mlp(), mlp()
    st = finetune(a, loader, epochs=2, lr=0.05, momentum=0.9, weight_decay=1e-4, progress=False)
    opt = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    losses = []
    for _ in range(2):
        tot = 0.0
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(b(x), y)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(y)
        losses.append(tot / 64)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert st.steps == 8 and st.samples == 128 and st.epochs == 2
    assert st.epoch_losses == pytest.approx(losses)
    assert st.epoch_losses[1] < st.epoch_losses[0]


def test_finetune_options():
    m = mlp().eval()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    seen = []
    st = finetune(m, data(), optimizer=opt, epochs=3, callback=lambda s, l: seen.append(s) or s < 5, progress=False)
    assert st.steps == 5 and seen == [1, 2, 3, 4, 5]
    assert not m.training  # mode restored
    assert len(opt.state) > 0  # the user's optimiser did the work
    assert finetune(mlp(), data(), max_steps=3, epochs=4, progress=False).steps == 3
    dict_batches = [{"x": x, "y": y} for x, y in data(2)]
    assert finetune(mlp(), dict_batches, progress=False).steps == 2
    assert finetune(mlp(), data(2), progress=True).steps == 2  # with a tqdm bar


def test_finetune_bad_input():
    with pytest.raises(ConfigError, match="epochs"):
        finetune(mlp(), data(), epochs=0)
    with pytest.raises(ConfigError, match="one-shot"):
        finetune(mlp(), iter(data()), epochs=2)
    with pytest.raises(InputError, match="inputs..., target"):
        finetune(mlp(), [torch.randn(4, 6)], progress=False)
    with pytest.raises(InputError, match="no batches"):
        finetune(mlp(), [], progress=False)
    with pytest.raises(InputError, match="non-finite loss"):
        bad = [(torch.full((4, 6), float("nan")), torch.zeros(4, dtype=torch.long))]
        finetune(mlp(), bad, progress=False)
    with pytest.raises(ConfigError, match="lr"):
        finetune(mlp(), data(), lr=-1)


def test_finetune_keeps_magnitude_masks():
    m = mlp()
    p = MagnitudePruner(m, q=1.0)
    p.prune()
    finetune(m, data(), epochs=2, lr=0.1, weight_decay=1e-3, progress=False)
    for n, mask in p.masks.items():
        assert (m.get_submodule(n).weight.detach()[~mask] == 0).all()


# -- iterative scheduler ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["params", "macs"])
def test_iterative_prune_reaches_target_in_steps(kind):
    net = mlp()
    snap = copy.deepcopy(net.state_dict())
    x = torch.randn(1, 6)
    calls = []

    def train(module, step):
        calls.append((step, module))
        finetune(module, data(2), lr=0.05, progress=False)
        return float(step) * 10

    target = {f"target_{kind}": 0.4}
    res = iterative_prune(net, x, train, step_ratio=0.3, progress=False, **target)
    h = res.history
    assert res.reached and len(h) >= 2
    c0 = (h[0].params_before if kind == "params" else h[0].macs_before)
    costs = [getattr(r, kind) for r in h]
    assert costs[-1] <= 0.4 * c0 < costs[-2]  # stops at the first step that reaches the target
    prev = c0
    for c in costs:  # each step removes about step_ratio of what is left, never more than needed
        assert c <= max(int(prev * 0.7), int(0.4 * c0))
        assert c > 0.4 * prev  # not a one-shot jump
        prev = c
    assert [s for s, _ in calls] == list(range(len(h))) and calls[-1][1] is res.module
    assert [r.metric for r in h] == [10.0 * i for i in range(len(h))]
    assert res.module(torch.randn(5, 6)).shape == (5, 3)
    for k, v in net.state_dict().items():
        assert torch.equal(v, snap[k])
    assert "| step |" in res.to_markdown()


def test_iterative_pruner_without_train_fn_and_callback_stop():
    net = mlp()
    pruner = IterativePruner(net, torch.randn(1, 6), target_macs=0.2, step_ratio=0.2, progress=False)
    m1 = pruner.step()
    with torch.no_grad():  # the user's loop changes the module in place; the next step prunes that
        m1.get_submodule("0").weight.mul_(0.5)
    pruner.record(metric=0.5)
    m2 = pruner.step()
    pruner.record()
    assert pruner.history[1].params_before == pruner.history[0].params
    assert m2 is not m1 and pruner.module is m2
    with pytest.raises(ConfigError, match="record"):
        pruner.record()
    res = iterative_prune(mlp(), torch.randn(1, 6), lambda m, i: None, target_params=0.1,
                          callback=lambda row, m: row.step < 1, progress=False)
    assert len(res.history) == 2 and not res.reached


def test_iterative_bad_input():
    x = torch.randn(1, 6)
    with pytest.raises(ConfigError, match="exactly one"):
        IterativePruner(mlp(), x)
    with pytest.raises(ConfigError, match="exactly one"):
        IterativePruner(mlp(), x, target_macs=0.5, target_params=0.5)
    for bad in (0, -1, float("nan")):
        with pytest.raises(ConfigError, match="target"):
            IterativePruner(mlp(), x, target_params=bad)
    for bad in (0, 1, 1.5):
        with pytest.raises(ConfigError, match="step_ratio"):
            IterativePruner(mlp(), x, target_params=0.5, step_ratio=bad)
    # a target that would need a layer to disappear: every layer keeps >= 1 unit, so it is unreachable
    with pytest.raises(ConfigError, match="not reachable"):
        IterativePruner(mlp(), x, target_params=10)
    with pytest.raises(ConfigError, match="train_fn"):
        iterative_prune(mlp(), x, None, target_params=0.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ignore"):
        IterativePruner(mlp(), x, target_params=0.5, ignore=["nope"])
