"""OCI hooks, run by runphi itself on the host (nobody else runs them).

When each kind runs for a ZIC (a cell has no Linux namespaces, so every hook runs
in the runtime's namespaces on the host):

* ``createRuntime`` and ``createContainer`` — during ``create``, after the cell is
  created and loaded and the monitor is up, in that order; status ``creating``.
  A failure fails ``create``, which undoes everything.
* ``prestart`` (deprecated) — runs first, with createRuntime, same rules.
* ``poststart`` — at the end of ``start``, status ``running``. A failure stops the
  cell and fails ``start`` (runtime-spec 1.3, and what runc does).
* ``poststop`` — during ``delete`` after the cell is destroyed; status
  ``stopped``. A failure is logged as a warning; ``delete`` still succeeds.
* ``startContainer`` — would run inside the container just before its program;
  a cell has no such place, so runphi does not run it (``features`` omits it).

Every hook gets the container's state JSON on stdin, its own ``args`` (``[path]``
when empty) and ``env`` (the runtime's environment when the key is absent), and is
killed — its whole process group — if it runs past ``timeout`` seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from typing import Protocol

from runphi.errors import RunphiError


class HookSpec(Protocol):
    """The fields of an OCI hook entry that runphi reads (read-only, so frozen structs fit)."""

    @property
    def path(self) -> str: ...

    @property
    def args(self) -> list[str] | None: ...

    @property
    def env(self) -> list[str] | None: ...

    @property
    def timeout(self) -> int | None: ...


class HookFailed(RunphiError):
    """A hook exited non-zero, could not be started, or ran past its timeout."""


#: Hook kinds runphi runs, in lifecycle order (what ``features`` lists).
SUPPORTED_HOOKS = ("prestart", "createRuntime", "createContainer", "poststart", "poststop")

_OUTPUT_LIMIT = 300


def _environment(hook: HookSpec) -> dict[str, str] | None:
    if hook.env is None:
        return None  # inherit, as runc does when the key is absent
    env: dict[str, str] = {}
    for item in hook.env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def _describe_output(stdout: bytes, stderr: bytes) -> str:
    def clip(data: bytes) -> str:
        text = data.decode(errors="replace").strip()
        return text if len(text) <= _OUTPUT_LIMIT else text[:_OUTPUT_LIMIT] + "…"

    return f"stdout: {clip(stdout)}, stderr: {clip(stderr)}"


def run_hook(kind: str, index: int, hook: HookSpec, state_json: bytes, container_id: str) -> None:
    """Run one hook to completion; raise :class:`HookFailed` (naming it) on any failure.

    The hook runs in a new session so that, on timeout, it and everything it
    started are killed and nothing keeps our pipes open.
    """
    argv = list(hook.args) if hook.args else [hook.path]
    where = f"{kind} hook #{index} ({hook.path}) of container {container_id}"
    try:
        proc = subprocess.Popen(
            argv,
            executable=hook.path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_environment(hook),
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise HookFailed(f"{where} could not be run: {exc.strerror}: check the hook path in config.json",
                         container_id=container_id) from None
    try:
        stdout, stderr = proc.communicate(state_json, timeout=hook.timeout if hook.timeout else None)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise HookFailed(f"{where} ran past its timeout of {hook.timeout} s and was killed",
                         container_id=container_id) from None
    if proc.returncode != 0:
        status = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
                  else f"exit status {proc.returncode}")
        raise HookFailed(f"{where} failed with {status} ({_describe_output(stdout, stderr)})",
                         container_id=container_id)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.kill()
    # The group is dead, so nobody holds the pipes: this returns promptly.
    proc.communicate()


def run_hooks(kind: str, hooks: Sequence[HookSpec] | None, state_json: bytes, container_id: str) -> None:
    """Run the hooks of one kind in order; stop at and raise the first failure."""
    for index, hook in enumerate(hooks or ()):
        run_hook(kind, index, hook, state_json, container_id)


def run_hooks_best_effort(kind: str, hooks: Sequence[HookSpec] | None, state_json: bytes,
                          container_id: str) -> list[HookFailed]:
    """Run every hook of one kind even if some fail; return the failures (poststop rules)."""
    failures: list[HookFailed] = []
    for index, hook in enumerate(hooks or ()):
        try:
            run_hook(kind, index, hook, state_json, container_id)
        except HookFailed as exc:
            failures.append(exc)
    return failures
