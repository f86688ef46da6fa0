"""The layout shows the architecture: imports point one way, the engine stays pure.

The graph is drawn from the source with :mod:`ast` (every import: top-level, inside functions
and under ``TYPE_CHECKING``), one node per module of ``napari_ctvlp`` and ``training``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"napari_ctvlp": ROOT / "src" / "napari_ctvlp", "training": ROOT / "training"}


def _module_name(path: Path) -> str:
    for pkg, base in PACKAGES.items():
        if base in path.parents or path.parent == base:
            rel = path.relative_to(base).with_suffix("")
            parts = [pkg, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join(parts)
    raise ValueError(path)


def _modules() -> dict[str, Path]:
    out = {}
    for base in PACKAGES.values():
        for path in base.rglob("*.py"):
            out[_module_name(path)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or ``module.attribute``) lies in."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """``{module: {imported module, ...}}`` within our packages."""
    known = _modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" for a in node.names] or [prefix]
            for target in targets:
                dep = _resolve(target, known)
                if dep is not None and dep != mod:
                    graph[mod].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


def test_cycle_detector_finds_a_planted_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("layer, forbidden", [
    # the engine may read a path it is given (pipeline) and write results (results_io) through io;
    # io itself needs only the engine's leaf modules (volume, anatomy), never the pipeline
    ("napari_ctvlp.engine", ("napari_ctvlp.widgets", "napari_ctvlp.phantom", "napari_ctvlp.cli",
                             "napari_ctvlp.cli_detect", "training")),
    ("napari_ctvlp.phantom", ("napari_ctvlp.widgets", "napari_ctvlp.io", "napari_ctvlp.cli", "training")),
    ("napari_ctvlp.io", ("napari_ctvlp.widgets", "napari_ctvlp.phantom", "napari_ctvlp.engine.pipeline",
                         "napari_ctvlp.engine.results_io", "napari_ctvlp.engine.networks", "training")),
])
def test_layers_import_one_way(layer: str, forbidden: tuple[str, ...]) -> None:
    graph = import_graph()
    bad = sorted(
        f"{mod} -> {dep}"
        for mod, deps in graph.items() if mod == layer or mod.startswith(layer + ".")
        for dep in deps if any(dep == f or dep.startswith(f + ".") for f in forbidden)
    )
    assert bad == []


def test_engine_never_imports_qt_or_napari() -> None:
    bad = []
    for mod, path in _modules().items():
        if not mod.startswith("napari_ctvlp.engine"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{mod}: {n}" for n in names if n.split(".")[0] in {"napari", "qtpy", "PyQt5", "PyQt6",
                                                                        "PySide2", "PySide6", "magicgui"}]
    assert bad == []
