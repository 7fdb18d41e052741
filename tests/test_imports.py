"""No import cycle among the colofs modules, found by reading the sources with ``ast``.

Every import counts, also those under ``if TYPE_CHECKING:`` and inside
functions: a cycle hidden that way still means two modules that cannot be
read, changed or tested one without the other. An edge goes to the module
named (``from colofs.core import vm`` is an edge to ``colofs.core.vm``; ``from
colofs.core import Disk`` one to the package ``colofs.core``); the implicit
import of parent packages is not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "colofs"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``package`` (a package is its ``__init__``)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that the module ``name`` (source ``path``) imports anywhere in its text."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str) -> None:
        # "import colofs.core.vm.x" where x is an attribute: keep the longest prefix that is a module.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                add(sub if sub in modules else origin)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    files = module_files(root, package)
    names = set(files)
    return {name: imports_of(name, path, names) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted, the list sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def describe(group: list[str], graph: dict[str, set[str]]) -> str:
    """A group of modules that import each other, with every import edge inside it, so the fix is findable."""
    members = set(group)
    edges = [f"{a} imports {b}" for a in group for b in sorted(graph[a] & members)]
    return f"{', '.join(group)}: " + "; ".join(edges)


def test_the_graph_sees_relative_and_type_checking_imports(tmp_path: Path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import A\n")
    (pkg / "sub" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                      "    from pkg.sub.b import B\nclass A: ...\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("import pkg.sub.a.A\nfrom pkg import sub\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.a"}
    assert graph["pkg.sub.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.sub.a"}
    assert graph["pkg.c"] == {"pkg.sub.a", "pkg.sub"}
    assert cycles(graph) == [["pkg.sub.a", "pkg.sub.b"]]


def test_no_import_cycle_among_colofs_modules():
    graph = import_graph()
    assert "colofs.core.vm" in graph and "colofs.fs.daemon" in graph  # it read the real package
    found = cycles(graph)
    assert not found, "import cycles among colofs modules:\n" + "\n".join(describe(g, graph) for g in found)
