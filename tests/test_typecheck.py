"""mypy over ``runphi/`` is clean, with the settings in pyproject.toml's ``[tool.mypy]``.

mypy is pinned in the ``test`` extra. The run must check the whole package: its summary
line has to count at least :data:`MIN_SOURCE_FILES` files, so a configuration that
checks nothing (a wrong ``files``, a typo'd path) fails instead of passing vacuously.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MIN_SOURCE_FILES = 50
TIMEOUT_S = 600


def run_mypy() -> subprocess.CompletedProcess[str]:
    """``python -m mypy`` from the repo root with pyproject.toml's configuration."""
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def checked_file_count(output: str) -> int | None:
    """How many source files mypy's summary line says it checked (None: no summary line)."""
    match = re.search(r"(?:no issues found in|checked) (\d+) source files?", output)
    return int(match.group(1)) if match else None


def test_summary_line_is_parsed():
    assert checked_file_count("Success: no issues found in 63 source files\n") == 63
    assert checked_file_count("Found 2 errors in 1 file (checked 61 source files)\n") == 61
    assert checked_file_count("usage: mypy ...\n") is None


def test_mypy_is_clean_over_runphi():
    result = run_mypy()
    output, returncode = result.stdout + result.stderr, result.returncode
    assert returncode == 0, f"mypy exited {returncode}:\n{output}"
    count = checked_file_count(output)
    assert count is not None and count >= MIN_SOURCE_FILES, (
        f"mypy checked {count} source files, expected at least {MIN_SOURCE_FILES}:\n{output}")
