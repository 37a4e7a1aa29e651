"""Op rules the timm architectures need, on small hand-built equivalents (timm itself is not needed):

* roll / flip (Swin's shifted windows on NHWC tensors): rolled dims pinned, the others pass through;
* tensor creation sized at run time (EdgeNeXt's positional encoding ``torch.zeros((B, H, W))``): a constant
  fill follows the dims it was sized from; sizes feeding values or arithmetic pin their source; literal
  sizes are constants;
* ``F.group_norm`` as a function (PoolFormer's GroupNorm1): whole groups prune exactly, one group is lossy;
* ``F.conv2d`` with a weight computed at run time (NF-ResNet's ScaledStdConv2d): filters prune exactly,
  input channels are lossy (the standardisation's statistics span them);
* float64 verification of models that build float32 tensors at run time (RAFT's coordinate grids).

Oracles: the masked reference (``verify="equivalence"`` / ``assert_prune_equivalent``), and hand-built
naive references for group norm and the standardised convolution.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.passes.verify import promote_float_dtype
from fxprune.testing import assert_prune_equivalent, random_selection


def img(c: int = 3, hw: int = 6, n: int = 2) -> torch.Tensor:
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(0))


def kept(res, name: str) -> int:
    """Output channels of module ``name`` of the pruned result (its weight's dim 0)."""
    return res.module.get_submodule(name).weight.shape[0]


# ---------------------------------------------------------------------------------------------------------
# roll / flip


class RollNet(nn.Module):
    """conv(3→8) → roll → conv(8→4) → linear; ``mode`` picks where the roll acts."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 6)
        self.c = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.a(x)
        if self.mode == "channel":
            y = torch.roll(y, 1, dims=1)
        elif self.mode == "nchw":
            y = torch.roll(y, shifts=(1, -2), dims=(2, 3)).flip(3)
        elif self.mode == "flat":
            y = y.roll(5)  # no dims: over the flattened tensor
        y = self.b(y).permute(0, 2, 3, 1)  # NHWC, channels last (Swin)
        y = self.fc(torch.roll(y, shifts=(-1, -1), dims=(1, 2)).flip([2]))
        return self.c(y.permute(0, 3, 1, 2))


@pytest.mark.parametrize("mode", ["nchw", "channel", "flat"])
def test_roll_pins_the_rolled_dims_only(mode):
    res = fxprune.compile(RollNet(mode), img(), ratio=0.5, verify="equivalence")
    assert kept(res, "b") == 3  # NHWC roll over H, W: its channels (last dim) prune
    assert kept(res, "a") == (4 if mode == "nchw" else 8)  # a roll over the channels keeps them whole
    if mode != "nchw":
        assert any("moves positions along dim 1" in why for _, why in res.report.blocked)


def test_roll_flip_method_spellings_and_random_selections():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x).flip(2, 3).roll(2, 3).roll(shifts=1, dims=-2)
            # (C, N, H, W): fliplr and flipud flip the batch dim; the channels stay prunable
            return self.b(torch.flipud(torch.fliplr(y.transpose(0, 1)).transpose(0, 1)))

    for seed in range(3):
        chk = assert_prune_equivalent(M(), img(), lambda a, s=seed: random_selection(a, s, ratio=0.5))
        assert chk.module.get_submodule("a").out_channels == 4


def test_channel_flip_pins_and_spatial_flip_passes():
    class M(nn.Module):
        def __init__(self, dims):
            super().__init__()
            self.dims = dims
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.flip(self.a(x), self.dims))

    assert kept(fxprune.compile(M([1]), img(), ratio=0.5, verify="equivalence"), "a") == 8
    assert kept(fxprune.compile(M([2, 3]), img(), ratio=0.5, verify="equivalence"), "a") == 4


# ---------------------------------------------------------------------------------------------------------
# creation ops


class PosEnc(nn.Module):
    """EdgeNeXt's positional encoding: a mask created from the (B, H, W) of an activation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Conv2d(4, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        b, c, h, w = y.shape
        mask = ~torch.zeros((b, h, w)).to(device=self.proj.weight.device, dtype=torch.bool)
        ye = mask.cumsum(1, dtype=torch.float32) / h
        xe = mask.cumsum(2, dtype=torch.float32) / w
        pos = torch.stack([ye.sin(), ye.cos(), xe.sin(), xe.cos()], 1)
        return self.b(y + self.proj(pos.to(y.dtype)))


def test_positional_encoding_sized_from_input_prunes():
    res = fxprune.compile(PosEnc(), img(), ratio=0.5, verify="equivalence")
    assert kept(res, "a") == 4 and kept(res, "proj") == 4


class Created(nn.Module):
    """conv(3→8) → y + created(…); ``how`` says how the created tensor is sized."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        c = y.shape[1]
        t = {
            "follow": lambda: torch.ones(1, c, 1, 1) * 2,
            "follow_size": lambda: torch.full((y.size(1), 1, 1), 0.5),
            "follow_new": lambda: y.new_zeros(y.shape[:2] + (1, 1)) + 1,
            "follow_like": lambda: torch.ones_like(y),
            "literal": lambda: torch.ones(1, 8, 1, 1, dtype=y.dtype) * 2,  # a node with a literal size
            "constant": lambda: torch.ones(1, 8, 1, 1) * 2,  # folded by tracing: a constant, sliced like a weight
            "arange": lambda: torch.arange(c, dtype=y.dtype).view(1, -1, 1, 1),
            "fill_value": lambda: torch.full((1, 1, 1, 1), c, dtype=y.dtype),
            "arithmetic": lambda: torch.ones(1, c // 2, 1, 1).repeat(1, 2, 1, 1),
        }[self.how]()
        return self.b(y * t)


@pytest.mark.parametrize("how,a_kept", [("follow", 4), ("follow_size", 4), ("follow_new", 4), ("follow_like", 4),
                                        ("literal", 4), ("constant", 4), ("arange", 8), ("fill_value", 8), ("arithmetic", 8)])
def test_created_tensor_follows_or_pins(how, a_kept):
    res = fxprune.compile(Created(how), img(), ratio=0.5, verify="equivalence")
    assert kept(res, "a") == a_kept
    if how == "literal":  # a fill's literal size is patched in the graph; the user's forward still says 8
        assert res.report.form == "GraphModule" and "could not be kept" in " ".join(res.report.notes)
    x = img(hw=5)  # the pruned module recomputes run-time sizes on another input size
    assert res.module(x).shape == (2, 4, 5, 5)


# ---------------------------------------------------------------------------------------------------------
# F.group_norm


class GN(nn.Module):
    def __init__(self, groups: int, c: int = 8) -> None:
        super().__init__()
        self.groups = groups
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.w = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c))
        self.b = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.b(F.group_norm(self.a(x), self.groups, self.w, self.bias, 1e-5))


def _gn_by_hand(m: GN, keep: list[int], groups: int, x: torch.Tensor) -> torch.Tensor:
    """Naive reference: slice the weights by hand, group norm with ``groups`` groups."""
    idx = torch.tensor(keep)
    y = F.conv2d(x, m.a.weight[idx], m.a.bias[idx], padding=1)
    y = F.group_norm(y, groups, m.w[idx], m.bias[idx], 1e-5)
    return F.conv2d(y, m.b.weight[:, idx], m.b.bias)


def test_functional_group_norm_prunes_whole_groups_exactly():
    torch.manual_seed(0)
    m = GN(4).double()
    x = img().double()
    res = fxprune.compile(m, x, ratio=0.5, verify="equivalence")
    g = next(g for g in res.analysis.groups if any(p.param == "a.weight" for p in g.params))
    assert g.size == 4 and g.prunable  # one unit per norm group of 2 channels
    w = res.module.get_submodule("a").weight
    keep = [i for i in range(8) if any(torch.equal(w[j], m.a.weight[i]) for j in range(w.shape[0]))]
    assert len(keep) == 4 and all(keep[k] // 2 == keep[k + 1] // 2 for k in (0, 2))  # whole groups
    torch.testing.assert_close(res.module(x), _gn_by_hand(m, keep, 2, x), rtol=1e-10, atol=1e-12)
    assert ", 2, " in res.graph_module.code  # num_groups patched 4 -> 2


def test_functional_group_norm_one_per_channel_patches_groups():
    m = GN(8).double()
    res = fxprune.compile(m, img().double(), ratio=0.5, verify="equivalence")
    assert kept(res, "a") == 4 and ", 4, " in res.graph_module.code


def test_functional_group_norm_single_group_is_lossy():
    res = fxprune.compile(GN(1), img(), ratio=0.5)
    assert kept(res, "a") == 8
    assert any("allow_lossy" in why for _, why in res.report.blocked)
    res = fxprune.compile(GN(1), img(), ratio=0.5, allow_lossy=True, verify="equivalence")
    assert kept(res, "a") == 4
    assert any("skipped" in n for n in res.report.notes)


# ---------------------------------------------------------------------------------------------------------
# functional convolution with a standardised weight (ScaledStdConv2d)


class StdConv(nn.Conv2d):
    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdNet(nn.Module):
    def __init__(self, std_consumer: bool) -> None:
        super().__init__()
        self.a = StdConv(3, 8, 3, padding=1)
        self.b = StdConv(8, 6, 1) if std_consumer else nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))


def test_standardised_conv_filters_prune_exactly():
    torch.manual_seed(0)
    m = StdNet(std_consumer=False).double()
    x = img().double()
    res = fxprune.compile(m, x, ratio=0.5, verify="equivalence")
    assert kept(res, "a") == 4 and kept(res, "b") == 3
    # naive reference: standardise the kept filters of a by hand
    w = res.module.get_submodule("a").weight
    keep = [i for i in range(8) if any(torch.equal(w[j], m.a.weight[i]) for j in range(4))]
    wa = m.a.weight[keep]
    wa = (wa - wa.mean((1, 2, 3), keepdim=True)) / torch.sqrt(wa.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-6)
    y = F.relu(F.conv2d(x, wa, m.a.bias[keep], padding=1))
    kb = res.module.get_submodule("b")
    got = res.module.get_submodule("fc")(F.relu(kb(y)).mean((2, 3)))
    torch.testing.assert_close(res.module(x), got, rtol=1e-10, atol=1e-12)


def test_standardised_conv_input_channels_are_lossy():
    res = fxprune.compile(StdNet(std_consumer=True), img(), ratio=0.5)
    assert kept(res, "a") == 8  # consumed by a standardised conv: its statistics span the input channels
    assert any("statistics computed by the call" in why for _, why in res.report.blocked)
    assert kept(res, "b") == 3  # b's filters feed a plain linear: exact
    res = fxprune.compile(StdNet(std_consumer=True), img(), ratio=0.5, allow_lossy=True, verify="equivalence")
    assert kept(res, "a") == 4 and res.module(img()).shape == (2, 3)


def test_functional_depthwise_and_grouped_conv():
    class M(nn.Module):
        def __init__(self, groups: int) -> None:
            super().__init__()
            self.groups = groups
            self.a = nn.Conv2d(3, 8, 1)
            self.k = nn.Parameter(torch.randn(8, 8 // groups, 3, 3))
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(F.conv2d(self.a(x), self.k, None, 1, 1, 1, self.groups))

    for seed in range(2):
        chk = assert_prune_equivalent(M(8), img(), lambda a, s=seed: random_selection(a, s, ratio=0.5))
        assert chk.selection.keep and "groups = 4" not in chk.module.code
    # grouped, not depthwise, with a parameter weight: pruned uniformly across the 2 groups (one conv
    # meaning for every spelling), the weight gathered per group block
    res = fxprune.compile(M(2), img(), ratio=0.5, verify="equivalence")
    assert kept(res, "a") == 4 and res.module.k.shape == (4, 2, 3, 3)
    # a grouped conv of a weight computed at run time cannot be gathered: pinned, and said
    class Computed(M):
        def forward(self, x):
            return self.b(F.conv2d(self.a(x), self.k * 2.0, None, 1, 1, 1, self.groups))

    res = fxprune.compile(Computed(2), img(), ratio=0.5, verify="equivalence")
    assert kept(res, "a") == 8
    assert any("grouped convolution of a computed weight" in why for _, why in res.report.blocked)


# ---------------------------------------------------------------------------------------------------------
# F.normalize, float64 verification of float32 constants


def test_normalize_over_tokens_keeps_channels_exact():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x):  # (B, N, C): normalise each channel over the tokens, as in EdgeNeXt's XCA
            return self.b(F.normalize(self.a(x), dim=1))

    res = fxprune.compile(M(), torch.randn(2, 4, 5), ratio=0.5, verify="equivalence")
    assert kept(res, "a") == 4


class Grid(nn.Module):
    """RAFT-style: a float32 coordinate grid built at run time, mixed into the features."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        grid = torch.stack([xs, ys], 0).float()[None].expand(n, -1, -1, -1)
        scale = torch.ones(1, dtype=torch.float32, device=x.device) * 0.5
        y = F.grid_sample(self.a(x), grid.permute(0, 2, 3, 1) / 6.0 - 0.5, align_corners=False)
        return self.b(torch.cat([y * scale, grid.to(x.dtype)], 1))


def test_verification_promotes_float32_constants_built_at_run_time():
    res = fxprune.compile(Grid(), img(), ratio=0.5, verify="equivalence")
    assert kept(res, "a") == 4
    assert ".float()" in res.graph_module.code  # the user's module keeps its own dtypes


def test_promote_float_dtype_rewrites_a_private_copy_only():
    gm = torch.fx.symbolic_trace(Grid())
    before = gm.code
    import copy

    cp = copy.deepcopy(gm)
    assert promote_float_dtype(cp, torch.float64) >= 2
    assert gm.code == before and ".double()" in cp.code and "torch.float64" in cp.code
    with pytest.raises(ValueError, match="floating dtype"):
        promote_float_dtype(cp, torch.int64)


def test_export_path_dtype_casts_verify_in_float64():
    class M(nn.Module):
        fxprune_static_shapes = True

        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            if x.dim() != 4:  # not traceable by torch.fx: captured with torch.export
                raise ValueError("NCHW")
            return self.b(self.a(x).float() * torch.ones(1, dtype=torch.float32))

    res = fxprune.compile(M(), img(), ratio=0.5, verify="equivalence", frontend="export")
    assert "torch.ops.aten" in res.graph_module.code and "torch.float32" in res.graph_module.code
    assert dict(res.module.named_parameters())["a.weight"].shape[0] == 4


# ---------------------------------------------------------------------------------------------------------
# the timm models themselves (slow; timm is not a test dependency)


@pytest.mark.slow
@pytest.mark.parametrize("name,side", [("swin_tiny_patch4_window7_224", 224), ("edgenext_xx_small", 128),
                                       ("poolformer_s12", 128), ("nf_resnet26", 128)])
def test_timm_models_compile_and_verify(name, side):
    timm = pytest.importorskip("timm")
    m = timm.create_model(name, pretrained=False).eval()
    res = fxprune.compile(m, torch.randn(1, 3, side, side), ratio=0.5, verify="equivalence")
    assert res.module(torch.randn(1, 3, side, side)).shape == (1, 1000)
