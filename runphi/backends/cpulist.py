"""Linux kernel CPU list syntax (`%*pbl`): `0-3`, `0,2-3`, `` (empty set)."""

from __future__ import annotations

from collections.abc import Iterable

MAX_CPU = 4095  # far above any board; bounds hostile ranges like 0-999999999


class CpuListError(ValueError):
    """A CPU list string is not valid kernel list syntax."""


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPUs named by `text` in kernel list syntax; surrounding whitespace is ignored.

    Accepts `a`, `a-b`, and the kernel's stride form `a-b:g/w`, joined by commas.
    Raises CpuListError naming the offending element.
    """
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return frozenset()
    for element in text.split(","):
        cpus.update(_parse_element(element.strip(), text))
    return frozenset(cpus)


def _parse_element(element: str, whole: str) -> range | list[int]:
    try:
        if "-" not in element:
            return [_cpu(element)]
        span, _, stride = element.partition(":")
        first_s, _, last_s = span.partition("-")
        first, last = _cpu(first_s), _cpu(last_s)
        if first > last:
            raise CpuListError
        if not stride:
            return range(first, last + 1)
        used_s, _, group_s = stride.partition("/")
        used, group = int(used_s), int(group_s)
        if not 0 < used <= group:
            raise CpuListError
        return [n for n in range(first, last + 1) if (n - first) % group < used]
    except (CpuListError, ValueError):
        raise CpuListError(f"invalid CPU list element {element!r} in {whole!r} (expected e.g. 0-3 or 0,2-3)") from None


def _cpu(text: str) -> int:
    if not text.isdigit():
        raise CpuListError
    value = int(text)
    if value > MAX_CPU:
        raise CpuListError
    return value


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Kernel list syntax for `cpus`: ascending ranges joined by commas, `` when empty."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)
