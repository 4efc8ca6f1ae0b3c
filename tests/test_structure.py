"""The code's shape (issue 20): no module of softlabels/ over 500 lines, no function over 60, no import
circle between its modules, and no private (underscore) name imported from another module.

Read from the source with ``ast`` alone; nothing is imported, so a circle that Python would tolerate
(imports inside functions) still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "softlabels"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(module imported, the names taken from it) for every import in the file, functions included."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "softlabels"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "softlabels":
                target = node.module
            else:
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            found += [(target, [n for n in names if f"{target}.{n}" not in known])] + [(s, []) for s in submodules]
    return [(target, names) for target, names in found if target in known]


def function_lengths(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((f"{path.relative_to(REPO)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1))
    return out


def test_no_module_over_500_lines_and_no_function_over_60():
    known = modules()
    long_modules = {str(p.relative_to(REPO)): n for p in known.values() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long_modules
    long_functions = [(where, n) for p in known.values() for where, n in function_lengths(p) if n > MAX_FUNCTION_LINES]
    assert not long_functions


def circles_in(graph: dict[str, list[str]]) -> list[list[str]]:
    """The circles a depth-first walk meets (each as the modules along it), none for a layered graph."""
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                circles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    return circles


def test_no_import_circle_between_modules():
    known = modules()
    # a module's imports of itself, of its own package's __init__, or of the top package are not edges
    graph = {name: sorted({t for t, _ in imported_modules(name, path, known) if t != name and not name.startswith(t + ".")})
             for name, path in known.items()}
    assert not circles_in(graph)


def test_no_private_name_crosses_modules():
    known = modules()
    crossing = [f"{name} imports {target}.{n}" for name, path in known.items() for target, names in imported_modules(name, path, known)
                for n in names if n.startswith("_") and not n.startswith("__") and target != name]
    assert not crossing


def test_the_checks_see_what_they_check():
    """The walkers above find the package's modules, imports and functions (so a pass is not vacuous)."""
    known = modules()
    assert {"softlabels.generate", "softlabels.rundir.lifecycle", "softlabels.train.recipe", "softlabels.data.dataset"} <= known.keys()
    taken = dict(imported_modules("softlabels.data.reading", known["softlabels.data.reading"], known))
    assert "validate_shard" in taken["softlabels.rundir"]
    assert any(n > 40 for _, n in function_lengths(known["softlabels.generate"]))
    assert circles_in({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert circles_in({"a": ["b", "c"], "b": ["c"], "c": []}) == []
