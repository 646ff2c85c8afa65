"""nnsae's modules import each other as a DAG: no module needs one that (directly or not) needs it back.

The graph is read from the source with `ast`, not by importing: an edge A → B for every `import`/`from … import` in
A that names B, plus A → each package above B that is not above A (Python runs those `__init__`s first). Imports
under `if TYPE_CHECKING:` never run and are left out. `test_module_level_imports_form_a_dag` looks at module-level
imports (what runs when a module is imported); `test_no_import_inside_a_function_closes_a_cycle` adds the imports
written inside functions, so none of them is there to dodge a cycle (a lazy import is for an optional or heavy
dependency, or keeps a module out of what an SAE shipped by value to a remote nnsight server takes along; such a
dependency never imports the module back).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

import nnsae

PACKAGE_DIR = Path(nnsae.__file__).parent


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name → file, for every .py file of the package (`pkg/__init__.py` is `pkg`)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = (package_dir.name, *path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(body: list[ast.stmt], into_functions: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module runs (and, with `into_functions`, when its functions run)."""
    found = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _import_nodes(node.body, into_functions)
            found += _import_nodes(node.orelse, into_functions)
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                found += _import_nodes(block, into_functions)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            found += _import_nodes(node.body, into_functions)
        elif into_functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found += _import_nodes(node.body, into_functions)
        elif isinstance(node, ast.ClassDef):  # a class body runs at import time
            found += _import_nodes(node.body, into_functions)
    return found


def import_graph(package_dir: Path, into_functions: bool = False) -> dict[str, set[str]]:
    """Module → the package's modules that importing it runs first (see the module docstring)."""
    modules = module_files(package_dir)
    root = package_dir.name

    def existing(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def ancestors(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))]

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8")).body, into_functions):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from pkg import sub` imports the submodule `pkg.sub` when there is one, else names from `pkg`
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names]
            for name in names:
                if name == root or name.startswith(root + "."):
                    target = existing(name)
                    if target is not None:
                        targets.add(target)
        edges = set()
        for target in targets:
            edges.add(target)
            edges.update(a for a in ancestors(target) if a not in ancestors(module) and a != module)
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, …, a], or None when the graph is a DAG."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _assert_dag(graph: dict[str, set[str]], what: str) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, f"Import cycle through {what}: {' -> '.join(cycle)}"


def test_module_level_imports_form_a_dag():
    graph = import_graph(PACKAGE_DIR)
    assert len(graph) > 40 and "nnsae.config" in graph["nnsae.architectures.base"]  # the parser sees the package
    _assert_dag(graph, "module-level imports")


def test_no_import_inside_a_function_closes_a_cycle():
    _assert_dag(import_graph(PACKAGE_DIR, into_functions=True), "module-level and function-level imports")


def _write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path / "pkg"


@pytest.mark.parametrize("files, cycle", [
    # a direct cycle, written with absolute and relative imports
    ({"__init__.py": "", "a.py": "from pkg.b import x\n", "b.py": "from . import a\nx = 1\n"},
     ["pkg.a", "pkg.b", "pkg.a"]),
    # through a package __init__ that imports its submodules: importing pkg.sub.low runs pkg.sub first
    ({"__init__.py": "", "config.py": "from pkg.sub.low import y\n", "sub/__init__.py": "from pkg.sub import high\n",
      "sub/high.py": "import pkg.config\n", "sub/low.py": "y = 1\n"},
     ["pkg.config", "pkg.sub", "pkg.sub.high", "pkg.config"]),
    # a cycle closed only by an import inside a function
    ({"__init__.py": "", "a.py": "import pkg.b\n", "b.py": "def f():\n    from pkg import a\n"}, None),
])
def test_cycles_are_found_and_named(tmp_path, files, cycle):
    package = _write_package(tmp_path, files)
    assert find_cycle(import_graph(package)) == cycle
    if cycle is None:
        assert find_cycle(import_graph(package, into_functions=True)) == ["pkg.a", "pkg.b", "pkg.a"]
    with pytest.raises(AssertionError, match="Import cycle through x: pkg"):
        _assert_dag(import_graph(package, into_functions=True), "x")


def test_type_checking_imports_are_not_edges(tmp_path):
    package = _write_package(tmp_path, {
        "__init__.py": "", "a.py": "import pkg.b\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\n"
                "else:\n    import pkg.c\n",
        "c.py": ""})
    assert import_graph(package)["pkg.b"] == {"pkg.c"}
