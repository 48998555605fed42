"""The module graph follows the data flow (STYLE.md): a module imports only from the stages before it.

Every jmoss module (with ``jmoss.converters`` and ``jmoss.kernels``) is parsed, not imported, so
imports under ``if TYPE_CHECKING:`` count as much as the ones that run: a cycle hidden from the
interpreter is still a cycle for a reader.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

PACKAGES = ("jmoss", "jmoss.converters", "jmoss.kernels")
# What must never reach back up to the facade or the front ends, not even inside a function.
LOWER_STAGES = ("jmoss.layout", "jmoss.store", "jmoss.placement", "jmoss.model", "jmoss.engine", "jmoss.protocols",
                "jmoss.session", "jmoss.generation", "jmoss.batching", "jmoss.dialogue", "jmoss.chat")
FRONT = ("jmoss.api", "jmoss.server", "jmoss.cli")
# The runtime reads its own store format from jmoss.layout; the converters are a tool on top.
RUNTIME = ("jmoss.layout", "jmoss.store", "jmoss.placement", "jmoss.model", "jmoss.engine", "jmoss.session",
           "jmoss.api")


def _sources() -> dict[str, Path]:
    """Module name -> file, for every module of the three packages (wherever they are installed)."""
    out: dict[str, Path] = {}
    for package in PACKAGES:
        # the folder of the package's own __init__ (jmoss's __path__ also lists the checkout root)
        root = Path(importlib.util.find_spec(package).origin).parent
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            if package == "jmoss" and name.startswith(("jmoss.converters", "jmoss.kernels")):
                continue  # an installed layout nests them; they are read as their own package
            out.setdefault(name, path)
    return out


SOURCES = _sources()


def _target(name: str) -> str | None:
    """The jmoss module an imported dotted name lives in (longest known prefix), or None."""
    while name and name not in SOURCES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> tuple[set[str], set[str]]:
    """(modules imported at module level, TYPE_CHECKING blocks included; those imported in functions)."""
    top: set[str] = set()
    local: set[str] = set()
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            into = local if in_function else top
            if isinstance(child, ast.Import):
                into.update(t for a in child.names if (t := _target(a.name)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".")[: len(module.split(".")) - child.level + is_package]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in child.names:
                    # `from jmoss import layout` imports the module jmoss.layout, not just the package
                    target = _target(f"{base}.{alias.name}") if f"{base}.{alias.name}" in SOURCES else _target(base)
                    if target:
                        into.add(target)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    top.discard(module)
    local.discard(module)
    return top, local


GRAPH = {name: _imports(name, path) for name, path in SOURCES.items()}


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := walk(start)):
            return found
    return None


def test_every_package_is_found_and_parsed():
    for name in ("jmoss.api", "jmoss.layout", "jmoss.protocols", "jmoss.engine.factory", "jmoss.converters.convert",
                 "jmoss.kernels.cpu"):
        assert name in SOURCES, sorted(SOURCES)
    # the parser sees a TYPE_CHECKING import and a function-local one
    assert "jmoss.tokenizer" in GRAPH["jmoss.api"][0]
    assert "jmoss.generation" in GRAPH["jmoss.api"][1]


def test_cycle_finder_reports_a_cycle_through_type_checking_style_edges():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_module_level_imports_have_no_cycle_even_under_type_checking():
    assert _cycle({name: top for name, (top, _) in GRAPH.items()}) is None


def test_no_cycle_even_through_imports_inside_functions():
    """A lazy import (to keep start-up fast) is still a dependency: the graph stays acyclic."""
    assert _cycle({name: top | local for name, (top, local) in GRAPH.items()}) is None


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if _in(m, LOWER_STAGES)))
def test_lower_stages_never_import_the_facade_or_front_ends(module):
    top, local = GRAPH[module]
    assert not {t for t in top | local if _in(t, FRONT)}, f"{module} imports a later stage"


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if _in(m, RUNTIME)))
def test_the_runtime_reads_its_store_format_from_jmoss_not_from_the_converters(module):
    top, local = GRAPH[module]
    assert not {t for t in top | local if _in(t, ("jmoss.converters",))}, f"{module} imports jmoss.converters"


def test_converters_import_the_store_format_from_jmoss_layout():
    assert "jmoss.layout" in GRAPH["jmoss.converters.convert"][0]
    assert "jmoss.converters.layout" not in SOURCES


def test_engine_backends_do_not_import_the_factory_that_chooses_them():
    for backend in ("jmoss.engine.pipeline", "jmoss.engine.cpu", "jmoss.engine.cuda", "jmoss.engine.swap",
                    "jmoss.engine.resident"):
        top, local = GRAPH[backend]
        assert "jmoss.engine.factory" not in top | local and "jmoss.engine" not in top | local, backend
