"""The hypervisor console: one 2048-byte ring shared by the HV and all cells."""

from __future__ import annotations

import errno

import msgspec

RING_SIZE = 2048


class ConsoleChunk(msgspec.Struct, frozen=True):
    """One ``read()`` of ``/dev/jailhouse``: data plus the reader's new position."""

    data: bytes
    head: int
    saved_seen: int
    error: int = 0


class HvConsole:
    """Ring buffer with a free-running tail and the snapshot saved at ``disable``."""

    def __init__(self) -> None:
        self.content = bytearray()
        self.tail = 0
        self.saved: bytes | None = None
        self.saved_id = 0

    def write(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        self.content += data
        del self.content[:-RING_SIZE]
        self.tail += len(data)

    def snapshot(self) -> bytes:
        """What the sysfs ``console`` attribute shows: the last <=2048 bytes."""
        return bytes(self.content)

    def save(self) -> None:
        """Keep the final log at ``disable`` so ``jailhouse console`` can replay it once."""
        self.saved = self.snapshot()
        self.saved_id += 1

    def read(self, head: int, saved_seen: int, enabled: bool, follow: bool) -> ConsoleChunk:
        """One read of ``/dev/jailhouse`` following the driver's rules (jailhouse.md §2.5)."""
        if self.saved is not None and saved_seen < self.saved_id:
            return ConsoleChunk(self.saved, head, self.saved_id)
        if not enabled:
            if follow:
                return ConsoleChunk(b"", 0, saved_seen)
            if self.saved is not None:
                return ConsoleChunk(b"", head, saved_seen)  # end of the replayed final log
            return ConsoleChunk(b"", head, saved_seen, errno.EAGAIN)
        oldest = self.tail - len(self.content)
        if head < oldest:
            missed = oldest - head
            return ConsoleChunk(f"<missed {missed} bytes of console log>\n".encode(), oldest, saved_seen)
        start = head - oldest
        return ConsoleChunk(bytes(self.content[start:]), self.tail, saved_seen)

    def reset_for_enable(self) -> None:
        """A new enable starts a new ring (the saved snapshot survives until read)."""
        self.content.clear()
        self.tail = 0
