"""The layering the README's Layout states: imports point one way, bench -> training -> flywheel -> service.

The serve image carries only ``service/`` and ``flywheel/``, so an import of ``training`` or ``bench``
from them would fail there and nowhere else; these tests make it fail here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

KNOWN_CYCLES: list[list[str]] = []  # none: DeepMADConfig lives with the other configurations
# Lowest floor first: a package may import only the packages listed before it.
FLOORS = ["service", "flywheel", "training", "bench"]
ABOVE = {package: set(FLOORS[i + 1 :]) | {"tests"} for i, package in enumerate(FLOORS)}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports (relative imports stay inside its own package)."""
    return {name.split(".")[0] for name in imported_modules(path)}


def imported_modules(path: Path) -> set[str]:
    """Dotted modules a module imports at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_no_import_points_up():
    upward = {
        str(path.relative_to(REPO_ROOT)): sorted(imported_packages(path) & forbidden)
        for package, forbidden in ABOVE.items()
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        if imported_packages(path) & forbidden
    }
    assert upward == {}
    assert "service" in imported_packages(REPO_ROOT / "flywheel" / "captures.py")  # the test can see an import
    assert "flywheel" in imported_packages(REPO_ROOT / "training" / "quantize.py")


def module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, for every module of the four floors."""
    names = {}
    for package in FLOORS:
        for path in (REPO_ROOT / package).rglob("*.py"):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {name: {m for m in imported_modules(path) if m in names and m != name} for name, path in names.items()}


def test_no_import_cycles():
    graph = module_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == KNOWN_CYCLES
    assert "flywheel.model_store" in graph["flywheel.promote"]  # the graph sees project imports


def test_flywheel_runs_without_torch():
    """The gate and the export run in the serve image, which has no torch (nor training's scipy)."""
    code = (
        "import sys, flywheel.captures, flywheel.promote, flywheel.model_store, flywheel.metrics; "
        "print(sorted(m for m in ('torch', 'scipy', 'training', 'bench') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
