"""Every ```python block of README.md and docs/*.md runs (per file, top to bottom, one namespace), unless
the line before it is a ``<!-- no-test ... -->`` marker; every `fxprune ...` command shown in a bash block
parses with the real CLI parser; relative links between the pages resolve."""

from __future__ import annotations

import re
import shlex
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(path: Path, lang: str) -> list[tuple[int, str, bool]]:
    """(line number, code, opted out) of each fenced block of ``lang``."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) != lang:
            continue
        before = text[: m.start()].rstrip("\n").splitlines()
        marker = bool(before) and before[-1].strip().startswith("<!-- no-test")
        out.append((text[: m.start()].count("\n") + 1, m.group(2), marker))
    return out


def test_docs_exist():
    names = {p.name for p in PAGES}
    assert {"guide_custom_rules.md", "guide_passes_pipelines.md", "guide_testing.md", "methods.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    code = blocks(page, "python")
    runnable = [(line, src) for line, src, skip in code if not skip]
    if page.parent.name == "docs":
        assert runnable, f"{page.name} has no executed python example"
    skipped = len(code) - len(runnable)
    assert skipped <= max(2, len(code) // 2) or page.name == "README.md", f"{page.name}: too many no-test blocks"
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = types.ModuleType(f"doc_{page.stem}")  # a real module: dataclasses look theirs up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    ns = module.__dict__
    for line, src in runnable:
        try:
            exec(compile(src, f"{page.name}:{line}", "exec"), ns)
        except BaseException as exc:  # noqa: BLE001 - report which block failed, keep the type
            exc.add_note(f"in the python block at {page.relative_to(ROOT)}:{line}")
            raise


def test_cli_commands_in_docs_parse():
    from fxprune.cli import _parser

    parser = _parser()
    seen = 0
    for page in PAGES:
        for _, src, _ in blocks(page, "bash"):
            for ln in src.replace("\\\n", " ").splitlines():  # continuation lines join
                ln = ln.split("#", 1)[0].strip()
                if ln.startswith("fxprune "):
                    args = parser.parse_args(shlex.split(ln)[1:])
                    assert callable(args.func)
                    seen += 1
    assert seen >= 4


def test_relative_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
