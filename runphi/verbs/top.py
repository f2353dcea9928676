"""``runphi top [--interval S] [--once]``: a live view of the node's ZICs, like ``jailhouse cell
stats`` but one row per ZIC.

At the top, the node: its backend, the hypervisor's pools and the ledger's resources
(used/free). Then one row per ZIC: id, cell, CPUs, state, uptime, VM exits per second,
console bytes per second and dropped console bytes. Rates are the difference between two
snapshots (:mod:`runphi.core.observe`) over the time between them.

On a terminal the view is redrawn in place every ``--interval`` seconds on the alternate
screen, with the keyboard in cbreak mode; ``q`` (or Ctrl-C) quits and the terminal is
restored as it was (SIGTERM restores it too, then exits 143). When stdout is not a
terminal, or with ``--once``, it prints one plain view (rates measured over one interval)
and exits.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

from runphi.core.observe import NodeSnapshot, ZicSample, take_snapshot
from runphi.errors import UsageError

#: Enter/leave the alternate screen, hide/show the cursor, home + clear.
_ENTER, _LEAVE = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
_HOME_CLEAR = "\x1b[H\x1b[2J"
COLUMNS = ("ID", "CELL", "CPUS", "STATE", "UPTIME", "EXITS/S", "CONSOLE B/S", "DROPPED")


def run(args, ctx) -> int:
    """The live view on a terminal, else one plain view."""
    interval = _interval(args.interval)
    take = lambda: take_snapshot(ctx.backend(), ctx.config.backend, ctx.config.state_dir,  # noqa: E731
                                 [ctx.root, ctx.config.state_dir])
    if args.once or not sys.stdout.isatty():
        before = take()
        time.sleep(interval)
        sys.stdout.write(render(before, take()))
        return 0
    return live(take, interval)


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.05 <= value <= 3600:
        raise UsageError(f"--interval {text!r}: expected seconds between 0.05 and 3600")
    return value


def live(take, interval: float) -> int:
    """Redraw every ``interval`` seconds until ``q``; the terminal is restored on every way out
    (``q``, Ctrl-C, SIGTERM, an error)."""
    import termios
    import tty

    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    out = sys.stdout
    previous_handler = signal.signal(signal.SIGTERM, _terminated)
    try:
        if saved is not None:
            tty.setcbreak(stdin)
        out.write(_ENTER)
        previous = take()
        _draw(out, previous, previous)  # at once: rates wait for the next frame
        while True:
            if _quit_pressed(stdin if saved is not None else None, interval):
                return 0
            current = take()
            _draw(out, previous, current)
            previous = current
    except KeyboardInterrupt:
        return 0
    except _Terminated:
        return 128 + signal.SIGTERM
    finally:
        out.write(_LEAVE)
        out.flush()
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGTERM, previous_handler)


def _draw(out, before: NodeSnapshot, now: NodeSnapshot) -> None:
    """One frame from the top-left corner (cbreak keeps the terminal's own newline handling)."""
    out.write(_HOME_CLEAR + render(before, now))
    out.flush()


class _Terminated(Exception):
    """SIGTERM arrived during the live view."""


def _terminated(signum: int, _frame) -> None:
    """SIGTERM's handler in the live view: unwind it (restoring the terminal) once; later ones are ignored."""
    signal.signal(signum, signal.SIG_IGN)
    raise _Terminated


def _quit_pressed(stdin: int | None, timeout: float) -> bool:
    """Wait up to ``timeout`` for a key; True when it was ``q`` (or stdin ended)."""
    if stdin is None:
        time.sleep(timeout)
        return False
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([stdin], [], [], left)
        if ready:
            key = os.read(stdin, 1)
            if key in (b"q", b"Q", b""):
                return True
    return False


def render(before: NodeSnapshot, now: NodeSnapshot) -> str:
    """The view of ``now``, with rates measured since ``before``."""
    elapsed = max(now.taken - before.taken, 1e-9)
    earlier = {(z.namespace, z.container_id): z for z in before.zics}
    lines = [_node_line(now)]
    rows = [list(COLUMNS)]
    for zic in sorted(now.zics, key=lambda z: (z.namespace, z.container_id)):
        rows.append(_row(zic, earlier.get((zic.namespace, zic.container_id)), elapsed))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if len(rows) == 1:
        lines.append("(no ZICs)")
    return "\n".join(lines) + "\n"


def _node_line(now: NodeSnapshot) -> str:
    parts = [f"runphi top: {len(now.zics)} ZIC(s) on {now.backend}"]
    parts += [f"{pool.name} pool {pool.used_pages}/{pool.size_pages} pages" for pool in now.pools]
    for use in now.resources:
        if use.used or use.free:
            total = use.used + use.free
            shown = f"{use.used >> 20}/{total >> 20} MiB" if use.resource == "ram_bytes" else f"{use.used}/{total}"
            parts.append(f"{use.resource.removesuffix('_bytes')} {shown}")
    return " | ".join(parts)


def _row(zic: ZicSample, before: ZicSample | None, elapsed: float) -> list[str]:
    name = f"{zic.namespace}/{zic.container_id}" if zic.namespace else zic.container_id
    state = zic.stats.status.detail or zic.stats.status.state.value if zic.stats is not None else zic.status
    if zic.status == "stopped" and zic.exit_code is not None:
        state = f"stopped ({zic.exit_code})"
    return [name, zic.cell or "-", ",".join(map(str, zic.cpus)) or "-", state, _duration(zic.uptime_seconds),
            _rate(_exits(zic), _exits(before), elapsed), _rate(_console(zic), _console(before), elapsed),
            str(zic.console.dropped_bytes if zic.console is not None else 0)]


def _exits(zic: ZicSample | None) -> int | None:
    if zic is None or zic.stats is None or not zic.stats.vmexits:
        return None
    return zic.stats.vmexits.get("total", 0)


def _console(zic: ZicSample | None) -> int | None:
    return zic.console.read_bytes if zic is not None and zic.console is not None else None


def _rate(now: int | None, before: int | None, elapsed: float) -> str:
    if now is None:
        return "-"
    return f"{max(now - (before or 0), 0) / elapsed:.0f}" if before is not None else "-"


def _duration(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
