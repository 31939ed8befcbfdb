"""No test module imports from ``conftest``: under the whole suite the name ``conftest`` is
whichever directory's conftest pytest imported last, so ``from conftest import PG_DSN`` worked
in its own directory and failed to collect in CI (tests/cloud's conftest has no ``PG_DSN``).
Shared test values live in ``*_testkit`` modules at the top of tests/."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_test_module_imports_from_conftest() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name == "conftest.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "conftest":
                offenders.append(f"{path.relative_to(TESTS)}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(a.name == "conftest" for a in node.names):
                offenders.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert offenders == [], offenders
