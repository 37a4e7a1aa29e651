"""The command line: inspect / prune / bench in-process via main([...]), once as `python -m fxprune` in a
subprocess; calibration data specs; error exits; the latency benchmark script on a tiny configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.cli import build_model, calibration_data, main, parse_shape

ROOT = Path(__file__).resolve().parents[1]

USER_FILE = textwrap.dedent("""
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.c1 = nn.Conv2d(1, width, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(width)
            self.c2 = nn.Conv2d(width, width, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(width)
            self.fc = nn.Linear(width, 10)

        def forward(self, x):
            y = F.relu(self.bn1(self.c1(x)))
            y = F.relu(y + self.bn2(self.c2(y)))
            return self.fc(y.mean((2, 3)))

    def make(width=8):
        torch.manual_seed(0)
        m = Net(width)
        with torch.no_grad():
            for bn in (m.bn1, m.bn2):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2)
        return m.eval()

    def example_inputs():
        return torch.randn(1, 1, 8, 8)
""")


@pytest.fixture
def user_file(tmp_path) -> Path:
    p = tmp_path / "user_net.py"
    p.write_text(USER_FILE)
    return p


def test_inspect_user_file(user_file, capsys):
    assert main(["inspect", f"{user_file}:make"]) == 0
    out = capsys.readouterr().out
    assert "channel groups" in out and "per layer" in out
    gm, _ = fxprune.prepare(build_model(f"{user_file}:make")[0], torch.randn(1, 1, 8, 8))
    from fxprune.passes.group import analyze_graph

    analysis = analyze_graph(gm, unknown="block")
    for g in analysis.groups:  # every group is printed with its members
        assert f"group {g.id}: {g.size} units, root {g.root}" in out
        for p in g.params:
            assert str(p) in out
    assert "not prunable: all channels pinned: network output" in out  # the classifier, and why
    assert main(["inspect", f"{user_file}:make", "--json"]) == 0
    data = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert len(data["groups"]) == len(analysis.groups)
    assert {r["name"] for r in data["layers"]} >= {"c1", "c2", "fc"}
    assert sum(r["params"] for r in data["layers"]) == data["params"]


def test_prune_writes_a_loadable_model_and_reports(user_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["prune", f"{user_file}:make", "--ratio", "0.5", "--out", str(out), "--no-progress",
               "--model-kwargs", '{"width": 8}'])
    assert rc == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} >= {"model.pt", "report.md", "report.json", "groups.html", "groups.dot"}
    spec = f"{user_file}:make"
    loaded = fxprune.load(out / "model.pt", build_model(spec)[0])
    # the CLI result is exactly what compile gives with the same options
    ref = fxprune.compile(build_model(spec)[0], torch.randn(1, 1, 8, 8), ratio=0.5)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref.module(x))
    rep = json.loads((out / "report.json").read_text())
    assert rep["params_after"] == sum(p.numel() for p in loaded.parameters()) < rep["params_before"]
    assert rep["model"] == spec and rep["groups"] and rep["layers"]
    body = torch.load(out / "model.pt", weights_only=True)
    assert body["meta"]["model"] == spec and body["meta"]["input_shape"] == [1, 1, 8, 8]
    md = (out / "report.md").read_text()
    assert "| `c1` | Conv2d | (8, 1, 3, 3) | (4, 1, 3, 3) ✂ |" in md
    assert "<svg" in (out / "groups.html").read_text()
    assert (out / "groups.dot").read_text().startswith("digraph fxprune {")


def test_prune_torchvision_resnet18(tmp_path, capsys):
    import torchvision

    out = tmp_path / "r18"
    assert main(["prune", "torchvision:resnet18", "--ratio", "0.5", "--out", str(out), "--input-shape", "1,3,32,32",
                 "--no-progress"]) == 0
    m = fxprune.load(out / "model.pt", torchvision.models.resnet18())
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
    assert m.get_submodule("layer1.0.conv1").out_channels == 32
    assert "3.7" in capsys.readouterr().out  # ~3.7x fewer MACs at ratio 0.5


def test_prune_with_calibration_and_target_macs(user_file, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["prune", f"{user_file}:make", "--target-macs", "0.5", "--calib", "digits", "--calib-batches", "2",
               "--out", str(out), "--no-progress", "--verify", "equivalence"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["macs_after"] <= 0.5 * rep["macs_before"]


def test_calibration_data_specs():
    for spec in ("digits", "mnist"):
        batches = calibration_data(spec, (1, 3, 16, 16), batches=3, batch_size=5, seed=1)
        assert len(batches) == 3
        for x, y in batches:
            assert x.shape == (5, 3, 16, 16) and y.shape == (5,) and torch.isfinite(x).all()
            assert torch.equal(x[:, 0], x[:, 2])  # grey images repeated over the input channels
        labels = torch.cat([y for _, y in batches])
        assert len(labels.unique()) > 3, "mnist rows are grouped by class: the batches must be shuffled"
        allx = torch.cat([x for x, _ in batches])
        assert abs(float(allx.mean())) < 0.5
    with pytest.raises(fxprune.ConfigError, match="digits, mnist or folder"):
        calibration_data("imagenet", (1, 3, 8, 8))
    with pytest.raises(fxprune.ConfigError, match="image model"):
        calibration_data("digits", (1, 16))


def test_calibration_from_image_folder(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 12), (40 * i, 100, 200 if cls == "a" else 0)).save(tmp_path / cls / f"{i}.png")
    batches = calibration_data(f"folder:{tmp_path}", (1, 3, 8, 8), batches=5, batch_size=4)
    assert sum(len(x) for x, _ in batches) == 6 and batches[0][0].shape[1:] == (3, 8, 8)
    with pytest.raises(fxprune.ConfigError, match="not a directory"):
        calibration_data(f"folder:{tmp_path / 'nope'}", (1, 3, 8, 8))


def test_errors_exit_2_with_a_clear_message(user_file, tmp_path, capsys):
    cases = [
        (["inspect", "torchvision:resnet_nope"], "no model 'resnet_nope'"),
        (["inspect", "nofile.py:make"], "does not exist"),
        (["inspect", f"{user_file}:nothing"], "no callable 'nothing'"),
        (["inspect", "resnet18"], "must be torchvision:NAME"),
        (["prune", f"{user_file}:make", "--out", str(tmp_path), "--ratio", "0.5", "--target-macs", "0.5"], "exactly one"),
        (["prune", f"{user_file}:make", "--out", str(tmp_path), "--ratio", "1.5"], "ratio"),
        (["inspect", f"{user_file}:make", "--input-shape", "1,a"], "integers"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") <= 3, (argv, err)
    (tmp_path / "noinputs.py").write_text("import torch\ndef make():\n    return torch.nn.Linear(3, 2)\n")
    assert main(["inspect", f"{tmp_path / 'noinputs.py'}:make"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert parse_shape("1x3x8x8") == (1, 3, 8, 8)


def test_bench(user_file, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["prune", f"{user_file}:make", "--ratio", "0.5", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["bench", f"{user_file}:make", "--ratio", "0.5", "--pruned", str(out / "model.pt"), "--batch", "2",
                 "--repeats", "2", "--warmup", "1", "--threads", "1", "--no-progress"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + 3  # header, original, loaded, ratio 0.5
    orig, loaded, ratio = lines[1:]
    assert "| 1.00× |" in orig and "loaded model.pt" in loaded
    assert loaded.split("|")[3] == ratio.split("|")[3]  # same MACs ratio: the saved model is the ratio-0.5 one


def test_python_dash_m_subprocess(user_file):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "fxprune", "inspect", f"{user_file}:make", "--brief"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "root c1" in proc.stdout and "channel groups" in proc.stdout


def test_latency_benchmark_smoke(tmp_path):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import latency

    rows = latency.main(["--models", "small_cnn", "--ratios", "0.5", "--round-to", "1,8", "--repeats", "2",
                         "--warmup", "0", "--batch", "1", "--threads", "1", "--out", str(tmp_path / "lat.md")])
    assert [r["round_to"] for r in rows] == [1, 8]
    for r in rows:
        assert r["macs_ratio"] > 2 and r["ms_pruned"] > 0 and r["efficiency"] == pytest.approx(r["speedup"] / r["macs_ratio"])
    text = (tmp_path / "lat.md").read_text()
    assert "measured speed-up" in text and "round_to=8" in text
