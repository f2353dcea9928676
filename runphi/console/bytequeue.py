"""A bounded FIFO of bytes that makes room by forgetting the oldest bytes.

This is the buffer between a console source that must always be drained (a
UART overruns if nobody reads it) and a sink that may stall (nobody reads the
shim's FIFO). Pure and synchronous so it can be tested exhaustively.
"""

from __future__ import annotations

from collections import deque


class DropOldestQueue:
    """At most ``limit`` bytes, oldest first; pushing beyond the limit drops the oldest.

    Guarantees: after every operation ``len(self) <= limit``; the bytes kept are
    always the newest ones pushed and not yet consumed, in order; every byte
    pushed is either consumed or counted exactly once as dropped.
    """

    __slots__ = ("_chunks", "_head_offset", "_size", "limit")

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"queue limit must be positive, not {limit}")
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._head_offset = 0  # bytes of _chunks[0] already consumed or dropped
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, data: bytes) -> int:
        """Append ``data``; return how many of the oldest bytes were dropped to fit."""
        if not data:
            return 0
        dropped = 0
        if len(data) >= self.limit:
            # Only the newest `limit` bytes of this chunk can survive; the rest is lost too.
            dropped = self._size + len(data) - self.limit
            self.clear()
            data = data[-self.limit:]
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self.limit:
            excess = self._size - self.limit
            self._forget(excess)
            dropped += excess
        return dropped

    def peek(self) -> memoryview:
        """The oldest contiguous run of queued bytes (empty when the queue is empty)."""
        if not self._chunks:
            return memoryview(b"")
        return memoryview(self._chunks[0])[self._head_offset:]

    def consume(self, count: int) -> None:
        """Forget the ``count`` oldest bytes, which the caller has delivered."""
        if count < 0 or count > self._size:
            raise ValueError(f"cannot consume {count} of {self._size} queued bytes")
        self._forget(count)

    def clear(self) -> int:
        """Forget everything; return how many bytes that was."""
        size = self._size
        self._chunks.clear()
        self._head_offset = 0
        self._size = 0
        return size

    def _forget(self, count: int) -> None:
        while count:
            head_left = len(self._chunks[0]) - self._head_offset
            if count < head_left:
                self._head_offset += count
                self._size -= count
                return
            self._chunks.popleft()
            self._head_offset = 0
            self._size -= head_left
            count -= head_left
