"""ZICs on the KVM backend end to end: the real containerd drives runphi (its own shim, and
runc's shim with runphi as its runc), runphi runs every ZIC as a ``qemu-system-aarch64`` VM on
this host (TCG on x86, KVM on arm64). No simulator anywhere.

The same images as on Jailhouse: the ``tools/inmates`` programs and the Linux ZIC. Every
action is a ``ctr`` command; observations are what ``ctr`` prints, ``ctr events``, the
cells' directories and runphi's node ledger, and ``/proc`` for where vCPU threads may run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from tests.test_kvm_backend import parent_of
from tests.test_kvm_net import ingress_filters, pod, taps  # noqa: F401  (fixture)
from tests.test_linux_guest_containerd import (imported_linux_image, kill_is_an_orderly_poweroff,
                                               uname_on_a_terminal_then_poweroff)
from tests.test_e2e_zic import (as_guest_sent, assert_nothing_left, ctr_run_zic,
                                echo_session_on_a_terminal, log_text, remove_task_and_container, wait_for_text,
                                zic_rootfs)
from tools.testbed.containerd import MODES

pytestmark = [pytest.mark.containerd, pytest.mark.qemu]

LINUX_IMAGE = "docker.io/library/runphi-linux-guest:kvm"
NET_IMAGE = "docker.io/library/runphi-linux-guest:kvm-net"


@pytest.fixture(scope="module", params=MODES)
def kvm_node(request, runphi_bin: Path, built_inmates: Path):
    """A private containerd whose runphi runs ZICs as QEMU VMs, once per mode."""
    from tools.testbed.containerd import missing_requirements, running_zic_node

    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    with running_zic_node(runphi_bin, mode=request.param, prefix="rphi-kvm-", backend="kvm") as node:
        yield node


@pytest.fixture(scope="module")
def kvm_events(kvm_node):
    from tools.testbed.containerd import EventLog

    events = EventLog(kvm_node.containerd, kvm_node.base / "events.log")
    try:
        yield events
    finally:
        events.close()


def allowed_cpus(pid: int, tid: int) -> str:
    """``Cpus_allowed_list`` of one thread, as the kernel reports it."""
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for thread {tid}")


# ---- the inmates -------------------------------------------------------------------------------

def test_hello_runs_as_a_vm_and_exits_0(kvm_node, kvm_events, built_inmates, tmp_path):
    result = ctr_run_zic(kvm_node, zic_rootfs(tmp_path, built_inmates / "hello.bin"), "kvm-hello", "--rm")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"Hello from runphi inmate hello\r\n"), result.stdout
    assert result.stdout.endswith(b"hello: done, powering off\r\n"), result.stdout
    assert kvm_events.exit_status("kvm-hello") == 0
    assert_nothing_left(kvm_node, "kvm-hello")


def test_crashing_guest_exits_139(kvm_node, kvm_events, built_inmates, tmp_path):
    result = ctr_run_zic(kvm_node, zic_rootfs(tmp_path, built_inmates / "crash.bin"), "kvm-crash", "--rm")
    assert result.returncode == 139, result.stderr
    assert b"crash: storing to 0x0c000000 (unassigned)" in result.stdout
    assert kvm_events.exit_status("kvm-crash") == 139
    assert_nothing_left(kvm_node, "kvm-crash")


@pytest.mark.parametrize(("kill_flags", "expected"), [((), 143), (("--signal", "SIGKILL"), 137)],
                         ids=["default-TERM", "KILL"])
def test_ticker_killed_reports_128_plus_signal(kvm_node, kvm_events, built_inmates, tmp_path, kill_flags,
                                               expected):
    """The VM is the child of the task's process (the monitor, or the shim server). TERM presses
    its power button; a bare-metal ticker ignores it, so after the grace deadline the VM is
    destroyed: 143. KILL quits the VM at once: 137."""
    cid = f"kvm-ticker-{expected}"
    log = tmp_path / "ticker.log"
    started = ctr_run_zic(kvm_node, zic_rootfs(tmp_path, built_inmates / "ticker.bin"), cid, "-d",
                          "--log-uri", f"file://{log}")
    assert started.returncode == 0, started.stderr
    wait_for_text(log, "tick 2\r\n")
    assert kvm_node.cells()[cid] == "up"
    pid = kvm_node.vm_pid(cid)
    listed = kvm_node.containerd.ctr("task", "ls").stdout.decode().splitlines()[1:]
    tasks = {row.split()[0]: row.split()[1] for row in listed}
    assert parent_of(pid) == int(tasks[cid]), "the VM does not belong to the task's process (monitor or shim)"
    # ctr gives every container the cgroup /<namespace>/<id>: the VM runs in it.
    assert f"/{cid}\n" in Path(f"/proc/{pid}/cgroup").read_text()
    killed = kvm_node.containerd.ctr("task", "kill", *kill_flags, cid)
    assert killed.returncode == 0, killed.stderr
    assert kvm_events.exit_status(cid) == expected
    assert not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    removed = remove_task_and_container(kvm_node, cid)
    assert f"exit code {expected}".encode() in removed.stderr, removed.stderr
    assert_nothing_left(kvm_node, cid)
    assert log_text(log).startswith("Hello from runphi inmate ticker\r\ntick 1\r\n")


def test_interactive_echo_on_a_terminal(kvm_node, kvm_events, built_inmates, tmp_path):
    seen = echo_session_on_a_terminal(kvm_node, zic_rootfs(tmp_path, built_inmates / "echo.bin"), "kvm-echo",
                                      b"typed into a VM")
    assert as_guest_sent(seen) == (b"Hello from runphi inmate echo\r\n"
                                   b"echo: type a line, 'exit' powers off\r\n"
                                   b"> typed into a VM\r\n"
                                   b"> echo: bye\r\n")
    assert kvm_events.exit_status("kvm-echo") == 0
    assert_nothing_left(kvm_node, "kvm-echo")


# ---- several at once, pinned -------------------------------------------------------------------

def test_zics_at_once_each_vcpu_pinned_to_its_own_host_cpu(kvm_node, kvm_events, built_inmates, tmp_path):
    """As many tickers as this host lends CPUs, up to four, each vCPU thread allowed on exactly the
    host CPU the ledger gave it, no two alike (a 2-CPU machine runs two)."""
    count = min(4, len(os.sched_getaffinity(0)))
    cids = [f"kvm-pinned-{n}" for n in range(count)]
    logs = {cid: tmp_path / f"{cid}.log" for cid in cids}
    rootfs = zic_rootfs(tmp_path, built_inmates / "ticker.bin")
    try:
        for cid in cids:
            started = ctr_run_zic(kvm_node, rootfs, cid, "-d", "--log-uri", f"file://{logs[cid]}")
            assert started.returncode == 0, started.stderr
        for cid in cids:
            wait_for_text(logs[cid], "tick 2\r\n")
        ledger = kvm_node.ledger()
        placed = {}
        for cid in cids:
            threads = kvm_node.vcpu_threads(cid)
            assert sorted(threads.values()) == sorted(ledger[cid]["cpus"]), (threads, ledger[cid])
            for tid, cpu in threads.items():
                assert allowed_cpus(kvm_node.vm_pid(cid), tid) == str(cpu)
                placed[tid] = cpu
        assert len(set(placed.values())) == count, placed
        for cid in cids:
            assert kvm_node.containerd.ctr("task", "kill", "--signal", "SIGKILL", cid).returncode == 0
        assert {cid: kvm_events.exit_status(cid) for cid in cids} == dict.fromkeys(cids, 137)
    finally:
        for cid in cids:
            kvm_node.containerd.ctr("task", "rm", "--force", cid)
            kvm_node.containerd.ctr("containers", "rm", cid)
    assert_nothing_left(kvm_node, *cids)


def test_a_zic_asking_more_cpus_than_the_host_lends_is_refused(kvm_node, built_inmates, tmp_path):
    lendable = len(os.sched_getaffinity(0))
    rootfs = zic_rootfs(tmp_path, built_inmates / "hello.bin", vcpus=lendable + 1)
    result = ctr_run_zic(kvm_node, rootfs, "kvm-too-big", "--rm")
    assert result.returncode == 1
    [line] = result.stderr.decode().splitlines()
    assert f"cannot create container kvm-too-big on kvm-host: {lendable + 1} CPU(s) requested" in line, line
    assert_nothing_left(kvm_node, "kvm-too-big")


# ---- the Linux ZIC -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def linux_image(kvm_node, tmp_path_factory) -> str:
    """The Linux ZIC (the same image the Jailhouse tests run) imported into the node's containerd."""
    with imported_linux_image(kvm_node, tmp_path_factory.mktemp("linux-image"), LINUX_IMAGE) as image:
        yield image


def test_linux_zic_gives_a_shell_on_ctr_run_t(kvm_node, kvm_events, linux_image):
    seen = uname_on_a_terminal_then_poweroff(kvm_node, linux_image, "kvm-linux")
    assert b"uname -m\r\r\naarch64\r\r\n" in seen
    assert kvm_events.exit_status("kvm-linux") == 0
    assert_nothing_left(kvm_node, "kvm-linux")


def test_linux_zic_killed_powers_off_in_order_through_the_vms_power_button(kvm_node, kvm_events, linux_image,
                                                                         tmp_path):
    """TERM is QEMU's power button (system_powerdown): the guest's acpid runs an orderly poweroff."""
    kill_is_an_orderly_poweroff(kvm_node, kvm_events, linux_image, "kvm-linux-kill", tmp_path / "kill.log")


# ---- a networked ZIC joining a pod's network namespace -------------------------------------------

@pytest.fixture(scope="module")
def networked_linux_image(kvm_node, tmp_path_factory) -> str:
    """The Linux ZIC asking for a network (``net: true``)."""
    with imported_linux_image(kvm_node, tmp_path_factory.mktemp("net-image"), NET_IMAGE, "--net") as image:
        yield image


def test_networked_zic_joining_a_pods_namespace_answers_on_the_pods_address(kvm_node, kvm_events,
                                                                            networked_linux_image, pod, tmp_path):
    """``ctr run --with-ns network:<pod>``: runphi (as runc, or as the shim) makes the VM's link
    inside the pod's namespace; a GET from the other end of the pod's veth reaches the guest;
    removing the task leaves no tap and no redirect in the pod."""
    from tools.linux_guest import HTTP_PAGE
    from tools.linux_guest.initramfs import NET_READY_MESSAGE
    from tools.linux_guest.testing import http_get_in

    outside, inside = pod
    log = tmp_path / "web.log"
    ctr = kvm_node.containerd.ctr
    started = ctr("run", "-d", "--log-uri", f"file://{log}", "--with-ns", f"network:/run/netns/{inside}",
                  *kvm_node.zic_flags(), networked_linux_image, "kvm-web")
    assert started.returncode == 0, started.stderr
    try:
        wait_for_text(log, f"{NET_READY_MESSAGE} 169.254.60.2/24")
        status, body = trio.run(http_get_in, outside, "169.254.60.2")
        assert (status, body.decode()) == (200, HTTP_PAGE)
        assert ctr("task", "kill", "--signal", "SIGKILL", "kvm-web").returncode == 0
        assert kvm_events.exit_status("kvm-web") == 137
    finally:
        ctr("task", "rm", "--force", "kvm-web")
        ctr("containers", "rm", "kvm-web")
    assert_nothing_left(kvm_node, "kvm-web")
    assert taps(inside) == ["eth0"] and ingress_filters(inside, "eth0") == 0, "the link was left in the pod"
