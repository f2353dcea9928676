"""No function in `runphi/` is over 60 lines, except the data tables allow-listed here.

A function is measured from its `def` line to the last line of its body
(`end_lineno - lineno + 1`), docstring included, decorators excluded.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = REPO_ROOT / "runphi"
MAX_LINES = 60
MIN_FUNCTIONS = 300  # fewer means the walk missed files, not that the package shrank

# "path::qualified.name" -> why its length is data, not logic. An entry that no longer
# exists or is no longer over MAX_LINES fails the test, so this list cannot rot.
ALLOWED: dict[str, str] = {
    "runphi/backends/jailhouse/cellrender.py::_c_struct_defs": (
        "C struct-definition template: one f-string literal of the packed structs, "
        "only four profile-dependent member lines are computed"
    ),
}

_Function = ast.FunctionDef | ast.AsyncFunctionDef


def _functions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, _Function]]:
    """Every function and method under `node`, nested ones too, with its dotted qualified name."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = prefix + child.name
            if not isinstance(child, ast.ClassDef):
                yield name, child
            yield from _functions(child, name + ".")
        else:
            # Functions defined under if/try/with blocks still count.
            yield from _functions(child, prefix)


def _length(node: _Function) -> int:
    """Lines from `def` to the end of the body."""
    # Since Python 3.8 a function's `lineno` is its `def` line, so decorators are not counted.
    assert node.end_lineno is not None  # always set by ast.parse
    return node.end_lineno - node.lineno + 1


def measure_source(source: str, path: str) -> list[tuple[str, int, int]]:
    """(`path::qualname`, line of `def`, length) of every function in `source`."""
    return [(f"{path}::{name}", node.lineno, _length(node)) for name, node in _functions(ast.parse(source, path))]


@pytest.fixture(scope="module")
def measured() -> list[tuple[str, int, int]]:
    """Every function of every `runphi/**/*.py`, paths relative to the repository root."""
    return [
        entry
        for file in sorted(PACKAGE.rglob("*.py"))
        for entry in measure_source(file.read_text(encoding="utf-8"), file.relative_to(REPO_ROOT).as_posix())
    ]


def test_measurement_counts_def_to_end_without_decorators() -> None:
    source = (
        "import functools\n"
        "@functools.cache\n"
        "@functools.wraps(print)\n"
        "def f():\n"
        "    def inner():\n"
        "        return 1\n"
        "    return inner\n"
        "class C:\n"
        "    @property\n"
        "    def m(self):\n"
        "        return 2\n"
        "if True:\n"
        "    async def g():\n"
        "        pass\n"
    )
    assert measure_source(source, "x.py") == [
        ("x.py::f", 4, 4),
        ("x.py::f.inner", 5, 2),
        ("x.py::C.m", 10, 2),
        ("x.py::g", 13, 2),
    ]


def test_walk_covers_the_package(measured: list[tuple[str, int, int]]) -> None:
    assert len(measured) >= MIN_FUNCTIONS, f"only {len(measured)} functions measured under {PACKAGE}"


def test_no_function_over_limit_outside_allow_list(measured: list[tuple[str, int, int]]) -> None:
    too_long = [
        f"{key} (line {line}): {length} lines"
        for key, line, length in measured
        if length > MAX_LINES and key not in ALLOWED
    ]
    assert not too_long, (
        f"{len(too_long)} function(s) over {MAX_LINES} lines; split them into helpers "
        "(or, if one is a data table, add it to ALLOWED with the reason):\n  " + "\n  ".join(too_long)
    )


def test_allow_list_entries_are_still_over_limit(measured: list[tuple[str, int, int]]) -> None:
    longest: dict[str, int] = {}
    for key, _, length in measured:
        longest[key] = max(length, longest.get(key, 0))
    stale = [
        f"{key}: " + ("no longer exists" if key not in longest else f"now {longest[key]} lines")
        for key in ALLOWED
        if longest.get(key, 0) <= MAX_LINES
    ]
    assert not stale, f"remove from ALLOWED (not over {MAX_LINES} lines any more):\n  " + "\n  ".join(stale)


def test_allow_list_entries_give_a_reason() -> None:
    assert all(reason.strip() for reason in ALLOWED.values())
