"""The installed package's shape: no import cycle, nothing imported from ``benchmarks/`` or ``tests/``,
no module past the size a reader can hold.

The imports are read from the source (every ``import``, at module level or inside a function,
relative ones resolved), so an import hidden in a function to dodge a cycle still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the source folders and the names they install as (pyproject's package-dir)
PACKAGES = {"dcgraph": ROOT / "dcgraph", "dcgraph.passes": ROOT / "passes",
            "dcgraph.backends": ROOT / "backends"}
MAX_LINES = 420  # "about 400"


def _modules() -> dict[str, Path]:
    mods = {}
    for prefix, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """Every module ``name`` imports (absolute names) with the line it does it on."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # ``from pkg import module`` imports pkg.module
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else target, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {t for t, _ in _imports(name, path) if t in MODULES and t != name}
            for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_whole_package():
    assert {"dcgraph.cli", "dcgraph.bench.run", "dcgraph.passes.fx.convert_norm",
            "dcgraph.backends.tvm.compiler", "dcgraph.backends.tvm.tuning.loop"} <= set(MODULES)
    graph = _graph()
    assert "dcgraph.backends.tvm.database" in graph["dcgraph.backends.tvm.compiler"]
    # ``from .. import kernels`` is an import of the module kernels
    assert "dcgraph.backends.tvm.kernels" in graph["dcgraph.backends.tvm.frontends.from_onnx"]


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_package_imports_nothing_from_benchmarks_or_tests():
    bad = [f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
           for name in MODULES for target, line in _imports(name, MODULES[name])
           if target.split(".")[0] in ("benchmarks", "tests")]
    assert bad == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines; split it by concern"


def test_the_wheel_lists_every_package():
    """pyproject's explicit package list: a folder missing from it would be missing from the wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert folders == listed
