"""The house: moebench's subpackages import downward only, and no module takes part in an import cycle.

Every ``import`` and ``from ... import`` in the package is read from the source (module level and
inside functions alike). Plugins (`moebench.methods`, the ``moebench.plugins`` entry points) are
found at run time by name (`importlib.import_module`), which is how a registry discovers them and
is not an import edge.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {"moebench": ROOT / "moebench", "moebench.methods": ROOT / "methods", "moebench.tasks": ROOT / "tasks"}

# Bottom to top: a subpackage may import only subpackages of a lower rank.
RANKS = {
    "moebench": 0, "moebench.util": 0, "moebench.tasks": 0,
    "moebench.moe": 1,
    "moebench.calib": 2,
    "moebench.method": 3,
    "moebench.methods": 4,
    "moebench.eval": 5,
    "moebench.measure": 6,
    "moebench.grid": 7,
    "moebench.report": 8, "moebench.testbed": 8,
    "moebench.results": 9,  # the results API: the report's tables as DataFrames
    "moebench.cli": 10,
}
BUILD_ONLY = {"moebench._packaging"}  # setuptools commands, never imported at run time


def modules() -> dict[str, pathlib.Path]:
    """Every module of the installed package tree: dotted name -> file."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if name not in BUILD_ONLY and "models" not in parts:
                found[name] = path
    return found


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The moebench modules that ``name`` imports (``from a import b`` counts ``a.b`` when it is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def subpackage(module: str) -> str:
    """The ranked subpackage a module belongs to (the longest prefix in RANKS)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANKS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} belongs to no ranked subpackage: add it to RANKS")


def test_every_subpackage_is_ranked_and_documented():
    for name, path in modules().items():
        subpackage(name)
        if path.name == "__init__.py":
            assert ast.get_docstring(ast.parse(path.read_text())), f"{name} has no docstring saying what lives there"


def test_no_upward_or_sideways_import_between_subpackages():
    bad = []
    for module, targets in graph().items():
        for target in targets:
            a, b = subpackage(module), subpackage(target)
            if a != b and RANKS[b] >= RANKS[a]:
                bad.append(f"{module} ({a}, rank {RANKS[a]}) imports {target} ({b}, rank {RANKS[b]})")
    assert not bad, "imports must point down the layers:\n  " + "\n  ".join(sorted(bad))


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_checker_sees_a_violation():
    """The walker is not vacuous: known downward edges are found (cli -> grid, grid -> moe)."""
    edges = graph()
    assert "moebench.grid.runner" in edges["moebench.cli.grid"]
    assert any(t.startswith("moebench.moe") for t in edges["moebench.grid.cell"] | edges["moebench.grid.runner"])
