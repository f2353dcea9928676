"""ZIC lifecycle on the simulated board, through the real `runphi` CLI (issue #6 "Done when")."""

from __future__ import annotations

import os

from tests.test_lifecycle_harness import board, guest_script, subreaper, wait_exit, wait_for, zic  # noqa: F401


def test_create_start_state_kill_delete(zic):
    bundle = zic.bundle("b1", guest_script("print hello\\n", "tick 50 alive\\n"))
    pid = zic.create("zic1", bundle)
    assert zic.board.cell_state("zic1") == "shut down"
    state = zic.state("zic1")
    assert state["status"] == "created" and state["pid"] == pid

    zic.run("start", "zic1", check=True)
    assert wait_for(lambda: zic.board.cell_state("zic1") == "running", what="cell running")
    state = zic.state("zic1")
    assert state["status"] == "running" and state["pid"] == pid

    zic.run("kill", "zic1", "TERM", check=True)
    assert wait_exit(pid) == 143
    assert zic.board.cell_state("zic1") == "shut down"
    state = zic.state("zic1")
    assert state["status"] == "stopped" and state["pid"] == 0

    zic.run("delete", "zic1", check=True)
    assert zic.board.cell_state("zic1") is None
    assert not (zic.root / "zic1").exists()
    assert zic.run("state", "zic1").returncode == 1
    ledger = zic.node / "jailhouse-ledger.json"
    assert not ledger.exists() or "zic1" not in ledger.read_text()


def test_guest_self_shutdown_exits_0(zic):
    pid = zic.create("selfstop", zic.bundle("b", guest_script("print bye\\n", "shutdown")))
    zic.run("start", "selfstop", check=True)
    assert wait_exit(pid) == 0
    assert zic.status("selfstop") == "stopped"
    zic.run("delete", "selfstop", check=True)
    assert zic.board.cells() == {}


def test_monitor_is_adopted_by_the_subreaper(zic):
    pid = zic.create("adopt", zic.bundle("b", guest_script("tick 100 x")))
    with open(f"/proc/{pid}/stat") as stat:
        ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
    assert ppid == os.getpid()


#: Imported only by the monitor (trio, and structlog which pulls in asyncio) or where the
#: UART is opened (pyserial): never by a verb that only reads or signals (DESIGN §2).
HEAVY_MODULES = {"trio", "structlog", "asyncio", "serial"}


def verb_imports(zic, *argv: str) -> set[str]:
    """Run ``runphi --root R ARGV`` under ``-X importtime``; the top-level modules it imported.

    Asserts the verb succeeded. Its stderr must be the verb's alone (no monitor
    inheriting it), which holds for every verb but a non-terminal ``create``.
    """
    import subprocess
    import sys

    from tests.test_lifecycle_harness import RUNPHI

    script = f"import sys; sys.argv = {[str(RUNPHI)]!r} + sys.argv[1:]; from runphi.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", script, "--root", str(zic.root), *argv],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=zic.env, timeout=60, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "runphi" in imported
    return imported


def test_create_never_imports_trio_or_structlog(zic):
    """trio is for the monitor, after the fork; create's own imports stay lean (DESIGN §2)."""
    import socket

    bundle = zic.bundle("lean", guest_script("tick 50 x"), terminal=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(zic.base / "pty.sock"))
    listener.listen(1)
    # Terminal mode: the monitor's stderr is /dev/null, so -X importtime lines on
    # stderr are create's alone.
    imported = verb_imports(zic, "create", "--bundle", str(bundle), "--console-socket", str(zic.base / "pty.sock"),
                            "--pid-file", str(zic.base / "lean.pid"), "lean")
    zic.monitors.append(int((zic.base / "lean.pid").read_text()))
    assert not imported & {"trio", "structlog", "asyncio"}
    listener.close()


def test_state_start_kill_delete_of_a_live_zic_import_nothing_heavy(zic):
    """The verbs containerd calls most often on a live ZIC stay as lean as ``state`` of nothing."""
    pid = zic.create("leanv", zic.bundle("leanv", guest_script("tick 50 alive")))
    for argv in (("state", "leanv"), ("start", "leanv"), ("state", "leanv"), ("kill", "leanv", "TERM")):
        assert not verb_imports(zic, *argv) & HEAVY_MODULES, argv
    assert wait_exit(pid) == 143
    assert not verb_imports(zic, "delete", "leanv") & HEAVY_MODULES


def test_two_zics_get_their_own_cpus_uarts_and_exit_codes(zic):
    import subprocess

    from tests.test_lifecycle_harness import RUNPHI

    bundles = {cid: zic.bundle(cid, guest_script(f"print i am {cid}\\n", "tick 50 alive")) for cid in ("za", "zb")}
    # Both creates at once: the node ledger serialises the allocations.
    procs = [subprocess.Popen([str(RUNPHI), "--root", str(zic.root), "create", "--bundle", str(bundle),
                               "--pid-file", str(zic.base / f"{cid}.pid"), cid], env=zic.env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for cid, bundle in bundles.items()]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    pids = {cid: int((zic.base / f"{cid}.pid").read_text()) for cid in bundles}
    zic.monitors.extend(pids.values())
    for cid in bundles:
        zic.run("start", cid, check=True)
    assigned = {}
    for entry in (zic.board.sysfs / "cells").iterdir():
        name = (entry / "name").read_text().strip()
        if name in bundles:
            assigned[name] = (entry / "cpus_assigned_list").read_text().strip()
    assert len(assigned) == 2 and assigned["za"] != assigned["zb"]
    zic.run("kill", "za", "TERM", check=True)
    assert wait_exit(pids["za"]) == 143
    assert zic.status("zb") == "running"
    assert "i am za" in zic.run("logs", "za").stdout and "i am zb" in zic.run("logs", "zb").stdout
    zic.run("kill", "zb", "INT", check=True)
    assert wait_exit(pids["zb"]) == 130


def test_the_monitor_holds_no_lock_log_or_bundle_fd_of_create(zic):
    log = zic.base / "log.json"
    bundle = zic.bundle("fds", guest_script("tick 50 x"))
    pid_file = zic.base / "fds.pid"
    zic.run("--log", str(log), "--log-format", "json", "create", "--bundle", str(bundle), "--pid-file",
            str(pid_file), "fds", check=True)
    pid = int(pid_file.read_text())
    zic.monitors.append(pid)
    targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert not [t for t in targets if t.endswith(("runphi.lock", "jailhouse-ledger.lock", "log.json", "config.json"))]
    assert str(zic.root / "fds" / "start.fifo") in targets
    assert any("/dev/ttyAMA" in t or "/dev/pts/" in t for t in targets), targets
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    # A verb can take the container's lock while the monitor runs.
    assert zic.run("kill", "fds", "TERM").returncode == 0
