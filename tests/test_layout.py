"""The package reads as its architecture: subpackages that say what they hold, and no class
or function grown past what one can read at once."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lstm_lm"
MAX_CLASS, MAX_FUNCTION = 250, 60  # lines, as ruff formats them


def test_every_subpackage_opens_with_a_docstring_that_maps_its_modules():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc, init
        modules = [p.stem for p in init.parent.glob("*.py") if p.stem != "__init__"]
        missing = [m for m in modules if f"{m}.py" not in doc]
        assert not missing, f"{init.parent.name}/__init__.py does not map {missing}"


def test_no_class_or_function_is_too_long_to_read():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.end_lineno - node.lineno + 1 >= limit:
                long.append(f"{path.relative_to(PACKAGE)}:{node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
