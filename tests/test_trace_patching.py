"""fxprune's tracer makes torch.fx's two ``nn.Module`` patches (module calls, parameter reads) on the module
classes of the traced hierarchy instead of on ``nn.Module`` itself. Oracle: the same tracer run through
torch.fx's own ``Tracer.trace`` body with torch.fx's own patcher; the graphs must be identical, and every class
must be left exactly as it was."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx import _symbolic_trace as fx_trace
from torchvision.models import mobilenet_v3_small, resnet18
from torchvision.models.vision_transformer import VisionTransformer

from fxprune.errors import TraceError
from fxprune.trace import FxpruneTracer, _HierarchyPatcher, trace


@fx.wrap
def _opaque(x):
    return x * 2


class _Scale(nn.Module):
    """A traced-through module reading its own parameter (a layer scale)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class _OwnGetattr(nn.Module):
    """Defines its own ``__getattr__``: torch.fx's patch of nn.Module's does not reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def __getattr__(self, name):
        return super().__getattr__(name)

    def forward(self, x):
        return x + self.w.sum()


class _OwnCall(nn.Module):
    """Defines its own ``__call__`` (runs forward directly): traced through, as torch.fx does."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        return self.lin(x)


class _Base(nn.Module):
    def forward(self, x):
        return torch.relu(x)


class _Sub(_Base):
    def forward(self, x):
        return super().forward(x) - 1


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = _Scale(4)
        self.base, self.sub = _Base(), _Sub()
        self.own_getattr, self.own_call = _OwnGetattr(), _OwnCall()

    def forward(self, x):
        y = self.scale(self.conv(x)) + self.conv.weight.mean()  # a child's parameter read by its parent
        y = self.sub(self.base(y)) * math.sqrt(2.0)
        z = self.own_call(self.own_getattr(y.mean((2, 3))))
        return _opaque(z) + math.sqrt(z.shape[1])


def _vit() -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)


def _class_dicts(model: nn.Module) -> dict[type, set[str]]:
    classes = {type(m) for m in model.modules()} | {nn.Module}
    return {c: set(c.__dict__) for c in classes}


def _fx_graph(model: nn.Module) -> str:
    """The oracle: torch.fx's own trace body (its own patcher, on nn.Module) with fxprune's leaf policy."""
    tracer = FxpruneTracer(lambda m: False)
    return str(fx.Tracer.trace(tracer, model))


MODELS = {"mixed": _Mixed, "resnet18": lambda: resnet18(num_classes=10), "vit": _vit,
          "mobilenet_v3_small": lambda: mobilenet_v3_small(num_classes=10)}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_graph_is_torch_fx_s_and_every_class_is_left_as_it_was(name):
    model = MODELS[name]().eval()
    before = _class_dicts(model)
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    ours = str(FxpruneTracer(lambda m: False).trace(model))
    assert ours == _fx_graph(model)
    assert _class_dicts(model) == before
    assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_
    assert fx_trace.CURRENT_PATCHER is None and fx_trace._new_patcher.__module__ == fx_trace.__name__
    if name == "mixed":
        assert "_opaque" in ours and "sqrt" in ours and "gamma" in ours and "conv.weight" in ours


def test_timm_models_trace_to_torch_fx_s_graph():
    timm = pytest.importorskip("timm")
    for name in ("mobilenetv3_small_100", "convnext_atto"):
        model = timm.create_model(name).eval()
        assert str(FxpruneTracer(lambda m: False).trace(model)) == _fx_graph(model), name


def _probe(seen: dict) -> type:
    class Probe(nn.Module):
        def forward(self, x):
            seen["patcher"] = fx_trace.CURRENT_PATCHER
            seen["module_call"] = "__call__" in nn.Module.__dict__ and nn.Module.__call__ is not _WRAPPED_CALL
            seen["dicts"] = {c: "__call__" in c.__dict__ for c in (_Base, _Sub, _OwnCall, Probe)}
            return x + 1

    return Probe


_WRAPPED_CALL = nn.Module.__call__


def test_only_classes_inheriting_the_methods_are_patched_during_the_trace():
    seen: dict = {}
    probe = _probe(seen)
    FxpruneTracer(lambda m: False).trace(nn.Sequential(probe(), _Base(), _Sub()))
    assert isinstance(seen["patcher"], _HierarchyPatcher)
    assert seen["module_call"] is False  # nn.Module itself is not patched
    # patched: the classes inheriting __call__ (Probe, _Base; _Sub inherits _Base's patch); _OwnCall not in it
    assert seen["dicts"] == {_Base: True, _Sub: False, _OwnCall: True, probe: True}
    assert "__call__" not in _Base.__dict__ and "__call__" not in probe.__dict__


def test_a_class_with_its_own_call_gets_torch_fx_s_patch_on_nn_module():
    seen: dict = {}
    probe = _probe(seen)
    model = nn.Sequential(probe(), _Base(), _OwnCall())
    FxpruneTracer(lambda m: False).trace(model)
    assert seen["module_call"] is True  # _OwnCall.__call__ may reach nn.Module's through super(): patched there
    assert seen["dicts"][_Base] is False and nn.Module.__call__ is _WRAPPED_CALL
    assert str(FxpruneTracer(lambda m: False).trace(model)) == _fx_graph(model)


def test_a_module_outside_the_hierarchy_is_still_an_error():
    class Stray(nn.Module):
        def forward(self, x):
            return nn.Linear(4, 4)(x)  # created during forward: not a submodule, its parameters not the root's

    with pytest.raises(TraceError):
        trace(Stray().eval(), lambda m: False)
    with pytest.raises(NameError):
        _fx_graph(Stray().eval())  # torch.fx refuses it too


def test_an_error_during_the_trace_restores_every_class():
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _Base()

        def forward(self, x):
            y = self.inner(x)
            if y.sum() > 0:  # control flow on a traced value
                return y
            return -y

    model = Boom().eval()
    before = _class_dicts(model)
    with pytest.raises(TraceError):
        trace(model, lambda m: False)
    assert _class_dicts(model) == before and fx_trace.CURRENT_PATCHER is None
    assert fx_trace._new_patcher.__module__ == fx_trace.__name__


def test_a_trace_in_another_thread_meanwhile_gets_torch_fx_s_own_patcher():
    got = {}

    class Waits(nn.Module):
        def forward(self, x):
            t = threading.Thread(target=lambda: got.setdefault("g", str(fx.symbolic_trace(_Scale(4)).graph)))
            t.start()
            t.join()
            return x * 2

    FxpruneTracer(lambda m: False).trace(Waits())
    assert "gamma" in got["g"] and "mul" in got["g"]  # traced with torch.fx's patches (its class is not ours)
