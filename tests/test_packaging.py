"""The `softfine` package declares what it imports: every third-party module that softfine/*.py
imports is a dependency of the package itself in pyproject.toml (not only of an extra)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
# Import names that differ from the distribution's name.
DISTRIBUTION = {"yaml": "pyyaml", "typing_extensions": "typing-extensions"}
# typing_extensions comes with pydantic (one of its own dependencies), which is declared.
PROVIDED_BY = {"typing_extensions": "pydantic"}


def imported_modules(folder: Path) -> set[str]:
    """Top-level names of the absolute imports in a folder's modules, standard library excluded."""
    names = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("__future__", "softfine")}


def test_every_import_of_softfine_is_a_declared_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    imported = imported_modules(REPO / "softfine")
    assert {"torch", "pydantic", "yaml"} <= imported  # the scan sees the imports inside functions too
    missing = sorted(
        name
        for name in imported
        if DISTRIBUTION.get(name, name) not in declared and PROVIDED_BY.get(name) not in declared
    )
    assert not missing, f"imported by softfine/ but not in [project] dependencies: {missing}"
    assert "ray" not in imported  # softfine/ never imports Ray (tune/ does)
