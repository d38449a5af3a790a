"""The test suite's own layout: test modules share code only through conftest.py (fixtures) and
helpers.py (plain functions), never by importing each other."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_module_imports_another():
    modules = {p.stem for p in TESTS.glob("test_*.py")}
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in modules]
    assert not offenders, "\n".join(offenders)
