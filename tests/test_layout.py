"""The layering the README's Layout states: imports point one way, bench -> training -> service.

The serve image carries only ``service/``, so an import of ``training`` or ``bench`` from it would fail
there and nowhere else; this test makes it fail here.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

ABOVE = {"service": {"training", "bench", "tests"}, "training": {"bench", "tests"}}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports (relative imports stay inside its own package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_import_points_up():
    upward = {
        str(path.relative_to(REPO_ROOT)): sorted(imported_packages(path) & forbidden)
        for package, forbidden in ABOVE.items()
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        if imported_packages(path) & forbidden
    }
    assert upward == {}
    assert "service" in imported_packages(REPO_ROOT / "training" / "captures.py")  # the test can see an import
