"""No product function is longer than 60 lines (the re-layering rule), and none may newly become so.

A function's length is ``end_lineno - lineno + 1`` of its ``def`` (decorators excluded, nested
functions counted within their parent and on their own). ALLOWED would name long functions still
being split; it must equal what the scan finds, so a new long function fails this test, and so does a
split one still listed there. It is empty: no product function is longer.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_PACKAGES = ("fedcare", "client", "server", "simulation", "secure_aggregation", "audit", "shared_models")
MAX_LINES = 60

# "path::qualified name" -> still being split by other engineers; the lead shrinks this set.
ALLOWED: set[str] = set()  # none left: every product function is at most MAX_LINES long


def long_functions(source: str, max_lines: int = MAX_LINES) -> dict[str, int]:
    """Qualified name -> length of every function or method in ``source`` longer than ``max_lines``."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = child.end_lineno - child.lineno + 1
                    if length > max_lines:
                        found[name] = length
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def product_files() -> list[Path]:
    files = []
    for package in PRODUCT_PACKAGES:
        found = sorted((ROOT / package).rglob("*.py"))
        assert found, f"product package {package}/ holds no Python files: update PRODUCT_PACKAGES"
        files += found
    return files


def test_no_product_function_is_longer_than_60_lines_except_those_being_split():
    found = {}
    for path in product_files():
        rel = path.relative_to(ROOT).as_posix()
        for name, length in long_functions(path.read_text(encoding="utf-8")).items():
            found[f"{rel}::{name}"] = length
    new = {name: found[name] for name in sorted(set(found) - ALLOWED)}
    split = sorted(ALLOWED - set(found))
    assert not new, f"functions over {MAX_LINES} lines (split them into helpers with one job each): {new}"
    assert not split, f"these are no longer over {MAX_LINES} lines: remove them from ALLOWED: {split}"


def test_length_counts_from_def_to_last_line_without_decorators():
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    source = (
        f"@decorator\n@another\ndef fits():\n{body}"
        f"class Holder:\n    def method(self):\n{body.replace('    ', '        ')}        return 1\n"
        f"def outer():\n    def inner():\n{body.replace('    ', '        ')}        return 1\n"
    )
    # fits: def + 59 lines = 60 (decorators not counted); method: 61; inner: 61, so outer: 62.
    assert long_functions(source) == {"Holder.method": 61, "outer": 62, "outer.inner": 61}
