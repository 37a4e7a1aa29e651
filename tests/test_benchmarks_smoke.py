"""Fast smoke tests of the benchmark scripts (benchmarks/*.py), so they cannot rot.

Each script's ``main(argv)`` is run on a tiny configuration, in-process (``--no-isolate``), writing its
table to a temporary directory; the returned rows are checked for real results.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common, coverage_torchvision, memory, scaling, vs_torch_pruning  # noqa: E402


def test_common_helpers():
    assert common.input_size_for("vit_b_16") == 224
    assert common.input_size_for("swin_v2_t") == 224
    assert common.input_size_for("maxvit_t") == 224
    assert common.input_size_for("inception_v3") == 299
    assert common.input_size_for("resnet18", 96) == 96

    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LayerNorm(4))
    state = torch.get_rng_state()
    common.randomize_norms(net, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # private generator
    bn = net[1]
    assert not torch.allclose(bn.running_mean, torch.zeros(4))
    assert (bn.running_var > 0).all() and not torch.allclose(bn.running_var, torch.ones(4))
    assert not torch.allclose(bn.weight, torch.ones(4)) and not torch.allclose(net[2].bias, torch.zeros(4))
    other = common.randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LayerNorm(4)), seed=1)
    assert torch.equal(other[1].running_mean, bn.running_mean)  # deterministic per seed

    calls = []
    t, out = common.median_time(lambda: calls.append(1) or len(calls), repeats=3, warmup=1)
    assert len(calls) == 4 and out == 4 and t >= 0

    assert "|" not in common.markdown_table(["a"], [["x|y"]]).splitlines()[2].replace("\\|", "").strip("| ")


def _sleep_forever():
    time.sleep(60)


def _answer(x):
    common.progress("working")
    return x * 2


def _die():
    common.progress("about to die")
    os._exit(3)


def test_run_isolated():
    assert common.run_isolated(_answer, (21,), timeout=30) == ("ok", 42, "working")
    status, msg, _ = common.run_isolated(_sleep_forever, timeout=0.5)
    assert status == "error" and msg.startswith("Timeout")
    status, msg, last = common.run_isolated(_die, timeout=30)
    assert status == "error" and "exit code 3" in msg and last == "about to die"


def test_coverage_smoke(tmp_path):
    out = tmp_path / "coverage.md"
    rows = coverage_torchvision.main(["--models", "resnet18", "--size", "64", "--quick", "--no-isolate",
                                      "--out", str(out)])
    assert len(rows) == 1
    r = rows[0]
    assert r["model"] == "resnet18" and r["status"] == "ok", r.get("error")
    assert r["macs_after"] < r["macs_before"] and r["params_after"] < r["params_before"]
    assert 0 < r["groups_pruned"] <= r["groups_total"]
    assert r["shape_ok"] and r["equivalence"] == "ok"
    assert r["compile_s"] > 0 and r["verify_s"] > 0
    text = out.read_text()
    assert "| resnet18 | 64 | ok |" in text and "1 ok / 1 total" in text
    assert out.with_suffix(".json").exists()


def test_vs_torch_pruning_smoke(tmp_path):
    pytest.importorskip("torch_pruning")
    out = tmp_path / "vs.md"
    rows = vs_torch_pruning.main(["--models", "resnet18", "--size", "64", "--quick", "--no-isolate",
                                  "--out", str(out)])
    r = rows[0]
    assert r["fx_status"] == "ok", r.get("fx_error")
    assert r["tp_status"] == "ok", r.get("tp_error")
    assert r["counter"] == "fxprune"
    assert r["fx_macs_after"] < r["macs_before"] and r["tp_macs_after"] < r["macs_before"]
    assert r["tp_s"] > 0 and r["fx_s"] > 0
    assert "TOTAL over the 1 models both handle" in out.read_text()


def test_scaling_smoke(tmp_path):
    rows = scaling.main(["--sizes", "2,4", "--quick", "--no-tp", "--out", str(tmp_path / "s.md")])
    assert [r["n"] for r in rows] == [2, 4]
    for r in rows:
        assert r["fx_error"] is None and r["fx_s"] > 0
        assert r["fx_macs_after"] < r["macs_before"]
        assert r["groups_pruned"] == r["n"] + 1  # one inner group per block + the residual stream
    assert rows[1]["nodes"] > rows[0]["nodes"]


def test_scaling_smoke_tp(tmp_path):
    pytest.importorskip("torch_pruning")
    rows = scaling.main(["--sizes", "2", "--quick", "--out", str(tmp_path / "s.md")])
    r = rows[0]
    assert r["tp_error"] is None and r["tp_s"] > 0
    assert r["tp_macs_after"] < r["macs_before"]


def test_memory_smoke(tmp_path):
    """One fresh process per cell; the extra memory of fxprune on resnet18 includes at least its new weights."""
    rows = memory.main(["--models", "resnet18", "--tools", "fx", "--out", str(tmp_path / "m.md")])
    r = rows[0]
    assert "error" not in r, r.get("error")
    kept = r["params_after"] / r["params_before"]
    assert 0 < kept < 0.6
    assert r["extra"] >= 0.5 * kept * r["model_bytes"]  # the pruned weights are new memory (a loose floor)
    assert "resnet18" in (tmp_path / "m.md").read_text()
