"""The hierarchical front end (fxprune.hierarchical) and structured example inputs.

Oracles: keep-all pruning returns the original model's outputs exactly; removing channels that provably
contribute nothing (BatchNorm gamma = beta = 0 feeding a ReLU... absorbed exactly) leaves the whole model's
outputs unchanged *through the uncaptured control flow*; every region is float64-verified against its masked
reference by compile itself.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import InputError, TraceError
from fxprune.hierarchical import StructuredGraphModule, find_calls


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 12, 3, padding=1, stride=2)
        self.b2 = nn.BatchNorm2d(12)
        self.out_channels = 12

    def forward(self, x):
        a = F.relu(self.b1(self.c1(x)))
        b = F.relu(self.b2(self.c2(a)))
        return {"p1": a[:, :12], "p2": b}  # two "levels" with the interface width


class Head(nn.Module):
    """Called with a *list* of feature maps (a structured argument), shared over the levels."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(12, 24, 3, padding=1)
        self.bn = nn.BatchNorm2d(24)
        self.cls = nn.Conv2d(24, num_classes, 1)
        self.box = nn.Conv2d(24, 4, 1)
        self.num_classes = num_classes

    def forward(self, feats: list[torch.Tensor]):
        out = []
        for f in feats:
            t = F.relu(self.bn(self.conv(f)))
            out.append((self.cls(t), self.box(t)))
        return out


class Detector(nn.Module):
    """Data-dependent post-processing neither torch.fx nor torch.export can capture as one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.head = Head()

    def forward(self, images: list[torch.Tensor]):
        results = []
        for img in images:
            feats = self.backbone(img[None])
            levels = self.head(list(feats.values()))
            scores = torch.cat([c.amax(1).flatten() for c, _ in levels])
            keep = scores > scores.median()  # data-dependent count
            if keep.sum() > 1000:  # a branch on a tensor value
                keep = keep & False
            boxes = torch.cat([b.flatten(2).transpose(1, 2).reshape(-1, 4) for _, b in levels])
            results.append({"boxes": boxes[keep], "scores": scores[keep], "logits": levels[0][0]})
        return results


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _model(seed: int = 0) -> Detector:
    torch.manual_seed(seed)
    return _randomize(Detector(), seed)


def _images(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 16, 16, generator=g), torch.randn(3, 12, 20, generator=g)]


def _same(a, b, atol=0.0) -> bool:
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    return sa == sb and all(x.shape == y.shape and torch.allclose(x, y, atol=atol, rtol=0) for x, y in zip(la, lb))


def test_whole_model_capture_fails_and_auto_prunes_the_regions():
    model, imgs = _model(), _images()
    with pytest.raises(TraceError):
        fxprune.compile(model, (imgs,), ratio=0.5, frontend="whole")
    before = copy.deepcopy(model.state_dict())
    res = fxprune.compile(model, (imgs,), ratio=0.5, verify="equivalence")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    assert type(res.module) is Detector and set(res.regions) == {"backbone", "head"}
    assert any("hierarchical front end" in n for n in res.report.notes)
    bb, head = res.module.backbone, res.module.head
    assert bb.c1.out_channels < 16 and head.conv.out_channels < 24  # internal widths pruned
    assert bb.c2.out_channels == 12 and head.cls.out_channels == 5  # interfaces kept: contracts intact
    assert bb.out_channels == 12 and head.num_classes == 5  # plain attributes carried over
    assert isinstance(head, StructuredGraphModule)  # takes the list again
    assert res.report.params_after < res.report.params_before and res.report.macs_after < res.report.macs_before
    with torch.no_grad():
        out, ref = res.module(imgs), model(imgs)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "logits"} and out[1]["logits"].shape == ref[1]["logits"].shape


def test_whole_model_equals_its_masked_reference_through_uncaptured_code():
    """Oracle: the same model with each region's pruned channels zeroed (masked, not removed)."""
    from fxprune.structured import structured as _structured
    from fxprune.passes.verify import masked_reference

    model, imgs = _model().double(), [x.double() for x in _images()]
    res = fxprune.compile(model, (imgs,), ratio=0.4, absorb=False, frontend="hierarchical")
    masked = copy.deepcopy(model)
    for path, r in res.regions.items():
        ref = masked_reference(r.original, r.analysis, r.selection)
        if isinstance(res.module.get_submodule(path), StructuredGraphModule):
            ref = _structured(ref, res.module.get_submodule(path).fxprune_in_spec, path)
        setattr(masked, path, ref)
    others = [torch.randn(3, 8, 24, dtype=torch.float64)]  # another size and number of images
    with torch.no_grad():
        for x in (imgs, others):
            assert _same(res.module(x), masked(x), atol=1e-10)
    assert res.report.params_after < res.report.params_before


def test_nothing_to_prune_returns_an_unchanged_copy():
    model, imgs = _model(), _images()
    res = fxprune.compile(model, (imgs,), ratio=0.0, frontend="hierarchical")
    assert not res.regions and any("nothing to prune" in n for n in res.report.notes)
    assert res.module is not model
    with torch.no_grad():
        assert _same(res.module(imgs), model(imgs))


def test_removing_dead_channels_leaves_the_whole_model_unchanged():
    """Oracle: channels whose BN has gamma = 0 are constant; removing them (absorbed) changes nothing."""
    model, imgs = _model().double(), [x.double() for x in _images()]
    with torch.no_grad():
        for bn, idx in ((model.backbone.b1, [1, 4, 5, 9, 13]), (model.head.bn, [0, 3, 7, 8, 20])):
            bn.weight[idx] = 0.0
            bn.bias[idx] = 0.0  # output exactly 0 (a nonzero constant is absorbed, approximately at padded borders)
    res = fxprune.compile(model, (imgs,), importance="bn_scale", threshold=0.0, verify="equivalence",
                          frontend="hierarchical")
    assert res.module.head.conv.out_channels == 19
    assert res.module.backbone.c1.out_channels == 16 - 1  # only channel 13: the others feed the p1 interface
    with torch.no_grad():
        assert _same(res.module(imgs), model(imgs), atol=1e-12)


def test_result_trains_saves_and_copies():
    model, imgs = _model(), _images()
    res = fxprune.compile(model, (imgs,), ratio=0.5, frontend="hierarchical")
    m = res.module
    m.train()
    out = m(imgs)
    sum(o["logits"].square().mean() + o["scores"].sum() for o in out).backward()
    assert m.head.conv.weight.grad is not None and m.backbone.c1.weight.grad is not None
    m.eval()
    for clone in (copy.deepcopy(m), torch.load(io.BytesIO(_pickled(m)), weights_only=False)):
        assert isinstance(clone.head, StructuredGraphModule) and clone.head.num_classes == 5
        with torch.no_grad():
            assert _same(clone(imgs), m(imgs))


def _pickled(m: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(m, buf, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    return buf.getvalue()


def test_region_called_with_another_structure_is_a_clear_error():
    res = fxprune.compile(_model(), (_images(),), ratio=0.5, frontend="hierarchical")
    with pytest.raises(InputError, match="structured"):
        res.module.head(torch.randn(1, 12, 4, 4))  # a tensor, not a list


def test_ignore_and_ratios_use_the_models_names():
    model, imgs = _model(), _images()
    res = fxprune.compile(model, (imgs,), ratio=0.5, ignore=["head.conv"], frontend="hierarchical")
    assert res.module.head.conv.out_channels == 24 and res.module.backbone.c1.out_channels < 16
    res = fxprune.compile(model, (imgs,), ratios={"backbone.c1": 0.25}, frontend="hierarchical")
    assert res.module.backbone.c1.out_channels == 12 and "head" not in res.regions


def test_nothing_capturable_raises_one_error_explaining_all_attempts():
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            y = self.a(x)
            return y * 2 if y.sum() > 0 else y

    with pytest.raises(TraceError) as info:
        fxprune.compile(Opaque(), torch.randn(2, 4), ratio=0.5)
    msg = str(info.value)
    assert "neither front end" in msg and "3. no submodule of Opaque" in msg


def test_target_macs_searches_one_ratio_over_the_regions():
    model, imgs = _model(), _images()
    res = fxprune.compile(model, (imgs,), target_macs=0.6, frontend="hierarchical", verify="equivalence")
    rep = res.report
    assert rep.macs_after <= 0.6 * rep.macs_before
    looser = fxprune.compile(model, (imgs,), ratio=_ratio_of(res) - 2 ** -7, frontend="hierarchical")
    assert looser.report.macs_after > 0.6 * looser.report.macs_before  # the smallest ratio on the grid
    with pytest.raises(fxprune.errors.ConfigError, match="not reachable"):
        fxprune.compile(model, (imgs,), target_macs=0.01, frontend="hierarchical")
    with pytest.raises(fxprune.errors.ConfigError, match="fraction"):
        fxprune.compile(model, (imgs,), target_macs=1e5, frontend="hierarchical")


def _ratio_of(res) -> float:
    note = next(n for n in res.report.notes if n.startswith("target_macs="))
    return float(note.split("ratio ")[1].split()[0])


def test_calls_are_recorded_with_their_structure():
    model, imgs = _model(), _images()
    calls, out = find_calls(copy.deepcopy(model), (imgs,), lambda m: not isinstance(m, nn.Conv2d))
    assert len(out) == 2
    assert calls["head"].count == 2 and not calls["head"].plain and calls["head"].same_structure
    assert calls["backbone"].plain and len(calls["backbone"].leaves) == 1
    assert "backbone.c1" not in calls  # a single layer with a rule is never a region: not recorded


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 10)
        self.b = nn.Linear(4, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.out(F.relu(self.a(batch["x"]) + self.b(batch["y"])))


def test_structured_example_inputs_on_the_whole_graph_path():
    torch.manual_seed(0)
    model = DictModel().eval()
    batch = {"x": torch.randn(5, 6), "y": torch.randn(5, 4)}
    res = fxprune.compile(model, (batch,), ratio=0.5, verify="equivalence")
    assert not res.regions and res.module.a.out_features == 5
    out = res.module({"x": torch.randn(2, 6), "y": torch.randn(2, 4)})
    assert out.shape == (2, 3)
    with pytest.raises(InputError, match="in tuples, lists and dicts only; found object"):
        fxprune.compile(model, ({"x": batch["x"], "n": object()},), ratio=0.5)
    # a constant leaf (None, a number, a flag) is baked into the graph: the graph result insists on it
    res = fxprune.compile(model, ({**batch, "n": 3},), ratio=0.5, result="graph")
    assert res.module({"x": batch["x"], "y": batch["y"], "n": 3}).shape == (5, 3)
    with pytest.raises(InputError, match="baked in"):
        res.module({"x": batch["x"], "y": batch["y"], "n": 4})


def test_torchvision_detector_keeps_its_head_contracts():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, min_size=96, max_size=96, rpn_post_nms_top_n_test=50,
        box_detections_per_img=20, box_score_thresh=0.0).eval()
    imgs = [torch.rand(3, 96, 96)]
    res = fxprune.compile(model, (imgs,), ratio=0.5, frontend="hierarchical")
    assert {"backbone", "rpn.head", "roi_heads.box_head"} <= set(res.regions)
    m = res.module
    assert m.backbone.out_channels == 256 and m.roi_heads.box_predictor.cls_score.out_features == 91
    assert res.report.params_after < 0.6 * res.report.params_before
    with torch.no_grad():
        out = m([torch.rand(3, 96, 80)])
    assert set(out[0]) == {"boxes", "labels", "scores"} and out[0]["boxes"].shape[1:] == (4,)
    assert 0 < len(out[0]["boxes"]) <= 20  # detections (score threshold 0), within the per-image limit


def test_fxprune_save_and_load_rebuild_the_regions(tmp_path):
    model, imgs = _model(), _images()
    res = fxprune.compile(model, (imgs,), ratio=0.5, frontend="hierarchical")
    path = tmp_path / "det.pt"
    fxprune.save(res, path)
    body = torch.load(path, weights_only=True)  # plain data, no code
    assert [r["path"] for r in body["regions"]] == ["backbone", "head"]
    loaded = fxprune.load(path, _model(seed=5))  # a fresh instance, other weights
    assert type(loaded) is Detector and isinstance(loaded.head, StructuredGraphModule)
    with torch.no_grad():
        assert _same(loaded(imgs), res.module(imgs))
    with pytest.raises(fxprune.errors.FxpruneError):
        fxprune.load(path, DictModel())


def test_data_driven_criteria_calibrate_each_region_on_what_reaches_it():
    model, imgs = _model(), _images()
    g = torch.Generator().manual_seed(3)
    calib = [([torch.randn(3, 16, 16, generator=g)],) for _ in range(4)]
    res = fxprune.compile(model, (imgs,), importance="thinet", calib=calib, ratio=0.5, verify="equivalence",
                          frontend="hierarchical")
    assert set(res.regions) == {"backbone", "head"}
    head_calib = res.regions["head"].context.calib
    assert len(head_calib) == 4 and len(head_calib[0]) == 2  # one batch per image, two levels each
    assert head_calib[0][1].shape == (1, 12, 8, 8)
    assert res.module.head.conv.out_channels == 12
    with pytest.raises(InputError, match="calib batch 0"):
        fxprune.compile(model, (imgs,), importance="thinet", calib=[torch.randn(2, 2)], ratio=0.5,
                        frontend="hierarchical")
