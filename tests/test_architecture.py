"""The house rules of docs/architecture.md, read from the source with ``ast`` (nothing is imported, so this is fast).

* No import cycles among ``openrlhf_infalign`` modules, counting imports inside functions too: a lazy import that
  dodges a cycle at import time is still a cycle in the design.
* Floors: ``core/`` imports neither OpenRLHF nor ``store/`` nor the adapter; ``store/`` imports neither OpenRLHF nor
  the adapter; only modules under ``openrlhf_infalign/adapter/`` import ``openrlhf`` itself.
* Nothing in the repository points at design notes that live outside it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "openrlhf_infalign"
ADAPTER = f"{PACKAGE}.adapter"

# Built from pieces so that this file does not match its own search.
OUTSIDE_POINTERS = ("DESIGN" + ".md", ".." + "/shared")
SCANNED = ("openrlhf_infalign", "tests", "scripts", "docs", "examples", "benchmarks", ".ci")
SCANNED_FILES = ("README.md", "Makefile", "pyproject.toml")
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache"}


def _module_name(path: Path) -> tuple[str, bool]:
    """Dotted name of a source file under ROOT, and whether it is a package (__init__.py)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _resolve(level: int, module: str | None, importer: str, is_package: bool) -> str:
    """Absolute name of ``from <level dots><module> import ...`` written in module ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imported_names(source: str, importer: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """(absolute module name, line) for every import in ``source``, at module level or inside functions.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a known module, else ``pkg``.
    ``importlib.import_module("x")`` / ``__import__("x")`` with a constant name count as importing ``x``.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.level, node.module, importer, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.args[0].value, node.lineno))
    return found


def _import_graph() -> dict[str, list[tuple[str, str]]]:
    """Per module of the package: (imported module, "path:line") for each import (any module, ours or not)."""
    files = sorted(p for p in (ROOT / PACKAGE).rglob("*.py") if not SKIPPED_DIRS & set(p.parts))
    names = {p: _module_name(p) for p in files}
    known = {name for name, _ in names.values()}
    graph = {}
    for path, (name, is_package) in names.items():
        rel = path.relative_to(ROOT)
        imports = imported_names(path.read_text(encoding="utf-8"), name, is_package, known)
        graph[name] = [(target, f"{rel}:{line}") for target, line in imports]
    return graph


GRAPH = _import_graph()


def _is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _violations(importers: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{where}: {module} imports {target}"
        for module, imports in sorted(GRAPH.items())
        if _is_under(module, importers)
        for target, where in imports
        if any(_is_under(target, f) for f in forbidden)
    ]


def cycles(graph: dict[str, list[tuple[str, str]]]) -> list[str]:
    """One cycle path per strongly connected component of the graph's own modules (Tarjan), with file:line."""
    edges = {m: sorted({(t, w) for t, w in imps if t in graph and t != m}) for m, imps in graph.items()}
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(scc)

    for v in sorted(edges):
        if v not in index:
            visit(v)

    reports = []
    for scc in sccs:
        start = min(scc)
        # Breadth-first search inside the component for the shortest way back to start.
        parent, frontier = {start: None}, [start]
        back = None
        while frontier and back is None:
            nxt = []
            for v in frontier:
                for w, where in edges[v]:
                    if w == start:
                        back = (v, where)
                        break
                    if w in scc and w not in parent:
                        parent[w] = (v, where)
                        nxt.append(w)
                if back:
                    break
            frontier = nxt
        hops, v = [(start, back[1])], back[0]
        while v != start:
            hops.append((v, parent[v][1]))
            v = parent[v][0]
        hops.append((start, None))
        hops.reverse()
        path = " -> ".join(m for m, _ in hops)
        lines = ", ".join(where for _, where in hops[1:])
        reports.append(f"{path}  (at {lines}; component: {', '.join(sorted(scc))})")
    return reports


def test_walker_sees_function_level_and_relative_imports():
    src = (
        "import json\n"
        "from . import sibling\n"
        "from ..core.theory import plan\n"
        "def f():\n"
        "    import openrlhf.trainer\n"
        "    importlib.import_module('openrlhf_infalign.store')\n"
    )
    known = {"openrlhf_infalign.store.sibling", "openrlhf_infalign.core.theory"}
    got = [m for m, _ in imported_names(src, "openrlhf_infalign.store.reader", False, known)]
    expected = ["json", f"{PACKAGE}.store.sibling", f"{PACKAGE}.core.theory", "openrlhf.trainer", f"{PACKAGE}.store"]
    assert sorted(got) == sorted(expected)
    assert f"{PACKAGE}.core" in GRAPH and f"{PACKAGE}.store.format" in GRAPH and ADAPTER in GRAPH


def test_cycle_report_names_the_path():
    graph = {"a": [("b", "a.py:1")], "b": [("c", "b.py:2"), ("json", "b.py:3")], "c": [("a", "c.py:4")], "d": []}
    (report,) = cycles(graph)
    assert report.startswith("a -> b -> c -> a  (at a.py:1, b.py:2, c.py:4;")
    assert cycles({"a": [("b", "a.py:1")], "b": []}) == []


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "import cycles among openrlhf_infalign modules:\n  " + "\n  ".join(found)


def test_core_imports_neither_openrlhf_nor_store():
    bad = _violations(f"{PACKAGE}.core", ("openrlhf", f"{PACKAGE}.store", ADAPTER))
    assert not bad, "core/ must stay math only:\n  " + "\n  ".join(bad)


def test_store_imports_neither_openrlhf_nor_the_adapter():
    bad = _violations(f"{PACKAGE}.store", ("openrlhf", ADAPTER))
    assert not bad, "store/ must not import OpenRLHF:\n  " + "\n  ".join(bad)


def test_only_the_adapter_imports_openrlhf():
    bad = [
        f"{where}: {module} imports {target}"
        for module, imports in sorted(GRAPH.items())
        if not _is_under(module, ADAPTER)
        for target, where in imports
        if _is_under(target, "openrlhf")
    ]
    assert not bad, f"only {ADAPTER} may import openrlhf (others go through it):\n  " + "\n  ".join(bad)


def _scanned_files():
    for name in SCANNED_FILES:
        if (ROOT / name).is_file():
            yield ROOT / name
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and not SKIPPED_DIRS & set(path.relative_to(ROOT).parts):
                yield path


@pytest.mark.parametrize("pointer", OUTSIDE_POINTERS)
def test_nothing_points_outside_the_repository(pointer):
    needle = pointer.encode()
    hits = []
    for path in _scanned_files():
        for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
            if needle in line:
                hits.append(f"{path.relative_to(ROOT)}:{lineno}")
    assert not hits, f"{pointer!r} is not part of this repository (docs/architecture.md is):\n  " + "\n  ".join(hits)


def test_the_cpu_mode_is_one_package_that_imports_no_other_adapter_module():
    bad = [v for v in _violations(f"{ADAPTER}.cpu", (ADAPTER,)) if f"imports {ADAPTER}.cpu" not in v]
    assert not bad, "adapter/cpu/ stands alone (the hook and the console call it, not the reverse):\n  " + "\n  ".join(
        bad
    )


def test_the_upstream_table_imports_nothing_upstream():
    bad = [
        f"{where}: imports {target}"
        for target, where in GRAPH[f"{ADAPTER}.upstream"]
        if _is_under(target, "openrlhf") or _is_under(target, "ray") or _is_under(target, "torch")
    ]
    assert not bad, "adapter/upstream/__init__.py reads upstream sources as text:\n  " + "\n  ".join(bad)


def test_demo_studies_and_runs_never_import_the_adapter_and_the_demo_never_imports_studies():
    bad = _violations(f"{PACKAGE}.demo", (ADAPTER, f"{PACKAGE}.studies", "openrlhf"))
    bad += _violations(f"{PACKAGE}.studies", (ADAPTER, "openrlhf"))
    bad += _violations(f"{PACKAGE}.runs", (ADAPTER, "openrlhf", f"{PACKAGE}.demo", f"{PACKAGE}.studies"))
    assert not bad, "demo/, studies/ and runs/ run OpenRLHF in subprocesses only:\n  " + "\n  ".join(bad)


def test_package_data_globs_match_real_files():
    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, patterns in globs.items():
        for pattern in patterns:
            assert list(
                (ROOT / package).glob(pattern)
            ), f"pyproject package-data {package}: {pattern!r} matches nothing"
