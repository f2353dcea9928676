"""How long ``create``, ``start`` and ``delete`` of ZICs take: one histogram per verb and node.

Every successful operation adds its duration to ``<state_dir>/verb-latency.json`` under an
exclusive ``flock`` of ``<state_dir>/verb-latency.lock``, so concurrent verb processes and
shim servers of every namespace never lose a sample. ``runphi metrics`` exports the histograms. Recording never
fails the operation: a sample that cannot be written is dropped. Lean (stdlib + msgspec).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from runphi.files import atomic_write

LATENCY_FILE = "verb-latency.json"
LOCK_FILE = "verb-latency.lock"
#: Upper bounds (seconds) of the histogram buckets; the last, implicit one is +Inf.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram(msgspec.Struct):
    """Cumulative-free bucket counts (``counts[i]``: samples in (BUCKETS[i-1], BUCKETS[i]],
    the last one above every bound), their number and their sum (seconds)."""

    counts: list[int] = msgspec.field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    count: int = 0
    sum: float = 0.0

    def add(self, seconds: float) -> None:
        index = next((i for i, bound in enumerate(BUCKETS) if seconds <= bound), len(BUCKETS))
        self.counts[index] += 1
        self.count += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, samples at or below it) for every bucket, +Inf last (Prometheus' form)."""
        out, running = [], 0
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


_decoder = msgspec.json.Decoder(dict[str, Histogram])


def read_latencies(root: str | os.PathLike[str]) -> dict[str, Histogram]:
    """The node's histograms by verb (``root``: its state dir; empty when none were recorded)."""
    try:
        data = Path(root, LATENCY_FILE).read_bytes()
        histograms = _decoder.decode(data)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return {}
    return {verb: h for verb, h in histograms.items() if len(h.counts) == len(BUCKETS) + 1}


def record_latency(root: str | os.PathLike[str], verb: str, seconds: float) -> None:
    """Add one ``verb`` sample of ``seconds`` to the node's histograms (``root``: its state dir;
    dropped on any I/O error, or when there is no state dir)."""
    if not root:
        return
    try:
        with _locked(Path(root)):
            histograms = read_latencies(root)
            histograms.setdefault(verb, Histogram()).add(seconds)
            atomic_write(Path(root, LATENCY_FILE), msgspec.json.encode(histograms))
    except OSError:
        pass


@contextmanager
def timed(root: str | os.PathLike[str], verb: str) -> Iterator[None]:
    """Record how long the with-block took as a ``verb`` sample, when it completes without an error."""
    began = time.monotonic()
    yield
    record_latency(root, verb, time.monotonic() - began)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
