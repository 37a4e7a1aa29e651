"""The house reads bottom-up: fxprune's own imports form a layered graph with no cycle, no module imports
another fxprune module inside a function (the way cycles get hidden), no private name crosses a module
boundary, and no module sits above its layer (docs/architecture.md draws the layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "fxprune"

#: layer of each module or package (bottom = 0); a module may import only from its own layer or below
LAYERS = {
    "errors": 0, "ir": 0, "meta": 0, "version": 0, "clone": 0,
    "trace": 1, "modules": 1, "export": 1,
    "rules": 2,
    "shapes": 3, "flops": 3,
    "pipeline": 4, "prepare": 4, "structured": 4, "literals": 4, "progress": 0, "fileformat": 0,
    "calib_stats": 4, "calib": 5, "passes": 5, "options": 6,
    "result": 6, "restore": 6, "hf": 1, "specs": 10, "report": 7, "hierarchical": 7, "api": 8,
    "serialize": 9, "finetune": 9, "sparsity": 10,
    "cli": 11, "testing": 11, "__main__": 12, "__init__": 12,
}
#: third-party imports allowed inside functions (optional extras, heavy libraries loaded on demand)
LAZY_OK = {"matplotlib", "transformers", "hypothesis", "onnx", "onnxscript", "timm", "torch_pruning", "mlxtend",
           "sklearn", "importlib", "tqdm", "torchvision"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _resolve(mod: str, node: ast.ImportFrom | ast.Import, is_pkg: bool) -> list[tuple[str, list[str]]]:
    """(imported fxprune module, names taken from it) for one import statement."""
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names if a.name.split(".")[0] == "fxprune"]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = mod.split(".")
        if not is_pkg:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "fxprune":
        return []
    out = []
    names = []
    for a in node.names:
        sub = f"{target}.{a.name}"
        if sub in MODULES:
            out.append((sub, []))  # `from . import meta`: the submodule itself
        else:
            names.append(a.name)
    if names:
        out.append((target, names))
    return out


def _layer(mod: str) -> int:
    parts = mod.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[key]


def _scan() -> tuple[dict[str, set[str]], list[str], list[str], list[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    lazy: list[str] = []
    private: list[str] = []
    upward: list[str] = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = _resolve(mod, node, is_pkg)
            inside = id(node) not in top and not _in_type_checking(tree, node)
            if inside and targets:
                lazy.append(f"{mod}:{node.lineno} imports {', '.join(t for t, _ in targets)} inside a function")
            for target, names in targets:
                if target not in MODULES:
                    continue
                graph[mod].add(target)
                # importing a.b.c runs the __init__ of the sub-package a.b first (fxprune's own root excepted)
                parts = target.split(".")
                for k in range(2, len(parts)):
                    parent = ".".join(parts[:k])
                    if parent in MODULES and not mod.startswith(parent + ".") and mod != parent:
                        graph[mod].add(parent)
                for n in names:
                    if n.startswith("_") and not n.startswith("__") and target != mod:
                        private.append(f"{mod}:{node.lineno} imports the private name {n} from {target}")
                if _layer(target) > _layer(mod) and not target.startswith(mod + "."):
                    upward.append(f"{mod} (layer {_layer(mod)}) imports {target} (layer {_layer(target)})")
    return graph, lazy, private, upward


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for n in tree.body:
        if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING":
            if any(node is c for c in ast.walk(n)):
                return True
    return False


GRAPH, LAZY, PRIVATE, UPWARD = _scan()


def test_every_module_has_a_layer():
    missing = sorted({m.split(".")[1] for m in MODULES if "." in m} - set(LAYERS))
    assert not missing, f"give these modules a layer in LAYERS (and docs/architecture.md): {missing}"


def test_no_import_cycle():
    # fxprune's root __init__ re-exports the package (every import of fxprune.x runs it first): not an edge
    edges = {m: set(ts) for m, ts in GRAPH.items() if m != "fxprune"}
    edges = {m: {t for t in ts if t != "fxprune"} for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_no_function_level_imports_of_fxprune_modules():
    assert not LAZY, "\n".join(LAZY)


def test_no_private_names_cross_modules():
    assert not PRIVATE, "\n".join(PRIVATE)


def test_no_upward_imports():
    assert not UPWARD, "\n".join(UPWARD)


def test_files_stay_small():
    big = sorted(f"{m} ({n} lines)" for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 500)
    assert not big, f"split these files (500 lines at most): {big}"


def test_no_lazy_third_party_imports_beyond_the_optional_ones():
    bad = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top and not getattr(node, "level", 0):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for n in names:
                    root = (n or "").split(".")[0]
                    if root != "fxprune" and root not in LAZY_OK and not _in_type_checking(tree, node):
                        bad.append(f"{mod}:{node.lineno} imports {n} inside a function")
    assert not bad, "\n".join(bad)
