"""The examples run end to end (each as a subprocess, in its quick mode) and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, timeout: float = 75) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{name} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
        f"--- stderr ---\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def test_mnist_demo_quick():
    out = run_example("mnist_demo.py", "--quick")
    assert "fxprune: params" in out  # the compile report
    assert "verified: the pruned module equals the masked original" in out
    assert "original model untouched: True" in out
    for row in ("test accuracy, no fine-tune", "params", "MACs per image", "CPU latency, batch 1 (ms)",
                "CPU latency, batch 64 (ms)"):
        assert row in out, row
    assert "speed-up:" in out and "at batch 64" in out
    # the report's header: params shrink
    assert "x fewer" in out


def test_custom_rule():
    out = run_example("custom_rule.py", "--quick")
    assert "fxprune.TraceError" in out and "leaf_modules" in out
    assert "fxprune.UnsupportedOpError: node 'scale1'" in out and "register_module_rule" in out
    assert "groups kept whole" in out and "no rule for module ChannelScale" in out
    assert "ChannelScale(16) -> ChannelScale(8)" in out
    assert "assert_prune_equivalent: OK" in out
    assert "custom rules: all checks passed" in out


def test_custom_pass():
    out = run_example("custom_pass.py", "--quick")
    assert "[group_summary]" in out
    assert "same channels kept as the list-of-objects pipeline: True" in out
    assert "fxprune.PipelineError (raised before any pass ran)" in out and "'select' reads ['importance']" in out
    assert "custom passes: all checks passed" in out


@pytest.mark.parametrize("name", ["mnist_demo.py", "custom_rule.py", "custom_pass.py"])
def test_example_is_a_documented_script(name):
    """Every example is a runnable script with a module docstring (static check, no subprocess)."""
    text = (EXAMPLES / name).read_text()
    assert text.startswith("#!/usr/bin/env python\n\"\"\"")
    assert 'if __name__ == "__main__":' in text
