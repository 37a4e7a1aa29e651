"""Facts are declared: every registered pass states what it needs, ``Pipeline.check`` rejects (before any
work) every pipeline in which a pass would find a fact missing, and a pipeline that provides what a pass
declares runs it without a missing fact. No library pass talks through ``ctx.extras``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import fxprune
from fxprune import meta
from fxprune.errors import PipelineError
from fxprune.pipeline import PASSES, Pipeline

#: how each fact is produced (the shortest pipeline that writes it)
PROVIDERS = {
    "groups": ["group"],
    "importance": ["group", "importance"],
    "selection": ["group", "importance", "select(ratio=0.5)"],
    "pruned_from": ["group", "importance", "select(ratio=0.5)", "rewrite"],
    "absorbed": ["group", "importance", "select(ratio=0.5)", "rewrite", "absorb"],
}
OPTIONS = {"slimming_select": "slimming_select(ratio=0.5)"}  # passes that need an option to exist


def _pass(name: str):
    return Pipeline.parse(OPTIONS.get(name, name)).passes[0]


def _providers(p) -> list[str]:
    chain: list[str] = []
    for fact in p.requires():
        for step in PROVIDERS.get(fact, []):
            if step not in chain:
                chain.append(step)
    return chain


def _net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()
    return m, torch.randn(1, 3, 4, 4), [torch.randn(4, 3, 4, 4) for _ in range(2)]


@pytest.mark.parametrize("name", sorted(PASSES))
def test_check_rejects_a_missing_fact_up_front(name):
    p = _pass(name)
    required = [k for k in p.requires() if k not in ("shapes", "cost")]
    if not required:
        pytest.skip(f"{name} needs only the captured graph")
    for missing in required:
        chain = [s for s in _providers(p) if s not in PROVIDERS[missing] or s in sum(
            (PROVIDERS[k] for k in required if k != missing), [])]
        pipe = Pipeline(tuple(Pipeline.parse(" | ".join(chain)).passes if chain else ()) + (p,))
        if all(k in {w for q in pipe.passes[:-1] for w in q.writes} for k in required):
            continue  # another provider writes it too: nothing is missing
        with pytest.raises(PipelineError, match="no earlier pass writes"):
            pipe.check()


@pytest.mark.parametrize("name", sorted(PASSES))
def test_a_pipeline_providing_the_declared_facts_runs(name):
    p = _pass(name)
    model, x, calib = _net()
    pipe = Pipeline(tuple(Pipeline.parse(" | ".join(_providers(p))).passes if _providers(p) else ()) + (p,))
    pipe.check()
    res = fxprune.compile(model, x, pipeline=pipe, calib=calib)  # no PipelineError / KeyError at run time
    for fact in p.writes:
        if fact not in ("shapes", "cost"):
            assert fact in res.facts, f"{name} declares it writes {fact!r} but did not"


def test_the_misdeclared_pipeline_of_the_issue_is_rejected():
    with pytest.raises(PipelineError, match=r"'verify' reads \['pruned_from'\]"):
        Pipeline.parse("group | importance | select(ratio=0.5) | verify(equivalence=True)").check()


def test_no_library_pass_uses_ctx_extras():
    root = Path(fxprune.__file__).parent
    hits = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "extras" and not path.name == "pipeline.py":
                hits.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not hits, f"library code reads or writes ctx.extras: {hits}"


def test_undeclared_keys_are_errors():
    with pytest.raises(KeyError, match="unknown fxprune meta key"):
        meta.get(torch.fx.symbolic_trace(nn.Linear(2, 2)), "grups")
    with pytest.raises(KeyError):
        fxprune.graph_pass(reads=("nothing",))(lambda gm, ctx: None)
