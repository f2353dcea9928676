"""The shell blocks of the project's Markdown files, as the tests that run them read them.

A *shell block* is a fenced code block whose info string is ``sh`` — or ``bash``,
``shell``, ``console`` or nothing at all: those count too, so no command can hide from
the tests behind another spelling. Other info strings (``text``, ``toml``, ``json``,
``python``, ``dockerfile``) are not commands. A block is addressed by the file, the
nearest heading above it (its text, without the ``#``) and its index among the shell
blocks under that heading.

A shell block that cannot run on a test machine carries the line
``<!-- not run: REASON -->`` directly above its opening fence (see tests/test_docs_blocks.py).

Also here: the edits every doc test makes to keep a run private (:func:`clean_env`,
:func:`ctr_prelude`, :func:`private_paths`, :func:`import_platform`).
"""

from __future__ import annotations

import os
import platform
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from tools.testbed.containerd import NAMESPACE, ZIC_IMAGE_PLATFORM

REPO_ROOT = Path(__file__).resolve().parent.parent
SHELL_INFO = frozenset({"sh", "bash", "shell", "console", ""})
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`{]*)")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_NOT_RUN = re.compile(r"^<!--\s*not run:(.*?)-->\s*$")
_LIST_ITEM = re.compile(r"^\s*([*+-]|\d+[.)])\s")


@dataclass(frozen=True)
class Block:
    """One shell block: where it is, what it says, and why it is not run (None: it is)."""

    path: Path
    heading: str
    index: int
    line: int
    text: str
    not_run: str | None

    @property
    def key(self) -> tuple[str, str, int]:
        """(path relative to the checkout, heading, index): how tests name the block."""
        return (self.path.relative_to(REPO_ROOT).as_posix(), self.heading, self.index)


def shell_blocks(path: Path) -> list[Block]:
    """Every shell block of ``path`` in order, its text dedented as a reader would paste it."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    per_heading: dict[str, int] = {}
    heading, i = "", 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence:
            end = _closing_fence(lines, i, fence.group(1))
            if fence.group(2) in SHELL_INFO:
                index = per_heading.get(heading, 0)
                per_heading[heading] = index + 1
                marker = _NOT_RUN.match(lines[i - 1].strip()) if i else None
                text = textwrap.dedent("\n".join(lines[i + 1:end]) + "\n")
                blocks.append(Block(path, heading, index, i + 1, text,
                                    marker.group(1).strip() if marker else None))
            i = end + 1
            continue
        if found := _HEADING.match(lines[i]):
            heading = found.group(1)
        i += 1
    return blocks


def _closing_fence(lines: list[str], opening: int, fence: str) -> int:
    """Index of the line closing the fence opened at ``opening`` (the end of the file if none)."""
    for j in range(opening + 1, len(lines)):
        stripped = lines[j].strip()
        if stripped.startswith(fence) and set(stripped) == {fence[0]}:
            return j
    return len(lines)


def sh_block(path: Path, heading: str, index: int = 0) -> str:
    """The text of the ``index``-th shell block under ``heading`` in ``path``."""
    found = [b for b in shell_blocks(path) if b.heading == heading and b.index == index]
    if not found:
        raise LookupError(f"{path}: no shell block {index} under heading {heading!r}")
    return found[0].text


def indented_code_lines(path: Path) -> list[int]:
    """1-based first lines of the indented code blocks of ``path`` (outside fences and lists).

    Indented blocks cannot say what they hold, so the docs fence their commands instead.
    """
    lines = path.read_text().splitlines()
    starts, i, previous_blank, in_list = [], 0, True, False
    while i < len(lines):
        line = lines[i]
        if fence := _FENCE.match(line):
            i = _closing_fence(lines, i, fence.group(1)) + 1
            previous_blank, in_list = False, False
            continue
        if not line.strip():
            previous_blank = True
        elif line.startswith(("    ", "\t")) and previous_blank and not in_list:
            starts.append(i + 1)
            while i + 1 < len(lines) and (not lines[i + 1].strip() or lines[i + 1].startswith(("    ", "\t"))):
                i += 1
        else:
            # A list item's continuation lines are indented too; they are not code.
            in_list = bool(_LIST_ITEM.match(line)) or (in_list and line[:1].isspace())
            previous_blank = False
        i += 1
    return starts


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without runphi's variables (a doc block sets its own), plus ``extra``.

    ``RUNPHI_CACHE`` stays: it locates the Linux guest the test fixtures already built.
    """
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("RUNPHI_") or key == "RUNPHI_CACHE"}
    return {**env, **extra}


def ctr_prelude(containerd) -> str:
    """Shell lines that aim every later ``ctr`` at the test's private containerd.

    ``ctr`` gains ``--address``; its namespace defaults to the tests' own (a block's own
    ``-n`` still wins, inside the same private containerd).
    """
    return (f'ctr() {{ command ctr --address {containerd.address} "$@"; }}\n'
            f"export CONTAINERD_NAMESPACE={NAMESPACE}\n")


def private_paths(block: str, containerd, runphi: Path) -> str:
    """``block`` with runphi's installed path and ``/run/runphi`` replaced by the test's."""
    return block.replace("/usr/local/bin/runphi", str(runphi)).replace("/run/runphi",
                                                                      str(containerd.runtime_root))


def import_platform(block: str) -> str:
    """``block`` with ``--platform linux/arm64`` added to each ``image import`` lacking it,
    on a host that is not arm64 (what the docs tell such hosts to add)."""
    if platform.machine() in ("aarch64", "arm64"):
        return block
    return "\n".join(line if "--platform" in line else
                     line.replace("image import ", f"image import --platform {ZIC_IMAGE_PLATFORM} ")
                     for line in block.split("\n"))
