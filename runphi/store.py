"""Container records under the state root (``--root``): atomic and locked.

Layout, shared with runc (the shim passes the same ``--root <Root>/<ns>`` to
runphi and to the runc it forwards to)::

    <root>/<id>/runphi.json     the ContainerRecord (msgspec JSON)
    <root>/<id>/runphi.lock     flock target, held by every verb touching <id>
    <root>/<id>/...             room for other per-container files (console log, ...)

Why this is safe next to runc 1.1.5 (checked with the real runc): runc keeps
``<root>/<id>/state.json`` and never reads other names. ``runc state``/``kill``/
``delete`` of a runphi id answer ``container does not exist`` (runphi routes
those ids to itself anyway); ``runc list`` prints a clean table/JSON on stdout
and one warning per foreign directory on stderr (``load container <id>:
container does not exist``) — ``runphi list`` runs runc itself and drops those
warnings for the ids it owns. A directory holding runc's ``state.json`` is
runc's: runphi never writes there.

Writes are temp file + fsync + rename + fsync of the directory, so a crash
leaves either the old or the new record, never a torn one; stray temp files
are ignored by readers and replaced by the next write.

Locking: :meth:`Store.locked` takes ``flock`` on the lock file and re-checks
that the file it locked is still the one in the directory (a concurrent
``delete`` may have removed it), so a waiter never acts on a deleted record.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

import msgspec

from runphi.container import ContainerRecord
from runphi.errors import MALFORMED_INPUT, ContainerExists, ContainerNotFound, StateError
from runphi.files import atomic_write, fsync_dir, unsafe_dir_reason
from runphi.pausepoint import pause_point

RECORD_NAME = "runphi.json"
LOCK_NAME = "runphi.lock"
RUNC_STATE_NAME = "state.json"
#: Marks a directory being removed; "~" is outside the id charset, so no id collides.
TOMBSTONE_MARK = "~removed."

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ContainerRecord)


class Store:
    """The container records under one state root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def container_dir(self, container_id: str) -> Path:
        return self.root / container_id

    def record_path(self, container_id: str) -> Path:
        return self.root / container_id / RECORD_NAME

    def holds(self, container_id: str) -> bool:
        """Whether runphi has a record for this id (the routing test; takes no lock)."""
        return self.record_path(container_id).is_file()

    def taken(self, container_id: str) -> bool:
        """Whether runphi or runc already uses this id under the root."""
        directory = self.container_dir(container_id)
        return (directory / RECORD_NAME).exists() or (directory / RUNC_STATE_NAME).exists()

    @contextlib.contextmanager
    def locked(self, container_id: str) -> Iterator[None]:
        """Hold the container's lock; :class:`ContainerNotFound` if it has no record."""
        lock_path = self.container_dir(container_id) / LOCK_NAME
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except (FileNotFoundError, NotADirectoryError):
                raise ContainerNotFound(container_id) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if self._still_linked(fd, lock_path):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # deleted (and maybe re-created) while we waited: retry
        try:
            if not self.holds(container_id):
                raise ContainerNotFound(container_id)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _still_linked(fd: int, path: Path) -> bool:
        try:
            return os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def creating(self, record: ContainerRecord) -> Iterator[None]:
        """Make ``<root>/<id>/``, lock it and write the first record; undo on error.

        Raises :class:`ContainerExists` when runphi or runc already has the id.
        The body runs with the lock held; if it raises, the directory is removed.
        """
        directory = self.container_dir(record.id)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        problem = unsafe_dir_reason(self.root)
        if problem:
            raise StateError(f"cannot create container {record.id}: state root {self.root} {problem}",
                             container_id=record.id)
        self.sweep_tombstones()
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            raise ContainerExists(record.id) from None
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.write(record)
            yield
        except BaseException:
            self._remove_dir(directory)
            raise
        finally:
            os.close(fd)

    def read(self, container_id: str) -> ContainerRecord:
        """The stored record; :class:`ContainerNotFound` / :class:`StateError`."""
        path = self.record_path(container_id)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ContainerNotFound(container_id) from None
        try:
            return _decoder.decode(data)
        except MALFORMED_INPUT as exc:
            raise StateError(f"record of container {container_id} ({path}) is unreadable: {exc}; "
                             f"remove it with `runphi delete --force {container_id}`",
                             container_id=container_id) from None

    def write(self, record: ContainerRecord) -> None:
        """Atomically replace the record of ``record.id`` (caller holds the lock)."""
        atomic_write(self.record_path(record.id), _encoder.encode(record))

    def remove(self, container_id: str) -> None:
        """Delete the record and the container's directory (caller holds the lock).

        The directory is first renamed to a tombstone (``<id>~removed.<pid>``, never
        a valid id), which takes the record away in one atomic step: a crash
        part-way leaves either the whole container or an unreachable tombstone
        that the next ``creating`` sweeps — never ``<id>/`` without a record,
        which would block the id forever.
        """
        directory = self.container_dir(container_id)
        tombstone = self.root / f"{container_id}{TOMBSTONE_MARK}{os.getpid()}"
        try:
            os.rename(directory, tombstone)
        except FileNotFoundError:
            return
        pause_point("delete:unlinked")
        self._remove_dir(tombstone)

    def sweep_tombstones(self) -> None:
        """Remove what crashed deletes left behind (tombstones are unreachable by id)."""
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return
        for name in entries:
            if TOMBSTONE_MARK in name:
                self._remove_dir(self.root / name)

    def _remove_dir(self, directory: Path) -> None:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            fsync_dir(directory.parent)

    def ids(self) -> list[str]:
        """Ids that have a runphi record, sorted."""
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(name for name in entries if (self.root / name / RECORD_NAME).is_file())

    def records(self) -> list[ContainerRecord]:
        """All readable records (a record deleted meanwhile is skipped)."""
        found = []
        for container_id in self.ids():
            try:
                found.append(self.read(container_id))
            except ContainerNotFound:
                continue
        return found
