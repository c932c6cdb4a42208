"""The ``fnloop`` package has no import cycles, counted statically from the source.

Nodes are modules (``fnloop.step``, ``fnloop.optim.base``; a package is its ``__init__``).
Every import statement is an edge, imports inside functions included (a deferred import hides a
cycle, it does not remove it); only ``if TYPE_CHECKING:`` blocks are skipped. ``from A import b``
is an edge to ``A.b`` when that is a module of the package, else to ``A``; relative imports are
resolved. A package ``__init__`` that imports its submodules has edges to them, so a submodule
importing its own package (``from fnloop import x``) closes a cycle.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import textwrap

import pytest

PACKAGE = "fnloop"


def _modules(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """``{module name: file}`` for every ``.py`` file under the package folder ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, outside ``if TYPE_CHECKING:`` bodies."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch runs
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules an import statement in ``module`` points at."""

    def nearest(name: str) -> str | None:  # the module itself, or its closest known parent
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    out: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            target = nearest(alias.name)
            if target is not None:
                out.add(target)
        return out
    if node.level:
        base_parts = module.split(".") if is_package else module.split(".")[:-1]
        base_parts = base_parts[: len(base_parts) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    for alias in node.names:
        full = f"{base}.{alias.name}"
        if full in known:
            out.add(full)
        else:
            target = nearest(base)
            if target is not None:
                out.add(target)
    return out


def import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
    """``{module: modules it imports}`` for the package whose folder is ``root``."""
    files = _modules(root, package)
    known = set(files)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _imports(tree):
            graph[module] |= _targets(node, module, path.name == "__init__.py", known)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with a cycle (2+ modules, or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    for start in sorted(graph):  # iterative Tarjan: no recursion limit on deep graphs
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    out.append(sorted(component))
    return sorted(out)


def _describe(components: list[list[str]], graph: dict[str, set[str]]) -> str:
    lines = []
    for i, component in enumerate(components, 1):
        members = set(component)
        lines.append(f"cycle {i} ({len(component)} modules): {', '.join(component)}")
        for m in component:
            inside = sorted(graph[m] & members)
            lines.append(f"    {m} -> {', '.join(inside)}")
    return "\n".join(lines)


def _package_root() -> pathlib.Path:
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.origin is not None
    return pathlib.Path(spec.origin).parent


# --- the graph builder on a package written for the test ----------------------------------------


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    pkg = root / "pkg"
    for name, source in files.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return pkg


def test_graph_builder_sees_every_kind_of_import(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "__init__.py": "from pkg.a import f\n",
            "a.py": """
                from typing import TYPE_CHECKING
                import os
                from . import b
                if TYPE_CHECKING:
                    from pkg import c
                else:
                    from pkg.sub import inner
                def f():
                    from .sub.inner import g
                    import pkg.sub
            """,
            "b.py": "from .sub import inner, CONST\n",
            "c.py": "",
            "sub/__init__.py": "CONST = 1\n",
            "sub/inner.py": "from .. import c\nfrom ..c import thing\n",
        },
    )
    graph = import_graph(pkg, "pkg")
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b", "pkg.sub.inner", "pkg.sub"},  # not pkg.c: TYPE_CHECKING only
        "pkg.b": {"pkg.sub.inner", "pkg.sub"},
        "pkg.c": set(),
        "pkg.sub": set(),
        "pkg.sub.inner": {"pkg.c"},
    }
    assert cycles(graph) == []


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"__init__.py": "", "a.py": "def f():\n    from pkg import b\n", "b.py": "import pkg.a\n"},
            [["pkg.a", "pkg.b"]],
        ),
        ({"__init__.py": "from pkg.a import x\n", "a.py": "from pkg import y\n"}, [["pkg", "pkg.a"]]),
        ({"__init__.py": "from . import a\n", "a.py": "from . import a\n"}, [["pkg.a"]]),
        (
            {
                "__init__.py": "",
                "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.b\n",
                "b.py": "import pkg.a\n",
            },
            [],
        ),
    ],
    ids=["deferred-import", "package-init", "self-import", "type-checking-only"],
)
def test_cycle_finder(tmp_path, files, expected):
    graph = import_graph(_write(tmp_path, files), "pkg")
    assert cycles(graph) == expected


# --- fnloop itself -----------------------------------------------------------------------------------


def test_fnloop_graph_holds_known_edges():
    graph = import_graph(_package_root(), PACKAGE)
    assert "fnloop.optim.base" in graph["fnloop.step"]
    assert "fnloop.loops.fit" in graph["fnloop.trainer"]  # an import inside a method
    assert "fnloop.trainer" in graph["fnloop"]


def test_fnloop_has_no_import_cycles():
    graph = import_graph(_package_root(), PACKAGE)
    found = cycles(graph)
    assert not found, "import cycles in fnloop (break each one):\n" + _describe(found, graph)
