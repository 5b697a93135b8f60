"""The package's shape is its data flow: these tests read every module's imports (statically, with
``ast``) and hold the rules of docs/architecture.md — the write side never imports the read side,
the read side never imports torch, and no two modules import each other at import time."""

from __future__ import annotations

import ast
import pathlib

import pytest

import probe

ROOT = pathlib.Path(probe.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = ("probe",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES_KNOWN = {".".join(("probe",) + p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for p in ROOT.rglob("*.py")}


def _imports(path: pathlib.Path, top_level_only: bool = False) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved; for
    ``from pkg import name`` both ``pkg`` and ``pkg.name``, since ``name`` may be a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = {f"{mod}.{a.name}" for a in node.names}
            # ``from pkg import sub`` imports the submodule (and runs pkg/__init__, which holds no edge of its own)
            out |= names if names <= MODULES_KNOWN else names | {mod}
    return out


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_tree_has_the_documented_units():
    for unit in ("probe.capture", "probe.stats", "probe.store", "probe.results", "probe.present", "probe.export",
                 "probe.cli", "probe.integrations"):
        assert unit in MODULES, f"{unit} is missing"


@pytest.mark.parametrize("name", [m for m in MODULES if _under(m, "probe.capture")])
def test_write_side_never_imports_the_read_side(name):
    bad = sorted(i for i in _imports(MODULES[name])
                 if _under(i, "probe.results", "probe.present", "probe.cli") or i in ("probe.load", "probe.merge"))
    assert not bad, f"{name} (write side) imports {bad}; hand windows to probe.store instead"


READ_SIDE = [m for m in MODULES if _under(m, "probe.results", "probe.present", "probe.stats._state",
                                            "probe.stats._buckets")]


@pytest.mark.parametrize("name", READ_SIDE)
def test_read_side_imports_neither_torch_nor_the_write_side(name):
    bad = sorted(i for i in _imports(MODULES[name]) if _under(i, "torch", "probe.capture"))
    assert not bad, f"{name} (read side) imports {bad}"


def test_read_side_is_not_empty():
    # the parametrized tests above cannot pass on an empty selection
    assert len(READ_SIDE) >= 6 and sum(_under(m, "probe.capture") for m in MODULES) >= 8


def _unit(name: str) -> str:
    # the numpy-only parts of stats/ are units of their own: the read side may use them, not the rest
    if name in ("probe.stats._state", "probe.stats._buckets"):
        return name
    return ".".join(name.split(".")[:2])


#: which units each unit may import (any import, inside functions too); the arrows of the data flow
ALLOWED = {
    "probe.errors": set(),
    "probe._version": set(),
    "probe.models": {"probe.errors"},
    "probe.stats._state": {"probe.errors"},
    "probe.stats._buckets": {"probe.errors"},
    "probe.stats": {"probe.errors", "probe.stats._state", "probe.stats._buckets"},
    "probe.results": {"probe.errors", "probe.stats._state", "probe.stats._buckets"},
    "probe.present": {"probe.errors", "probe.results", "probe.stats._state", "probe.stats._buckets"},
    "probe.store": {"probe.errors", "probe._version", "probe.results", "probe.stats._state", "probe.stats._buckets"},
    "probe.capture": {"probe.errors", "probe._version", "probe.stats", "probe.stats._state", "probe.stats._buckets",
                      "probe.store"},
    "probe.export": {"probe.errors", "probe.results", "probe.store", "probe.stats._state", "probe.stats._buckets"},
    "probe.integrations": {"probe", "probe.errors", "probe.capture", "probe.export", "probe.results", "probe.store"},
}


@pytest.mark.parametrize("unit", sorted(ALLOWED))
def test_units_import_only_what_the_data_flow_allows(unit):
    members = [m for m in MODULES if _unit(m) == unit]
    assert members, f"no module in {unit}"
    got = {_unit(i) for m in members for i in _imports(MODULES[m]) if i in MODULES and _unit(i) != unit}
    assert got <= ALLOWED[unit], f"{unit} imports {sorted(got - ALLOWED[unit])}, outside its allowed {sorted(ALLOWED[unit])}"


def test_every_unit_is_placed():
    # a new package must say where it sits in the data flow (the top-level package, `python -m probe` and the
    # CLI may import anything)
    units = {_unit(m) for m in MODULES} - {"probe", "probe.__main__", "probe.cli"}
    assert units <= set(ALLOWED), f"units without a rule: {sorted(units - set(ALLOWED))}"


def test_no_import_cycle_at_import_time():
    """Module-level imports between probe's modules form no cycle (imports inside functions, which
    keep ``import probe`` light, are not edges)."""
    graph = {name: {i for i in _imports(path, top_level_only=True) if i in MODULES and i != name}
             for name, path in MODULES.items()}
    # a package's __init__ importing its own submodules is how packages re-export: not a cycle edge back
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                if not all(_under(c, cycle[0]) or _under(cycle[0], c) for c in cycle):
                    pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)


def test_public_surface():
    assert sorted(probe.__all__) == sorted(["capture", "load", "merge", "export", "ProbeError", "__version__"])
    # top-level modules are the documented public ones or private
    top = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__")
    assert [t for t in top if not t.startswith("_")] == ["errors", "models"]
