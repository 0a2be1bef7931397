"""The package's shape: no import cycle between dami_jax modules, and the key-path helper.

The cycle check reads every import statement of every module, those inside
functions included (a lazy import hides a cycle from import time, not from the
design), and looks for strongly connected components of the module graph.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import jax

import dami_jax
from dami_jax.tree import path_keys

PACKAGE = pathlib.Path(dami_jax.__file__).parent


def module_files(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """{dotted module name: file} of a package directory (a package is named by its __init__.py)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The package's modules that `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for a in node.names:
                if f"{base}.{a.name}" in modules:  # from package import submodule
                    found.add(f"{base}.{a.name}")
                elif base in modules:  # from module import name
                    found.add(base)
    found.discard(name)
    return found


def import_graph(package: pathlib.Path) -> dict[str, set[str]]:
    modules = module_files(package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v):
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_cycle_in_dami_jax():
    graph = import_graph(PACKAGE)
    # the graph is the real one: merge uses the checkpoint package, eval finds the toy pair in toyworld
    assert {"dami_jax.checkpoint.hf", "dami_jax.checkpoint.safetensors_io"} <= graph["dami_jax.checkpoint.merge"]
    assert "dami_jax.toyworld" in graph["dami_jax.eval.pairs"]
    assert cycles(graph) == []


def test_no_library_module_imports_the_toy_demo():
    """The demo is an application: the toy pair's paths come from `dami_jax.toyworld` itself."""
    graph = import_graph(PACKAGE)
    users = sorted(m for m, deps in graph.items() if "dami_jax.toyworld.demo" in deps)
    assert users == ["dami_jax.cli", "dami_jax.toyworld.train"]


def test_the_cycle_check_finds_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from pkg.sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "def f():\n    from ..c import g  # lazy and relative: still an edge\n",
        "c.py": "import pkg.a\ng = 1\n",
        "d.py": "from pkg import a\n",  # imports into the cycle, is not part of it
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("g = 1\n")
    assert cycles(import_graph(pkg)) == []


def test_path_keys():
    tree = {"layers": {0: {"kernel": 1}}, "list": [2, (3,)]}
    paths = [path_keys(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert paths == [("layers", "0", "kernel"), ("list", "0"), ("list", "1", "0")]

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Box:
        value: int

    assert [path_keys(p) for p, _ in jax.tree_util.tree_leaves_with_path(Box(4))] == [("value",)]

