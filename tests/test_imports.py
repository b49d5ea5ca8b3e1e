"""The package order, read from the source (ast), imports inside functions included.

Truth: the order of docs/extending.md ("Package order"), the same as the import-linter
contracts in pyproject.toml: kernels import no layer / model / experiment / config / cli;
layers no model; models no experiment or config; no import circle among src/ntkexp modules;
an ntkexp import inside a function only where a plug-in is loaded by name or an optional
dependency is imported; no ``jax._src`` anywhere.
"""

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"

# Modules whose function-level ntkexp imports are still tolerated, each with its reason.
# (A plug-in loaded by name goes through importlib, an optional dependency is not an ntkexp
# module: neither is an ``import`` statement the checks below see, so neither needs a line.)
LAZY_IMPORTS_ALLOWED: dict[str, str] = {}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in (SRC / "ntkexp").rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _imports(name: str):
    """``(target module, lineno, in_function)`` for every ntkexp import of module ``name``."""
    p = MODULES[name]
    tree = ast.parse(p.read_text())
    pkg = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
    in_fn = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_fn.update(id(n) for n in ast.walk(fn) if n is not fn)
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            m = node.module or ""
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                m = ".".join(base + ([m] if m else []))
            subs = [f"{m}.{a.name}" for a in node.names if f"{m}.{a.name}" in MODULES]
            targets = subs + ([m] if len(subs) < len(node.names) else [])
        for t in targets:
            if t.startswith("ntkexp"):
                while t not in MODULES and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t != name:
                    yield t, node.lineno, id(node) in in_fn


def _under(mod: str, pkgs) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in pkgs)


FORBIDDEN = {
    "ntkexp.kernels": ("ntkexp.layers", "ntkexp.models", "ntkexp.experiments", "ntkexp.config",
                       "ntkexp.cli", "ntkexp.plotting", "ntkexp.training", "ntkexp.empirical",
                       "ntkexp.tiles"),
    "ntkexp.layers": ("ntkexp.models", "ntkexp.experiments", "ntkexp.config", "ntkexp.cli",
                      "ntkexp.training", "ntkexp.empirical"),
    "ntkexp.models": ("ntkexp.experiments", "ntkexp.config", "ntkexp.cli", "ntkexp.plotting",
                      "ntkexp.training"),
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_packages_import_nothing_above(package):
    bad = [f"{name}:{line} imports {t}" for name in MODULES if _under(name, [package])
           for t, line, _ in _imports(name) if _under(t, FORBIDDEN[package])]
    assert not bad, "\n".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    """Counting imports inside functions too (the ones that used to dodge circles)."""
    edges = {name: {t for t, _, _ in _imports(name)} for name in MODULES}
    cycles = _cycles(edges)
    assert not cycles, cycles


def test_function_level_imports_only_for_plugins_and_optional_deps():
    """No ntkexp import inside a function outside the named exceptions (each such import
    was a dodge of a circle; the order above makes them top-level)."""
    bad = [f"{name}:{line} imports {t} inside a function" for name in MODULES
           if name not in LAZY_IMPORTS_ALLOWED
           for t, line, in_fn in _imports(name) if in_fn]
    assert not bad, "\n".join(bad)


def test_no_private_jax_api():
    bad = [f"{p}: {line.strip()}" for p in MODULES.values()
           for line in p.read_text().splitlines() if "jax._src" in line]
    assert not bad, "\n".join(bad)
