"""fxprune.save / fxprune.load: exact round trips (in-process and in a fresh process), no pickled code,
tampered and truncated files rejected, wrong architectures rejected, iterative plans; other export routes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.serialize import ArchitectureMismatchError, FormatError, _selection_for, _step
from fxprune.testing import random_selection, snapshot, assert_model_unchanged

from models import Residual, build

ROUND_TRIP = ["residual", "concat", "split", "grouped", "depthwise", "flatten_linear", "shared", "mha", "multi_io"]


def _outputs(m, xs):
    with torch.no_grad():
        y = m(*xs)
    return list(y) if isinstance(y, (tuple, list)) else [y]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_exact(name, tmp_path):
    model, xs = build(name, seed=1)
    res = fxprune.compile(model, xs, ratio=0.5, verify="none")
    assert res.selection.keep, "nothing was pruned: the round trip would prove little"
    path = tmp_path / "m.pt"
    fxprune.save(res, path)
    fresh, _ = build(name, seed=7)  # same architecture, different weights: the file's weights must win
    snap = snapshot(fresh)
    loaded = fxprune.load(path, fresh)
    assert _same(_outputs(loaded, xs), _outputs(res.module, xs))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in res.module.state_dict().items()}
    assert_model_unchanged(fresh, snap)
    assert loaded.training == res.module.training


def test_file_is_plain_data_weights_only(tmp_path):
    model, xs = build("residual")
    res = fxprune.compile(model, xs, ratio=0.5)
    path = tmp_path / "m.pt"
    fxprune.save(res, path, meta={"source": "tests.models:Residual", "note": [1, 2.5, None]})
    body = torch.load(path, weights_only=True)
    assert body["format"] == "fxprune" and body["meta"]["source"] == "tests.models:Residual"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return isinstance(x, (str, int, float, bool, type(None), torch.Tensor))

    assert plain(body)
    # the per-tensor plan is what keep_fn says, and the state dict is the pruned module's
    keep_of = res.analysis.keep_fn(res.selection)
    for name, dims in body["steps"][0]["params"].items():
        for d, idx in dims.items():
            assert idx == np.flatnonzero(keep_of(("p", name, int(d)))).tolist()
    for k, v in res.module.state_dict().items():
        assert torch.equal(body["state_dict"][k], v)


def test_fresh_process_round_trip(tmp_path):
    src = tmp_path / "user_model.py"
    src.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        import torch.nn.functional as F

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.c1 = nn.Conv2d(3, 12, 3, padding=1)
                self.bn = nn.BatchNorm2d(12)
                self.c2 = nn.Conv2d(12, 10, 3, padding=1)
                self.fc = nn.Linear(10, 4)

            def forward(self, x):
                x = F.relu(self.bn(self.c1(x)))
                x = F.relu(self.c2(x) + x[:, :10])
                return self.fc(x.mean((2, 3)))
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import user_model
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    net = user_model.Net().eval()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 3, 8, 8)
    res = fxprune.compile(net, x, ratio=0.4)
    fxprune.save(res, tmp_path / "m.pt")
    torch.save({"x": x}, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch, fxprune
        sys.path.insert(0, {str(tmp_path)!r})
        import user_model
        m = fxprune.load({str(tmp_path / 'm.pt')!r}, user_model.Net())
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)["x"]
        with torch.no_grad():
            torch.save({{"y": m(x)}}, {str(tmp_path / 'y.pt')!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    y = torch.load(tmp_path / "y.pt", weights_only=True)["y"]
    with torch.no_grad():
        assert torch.equal(y, res.module(x))


@pytest.fixture
def saved(tmp_path):
    model, xs = build("residual", seed=3)
    res = fxprune.compile(model, xs, ratio=0.5)
    path = tmp_path / "m.pt"
    fxprune.save(res, path)
    return res, path, xs


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1 :]


def test_flipped_byte_in_weights_rejected(saved, tmp_path):
    res, path, xs = saved
    data = path.read_bytes()
    weight = res.module.state_dict()["c1.weight"].contiguous()
    raw = weight.view(-1).view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at > 0, "the tensor's bytes are stored verbatim in the file"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(_flip(data, at + len(raw) // 2))
    with pytest.raises(FormatError, match="checksum|not a readable"):
        fxprune.load(bad, build("residual")[0])


def test_flipped_byte_in_plan_rejected(saved, tmp_path):
    _, path, _ = saved
    data = path.read_bytes()
    at = data.find(b"data.pkl")  # the pickle record with the plan follows its file name
    bad = tmp_path / "bad.pt"
    for off in (80, 200, 400):
        bad.write_bytes(_flip(data, at + off))
        with pytest.raises(FormatError):
            fxprune.load(bad, build("residual")[0])


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.9, 0.999])
def test_truncated_file_rejected(saved, tmp_path, frac):
    _, path, _ = saved
    data = path.read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: int(len(data) * frac)])
    with pytest.raises(FormatError):
        fxprune.load(bad, build("residual")[0])


def test_edited_tensor_and_plan_rejected(saved, tmp_path):
    _, path, _ = saved
    body = torch.load(path, weights_only=True)
    body["state_dict"]["head.bias"][0] += 1.0
    torch.save(body, tmp_path / "t.pt")
    with pytest.raises(FormatError, match="checksum"):
        fxprune.load(tmp_path / "t.pt", build("residual")[0])
    body = torch.load(path, weights_only=True)
    g = body["steps"][0]["groups"][0]
    g["keep"] = g["keep"][:-1]
    torch.save(body, tmp_path / "p.pt")
    with pytest.raises(FormatError, match="checksum"):
        fxprune.load(tmp_path / "p.pt", build("residual")[0])


def test_pickled_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "fxprune", "version": 1, "payload": Evil()}, path)
    with pytest.raises(FormatError):
        fxprune.load(path, build("residual")[0])
    assert not marker.exists()
    # a whole pickled module (torch.save(module)) is not a model file either
    torch.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "gm.pt")
    with pytest.raises(FormatError):
        fxprune.load(tmp_path / "gm.pt", build("residual")[0])
    with pytest.raises(FormatError, match="not an fxprune"):
        torch.save({"a": torch.zeros(2)}, tmp_path / "other.pt")
        fxprune.load(tmp_path / "other.pt", build("residual")[0])


def test_wrong_architecture_rejected(saved):
    _, path, xs = saved
    with pytest.raises(ArchitectureMismatchError, match=r"has shape \[6\], saved \[8\]"):
        fxprune.load(path, Residual(c=6).double())
    with pytest.raises(ArchitectureMismatchError):
        fxprune.load(path, build("concat")[0])

    class NoSkip(Residual):  # same tensors, different wiring: the channel groups differ
        def forward(self, x):
            x = F.relu(self.bn0(self.stem(x)))
            y = F.relu(self.b1(self.c1(x)))
            return self.head(F.relu(self.b2(self.c2(y))).mean((2, 3)))

    with pytest.raises(ArchitectureMismatchError, match="different graph"):
        fxprune.load(path, NoSkip().double())
    # without the graph check the per-tensor plan still applies (it is a valid pruning of NoSkip too)
    m = fxprune.load(path, NoSkip().double(), check_graph=False)
    assert m.get_submodule("c2").out_channels == saved[0].module.get_submodule("c2").out_channels
    with pytest.raises(fxprune.InputError):
        fxprune.load(path, "not a model")
    with pytest.raises(fxprune.InputError, match="no such"):
        fxprune.load(path.with_name("missing.pt"), Residual())


def test_iterative_plan(tmp_path):
    model, xs = build("residual", seed=2)
    r1 = fxprune.compile(model, xs, ratio=0.3)
    r2 = fxprune.compile(r1.module, xs, ratio=0.3, importance="l1")
    assert r2.report.params_after < r1.report.params_after
    fxprune.save([r1, r2], tmp_path / "it.pt")
    loaded = fxprune.load(tmp_path / "it.pt", build("residual", seed=5)[0])
    assert _same(_outputs(loaded, xs), _outputs(r2.module, xs))
    with pytest.raises(fxprune.ConfigError, match="step 1"):
        fxprune.save([r2, r1], tmp_path / "bad.pt")
    # saving only the last step needs its own input: the pruned module, not the original architecture
    fxprune.save(r2, tmp_path / "last.pt")
    with pytest.raises(ArchitectureMismatchError):
        fxprune.load(tmp_path / "last.pt", build("residual")[0])


def test_save_bad_arguments(saved, tmp_path):
    res, _, _ = saved
    with pytest.raises(fxprune.ConfigError, match="CompileResult"):
        fxprune.save(res.module, tmp_path / "x.pt")
    with pytest.raises(fxprune.ConfigError, match="plain data"):
        fxprune.save(res, tmp_path / "x.pt", meta={"f": lambda: 1})
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("name", ["residual", "concat", "grouped", "flatten_linear", "mha"])
@pytest.mark.parametrize("seed", [0, 1])
def test_mask_fallback_rebuilds_the_same_plan(name, seed):
    """When group ids cannot be matched, the selection rebuilt from per-tensor masks is the same plan."""
    model, xs = build(name, seed)
    gm, _ = fxprune.prepare(model, xs)
    from fxprune.passes.group import analyze_graph

    analysis = analyze_graph(gm)
    sel = random_selection(analysis, seed=seed)

    class R:  # the fields _step reads
        pass

    r = R()
    r.analysis, r.selection, r.original, r.pipeline = analysis, sel, gm, fxprune.Pipeline(())
    step = _step(r)
    step["n_groups"] = -1  # force the fallback
    rebuilt = _selection_for(step, analysis, gm.state_dict(), 0)
    a, b = analysis.keep_fn(sel), analysis.keep_fn(rebuilt)
    for k, t in gm.state_dict().items():
        for d in range(t.dim()):
            ka, kb = a(("p", k, d)), b(("p", k, d))
            assert (ka is None and kb is None) or np.array_equal(ka, kb), (k, d)


def test_torch_save_and_export_of_pruned_module():
    model, xs = build("residual", dtype=torch.float32)
    res = fxprune.compile(model, xs, ratio=0.5)
    buf = io.BytesIO()
    torch.save(res.module, buf)
    buf.seek(0)
    gm = torch.load(buf, weights_only=False)
    assert _same(_outputs(gm, xs), _outputs(res.module, xs))
    ep = torch.export.export(res.module, xs)
    assert torch.allclose(ep.module()(*xs), res.module(*xs), atol=1e-6)


def test_onnx_export(tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'fxprune[onnx]')")
    pytest.importorskip("onnxscript", reason="the torch.onnx exporter needs onnxscript")
    model, xs = build("residual", dtype=torch.float32)
    res = fxprune.compile(model, xs, ratio=0.5)
    path = tmp_path / "m.onnx"
    torch.onnx.export(res.module, xs, str(path), dynamo=True)
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    init = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    assert res.module.get_submodule("c1").weight.shape[0] in {d[0] for d in init.values() if d}


class _ZeroGamma(nn.Module):
    """BN channels with γ = 0 output β: pruning them makes the absorb post-pass give c2 a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, bias=False)
        self.c3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.c3(F.relu(self.c2(F.relu(self.bn(self.c1(x))))))


def _zero_gamma(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = _ZeroGamma().double().eval()
    with torch.no_grad():
        m.bn.weight[[1, 4, 6]] = 0.0
        m.bn.bias.uniform_(0.5, 1.0)
    return m


def test_round_trip_with_post_pass_parameters(tmp_path):
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    r1 = fxprune.compile(_zero_gamma(0), x, importance="bn_scale", ratio=0.375)
    assert r1.module.get_submodule("c2").bias is not None, "absorb did not add a bias; the test needs it"
    fxprune.save(r1, tmp_path / "a.pt")
    body = torch.load(tmp_path / "a.pt", weights_only=True)
    assert body["steps"][0]["added_params"] == [["c2.bias", [6], True]]
    loaded = fxprune.load(tmp_path / "a.pt", _zero_gamma(3))
    assert _same(_outputs(loaded, (x,)), _outputs(r1.module, (x,)))
    # as an intermediate step of an iterative run
    r2 = fxprune.compile(r1.module, x, ratio=0.5)
    fxprune.save([r1, r2], tmp_path / "b.pt")
    loaded = fxprune.load(tmp_path / "b.pt", _zero_gamma(4))
    assert _same(_outputs(loaded, (x,)), _outputs(r2.module, (x,)))


def test_post_pass_that_changes_structure_is_refused(tmp_path):
    model, xs = build("residual")

    @fxprune.graph_pass(name="add_module")
    def add_module(gm, ctx):
        gm.add_submodule("extra", nn.Linear(2, 2))
        return fxprune.PassResult(gm, True, {})

    res = fxprune.compile(model, xs, pipeline=["group", "importance", "select(ratio=0.5)", "rewrite", add_module])
    with pytest.raises(fxprune.ConfigError, match="extra.weight"):
        fxprune.save(res, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_plan_mask_check_rejects_inconsistent_plans():
    from fxprune.serialize import _check_masks
    from fxprune.passes.group import analyze_graph

    model, xs = build("concat")
    gm, _ = fxprune.prepare(model, xs)
    analysis = analyze_graph(gm)
    sel = random_selection(analysis, seed=4)

    class R:
        pass

    r = R()
    r.analysis, r.selection, r.original, r.pipeline = analysis, sel, gm, fxprune.Pipeline(())
    step = _step(r)
    _check_masks(step, analysis, sel, gm.state_dict(), 0)  # consistent: no error
    name, dims = next(iter(step["params"].items()))
    d, idx = next(iter(dims.items()))
    dims[d] = idx[:-1]
    with pytest.raises(ArchitectureMismatchError, match=name):
        _check_masks(step, analysis, sel, gm.state_dict(), 0)


def test_round_trip_torch_export_frontend(tmp_path):
    import inspect

    if "frontend" not in inspect.signature(fxprune.compile).parameters:
        pytest.skip("this fxprune has no torch.export front end")
    model, xs = build("residual", seed=1, dtype=torch.float32)
    res = fxprune.compile(model, xs, ratio=0.5, frontend="export")
    fxprune.save(res, tmp_path / "e.pt")
    assert torch.load(tmp_path / "e.pt", weights_only=True)["steps"][0]["frontend"] == "export"
    loaded = fxprune.load(tmp_path / "e.pt", build("residual", seed=4, dtype=torch.float32)[0])
    assert _same(_outputs(loaded, xs), _outputs(res.module, xs))
