"""Create a ZIC: from a parsed config.json to a container at ``created`` (DESIGN §3).

1. validate what can be validated without the hypervisor (id free, terminal ⇔
   console socket), then get the backend — with ``backend = "none"`` this is
   where a ZIC stops, with one line and nothing created;
2. ``<root>/<id>/`` is made and locked (record ``creating``, held by this
   process), config.json is copied there (later edits of the bundle have no
   effect), the start fifo is made, and :func:`runphi.core.launch.launch_zic`
   brings the ZIC up (the backend's cell, the terminal, the monitor);
3. prestart/createRuntime/createContainer hooks, the pid-file, and the record
   becomes ``created``. Any failure undoes the steps already done, in reverse order.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import msgspec

from runphi.backends.base import Backend, LaunchRequest
from runphi.container import ContainerRecord, current_process_identity, transition
from runphi.core.latency import timed
from runphi.core.launch import Adopt, Launched, launch_zic
from runphi.core.node import CONFIG_COPY_NAME, START_FIFO_NAME, Node, state_json, stop_monitor
from runphi.errors import BackendNotConfigured, BundleError, ContainerExists, RunphiError, for_container
from runphi.log import rfc3339_nano
from runphi.oci import Config, read_config
from runphi.pausepoint import pause_point
from runphi.files import atomic_write


class CreateRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What a front end asks for: one ZIC from a bundle whose config.json it has read."""

    container_id: str
    bundle: Path
    config: Config
    #: config.json's bytes as read (copied into the container's directory, digested).
    config_bytes: bytes
    #: Where the pty master of a terminal ZIC goes ("" = no terminal).
    console_socket: str = ""
    pid_file: str = ""
    #: The front end that will own the ZIC (``ContainerRecord.owner``).
    owner: str = ""
    #: Whether the container has a stdin to pump into its console (the shim's Create says).
    open_stdin: bool = False


def load_zic_config(node: Node, bundle: Path, container_id: str) -> tuple[bytes, Config]:
    """The bundle's config.json, as bytes and parsed, once the id is known to be free."""
    if node.store.taken(container_id):
        raise ContainerExists(container_id)
    try:
        return read_config(bundle)
    except BundleError as exc:
        raise for_container(exc, "cannot create ZIC", container_id) from None


def create_zic(node: Node, request: CreateRequest, adopt: Adopt | None = None) -> ContainerRecord:
    """Bring the ZIC to ``created`` (module docstring); nothing is left behind on failure.

    With ``adopt`` the caller becomes the ZIC's long-lived process instead of a forked
    monitor (see :func:`runphi.core.launch.launch_zic`) and serves a terminal itself.
    """
    container_id, config = request.container_id, request.config
    if adopt is None:
        _check_terminal(config, request.console_socket, container_id)
    backend = _backend_for(node, container_id)
    record = _creating_record(request)
    directory = node.store.container_dir(container_id)
    with timed(node.state_dir, "create"), node.store.creating(record):
        pause_point("create:record")
        atomic_write(directory / CONFIG_COPY_NAME, request.config_bytes)
        os.mkfifo(directory / START_FIFO_NAME, 0o600)
        launch = LaunchRequest(container_id=container_id, bundle=str(request.bundle), rootfs=record.rootfs,
                               container_dir=str(directory), config=config, owned=True,
                               open_stdin=request.open_stdin)
        launched = _launch(node, backend, launch, request.console_socket, str(directory / START_FIFO_NAME),
                           adopt)
        pause_point("create:launched")
        record = msgspec.structs.replace(record, cell=launched.cell, monitor_pid=launched.monitor_pid,
                                         monitor_start_time=launched.monitor_start_time)
        return _finish_created(node, backend, request.pid_file, config, record)


def write_pid_file(path: str, pid: int) -> None:
    """Write ``pid`` like runc: decimal, no newline, temp file + rename (atomic)."""
    target = Path(os.path.abspath(path))
    tmp = target.with_name(f".{target.name}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as exc:
        raise BundleError(f"cannot write pid file {target}: {exc.strerror}") from None


def _backend_for(node: Node, container_id: str) -> Backend:
    """The node's backend; ``backend = "none"`` refuses the ZIC here, before anything exists."""
    try:
        return node.backend(container_id)
    except BackendNotConfigured as exc:
        raise BackendNotConfigured(f"cannot create ZIC {container_id}: {exc}",
                                   container_id=container_id) from None


def _creating_record(request: CreateRequest) -> ContainerRecord:
    """The ``creating`` record, held by this process until the monitor takes over."""
    pid, start_time = current_process_identity()
    config = request.config
    return ContainerRecord(
        id=request.container_id, bundle=str(request.bundle), rootfs=str(config.rootfs(request.bundle)),
        created=rfc3339_nano(time.time_ns()), status="creating", oci_version=config.oci_version,
        annotations=dict(config.annotations), monitor_pid=pid, monitor_start_time=start_time,
        config_digest="sha256:" + hashlib.sha256(request.config_bytes).hexdigest(), owner=request.owner)


def _launch(node: Node, backend: Backend, request: LaunchRequest, console_socket: str,
            start_fifo: str, adopt: Adopt | None) -> Launched:
    """:func:`launch_zic` with every refusal naming the container."""
    try:
        return launch_zic(backend, request, console_socket=console_socket, start_fifo=start_fifo,
                          monitor_log=node.monitor_log, warn=node.log.warn, adopt=adopt)
    except RunphiError as exc:
        # The backend and the image readers do not know the container: name it here, once.
        if exc.container_id is None:
            raise for_container(exc, "cannot create ZIC", request.container_id) from None
        raise


def _finish_created(node: Node, backend: Backend, pid_file: str, config: Config,
                    record: ContainerRecord) -> ContainerRecord:
    """Record the launched cell, run the create hooks, write the pid-file, mark ``created``.

    Any failure (a hook included) undoes the launch before it propagates.
    """
    try:
        node.store.write(record)
        pause_point("create:recorded")
        _run_create_hooks(config, record)
        pause_point("create:hooks-done")
        if pid_file:
            write_pid_file(pid_file, record.monitor_pid)
        created = transition(record, "created")
        node.store.write(created)
        return created
    except BaseException:
        _undo_launch(node, backend, record)
        raise


def _check_terminal(config: Config, console_socket: str, container_id: str) -> None:
    terminal = bool(config.process and config.process.terminal)
    if console_socket and not terminal:
        raise BundleError(f"cannot create ZIC {container_id}: --console-socket given but "
                          "process.terminal is false in config.json", container_id=container_id)
    if terminal and not console_socket:
        raise BundleError(f"cannot create ZIC {container_id}: process.terminal is true but no "
                          "--console-socket was given to receive the console", container_id=container_id)


def _run_create_hooks(config: Config, record: ContainerRecord) -> None:
    if not config.hooks:
        return
    from runphi.hooks import run_hooks

    stdin = state_json(record, "creating")
    for kind, hooks in (("prestart", config.hooks.prestart),
                        ("createRuntime", config.hooks.create_runtime),
                        ("createContainer", config.hooks.create_container)):
        run_hooks(kind, hooks, stdin, record.id)


def _undo_launch(node: Node, backend: Backend, record: ContainerRecord) -> None:
    """Reverse the launch: kill the monitor, destroy the cell (errors here are secondary)."""
    try:
        stop_monitor(record)
        if record.cell.cell_name:
            backend.destroy_cell(record.cell.cell_name)
    except RunphiError as secondary:
        node.log.warn(f"while undoing the create of {record.id}: {secondary}", id=record.id)
