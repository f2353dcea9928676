"""``runphi create [--bundle B] [--console-socket S] [--pid-file P] ID``.

1. Plain container (``runphi.forward.is_zic`` says no): ``exec`` the real runc
   with the original argv — nothing of runphi's is left behind.
2. ZIC: validate everything that can be validated without touching the
   hypervisor (id free under the root for runphi *and* runc, config.json
   types, terminal ⇔ console socket), then look the backend up — with
   ``backend = "none"`` this is where a ZIC stops, with one line and nothing
   created.
3. With a backend: ``<root>/<id>/`` is made and locked (record ``creating``,
   held by this process), config.json is copied there (later edits of the
   bundle have no effect), the start fifo is made, and the core's
   ``launch_zic`` brings the ZIC up (the backend's cell, the terminal, the
   monitor: :mod:`runphi.core.launch`). Then prestart/createRuntime/createContainer
   hooks, the pid-file, and the record becomes ``created``. Any failure undoes
   the steps already done, in reverse order.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from runphi.backends.base import LaunchRequest
from runphi.container import ContainerRecord, current_process_identity, transition
from runphi.core.launch import Launched, launch_zic
from runphi.errors import BackendNotConfigured, BundleError, ContainerExists, RunphiError, for_container
from runphi.forward import exec_runc, is_zic
from runphi.log import rfc3339_nano
from runphi.oci import Config, read_config
from runphi.pausepoint import pause_point
from runphi.store import atomic_write
from runphi.verbs._common import (CONFIG_COPY_NAME, START_FIFO_NAME, state_json, stop_monitor,
                                  write_pid_file)

if TYPE_CHECKING:
    from runphi.backends.base import Backend


def run(args, ctx) -> int:
    """Create the container (see the module docstring for the two paths)."""
    bundle = Path(args.bundle).absolute()
    if not decide_zic(bundle, args.container_id):
        exec_runc(ctx)
    return create_loaded(args, ctx, bundle, load_zic_config(ctx, bundle, args.container_id))


def decide_zic(bundle: Path, container_id: str) -> bool:
    """``is_zic`` with its refusals naming the container."""
    try:
        return is_zic(bundle)
    except BundleError as exc:
        raise for_container(exc, "cannot create container", container_id) from None


def load_zic_config(ctx, bundle: Path, container_id: str) -> tuple[bytes, Config]:
    """The bundle's config.json, as bytes and parsed, once the id is known to be free (step 2 begins)."""
    if ctx.store.taken(container_id):
        raise ContainerExists(container_id)
    try:
        return read_config(bundle)
    except BundleError as exc:
        raise for_container(exc, "cannot create ZIC", container_id) from None


def create_loaded(args, ctx, bundle: Path, loaded: tuple[bytes, Config]) -> int:
    """The rest of steps 2 and 3, config.json read by :func:`load_zic_config`; returns 0 once ``created``."""
    container_id = args.container_id
    config_bytes, config = loaded
    _check_terminal(config, args.console_socket, container_id)
    backend = _backend_for(ctx, container_id)
    record = _creating_record(container_id, bundle, config, config_bytes)
    directory = ctx.store.container_dir(container_id)
    with ctx.store.creating(record):
        pause_point("create:record")
        atomic_write(directory / CONFIG_COPY_NAME, config_bytes)
        os.mkfifo(directory / START_FIFO_NAME, 0o600)
        request = LaunchRequest(container_id=container_id, bundle=str(bundle), rootfs=record.rootfs,
                                container_dir=str(directory), config=config)
        launched = _launch(ctx, backend, request, args.console_socket or "", str(directory / START_FIFO_NAME))
        pause_point("create:launched")
        record = msgspec.structs.replace(record, cell=launched.cell, monitor_pid=launched.monitor_pid,
                                         monitor_start_time=launched.monitor_start_time)
        _finish_created(ctx, backend, args.pid_file, config, record)
    return 0


def _backend_for(ctx, container_id: str) -> Backend:
    """The configured backend; ``backend = "none"`` refuses the ZIC here, before anything exists."""
    try:
        return ctx.backend(container_id)
    except BackendNotConfigured as exc:
        raise BackendNotConfigured(f"cannot create ZIC {container_id}: {exc}",
                                   container_id=container_id) from None


def _creating_record(container_id: str, bundle: Path, config: Config, config_bytes: bytes) -> ContainerRecord:
    """The ``creating`` record, held by this process until the monitor takes over."""
    pid, start_time = current_process_identity()
    return ContainerRecord(
        id=container_id, bundle=str(bundle), rootfs=str(config.rootfs(bundle)),
        created=rfc3339_nano(_now_ns()), status="creating", oci_version=config.oci_version,
        annotations=dict(config.annotations), monitor_pid=pid, monitor_start_time=start_time,
        config_digest="sha256:" + hashlib.sha256(config_bytes).hexdigest())


def _launch(ctx, backend: Backend, request: LaunchRequest, console_socket: str, start_fifo: str) -> Launched:
    """:func:`runphi.core.launch.launch_zic` with every refusal naming the container."""
    try:
        return launch_zic(backend, request, console_socket=console_socket, start_fifo=start_fifo,
                          monitor_log=ctx.monitor_log, warn=ctx.log.warn)
    except RunphiError as exc:
        # The backend and the image readers do not know the container: name it here, once.
        if exc.container_id is None:
            raise for_container(exc, "cannot create ZIC", request.container_id) from None
        raise


def _finish_created(ctx, backend: Backend, pid_file: str | None, config: Config, record: ContainerRecord) -> None:
    """Record the launched cell, run the create hooks, write the pid-file, mark ``created``.

    Any failure (a hook included) undoes the launch before it propagates.
    """
    try:
        ctx.store.write(record)
        pause_point("create:recorded")
        _run_create_hooks(config, record)
        pause_point("create:hooks-done")
        if pid_file:
            write_pid_file(pid_file, record.monitor_pid)
        ctx.store.write(transition(record, "created"))
    except BaseException:
        _undo_launch(ctx, backend, record)
        raise


def _check_terminal(config: Config, console_socket: str | None, container_id: str) -> None:
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


def _undo_launch(ctx, backend: Backend, record: ContainerRecord) -> None:
    """Reverse ``launch``: kill the monitor, destroy the cell (errors here are secondary)."""
    try:
        stop_monitor(record)
        if record.cell.cell_name:
            backend.destroy_cell(record.cell.cell_name)
    except RunphiError as secondary:
        ctx.log.warn(f"while undoing the create of {record.id}: {secondary}", id=record.id)


def _now_ns() -> int:
    import time

    return time.time_ns()
