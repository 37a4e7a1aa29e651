"""The adversarial families checked by the independent oracle (nothing taken from fxprune's analysis).

CI runs a derandomised slice (a few fixed seeds per family and front end); ``pytest -m fuzz`` runs the
hypothesis-driven version, and ``python benchmarks/fuzz.py --examples 10000`` the large sweep."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from fxprune.testing.strategies.adversarial import ADVERSARIAL_FAMILIES, adversarial_cases

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fuzz  # noqa: E402 (the benchmark's checker: one definition of what passing means)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("family", ADVERSARIAL_FAMILIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adversarial_family_slice(family, frontend, seed):
    out = fuzz.check_adversarial(family, seed, frontend)
    assert not out.startswith("FAIL"), out
    assert (out == "refused") == (family == "root_hook"), out


def test_the_slice_prunes_something_in_every_family():
    for family in ADVERSARIAL_FAMILIES:
        outs = {fuzz.check_adversarial(family, s, "fx") for s in (1, 2, 4)}
        assert outs & {"ok", "refused"}, (family, outs)


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(adversarial_cases())
def test_adversarial_fuzz(case):
    family, seed = case
    for frontend in ("fx", "export"):
        out = fuzz.check_adversarial(family, seed, frontend)
        assert not out.startswith("FAIL"), (family, seed, frontend, out)
