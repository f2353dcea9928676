"""The KVM backend's own promises, beyond the contract suite (tests/backend_contract):
its QEMU command line, its host template, vCPU placement, and — with real QEMU — that the
VM process belongs to the ZIC's monitor, dies with it, and runs in the container's cgroup.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import msgspec
import pytest

from runphi.backends.base import BackendError
from runphi.backends.kvm.host import HostTemplateError, load_host
from runphi.backends.kvm.machine import LoaderImage, VmPlan, choose_accel, qemu_argv
from runphi.backends.kvm.cgroups import cgroup_dirs, cgroup_relative
from runphi.config import shipped_templates_dir
from tests.backend_contract.contract import RuntimeCli, write_zic_bundle
from tests.backend_contract.jailhouse_sim import BOOT
from tests.test_lifecycle_harness import subreaper, wait_exit, wait_for  # noqa: F401  (fixture)

PLAN = VmPlan(name="z1", binary="qemu-system-aarch64", accel="tcg", machine="virt,gic-version=3",
              cpu="cortex-a53", memory_mib=784, vcpu_host_cpus=[1, 0],
              images=[LoaderImage(file="/b/boot.bin", address=0x70000000)], entry=0x70000000)


# ---- the command line --------------------------------------------------------------------------

def test_command_line_has_only_explicit_devices_and_starts_paused():
    argv = qemu_argv(PLAN, console_fd=7, owner_qmp_fd=8, control_fd=9)
    assert argv[0] == "qemu-system-aarch64"
    for flag in ("-nodefaults", "-S", "-no-shutdown", "-no-reboot", "-no-user-config"):
        assert flag in argv
    assert not {"-net", "-nic", "-netdev"} & set(argv), "a ZIC VM has no NIC"
    assert argv[argv.index("-serial") + 1] == "chardev:console"
    assert "socket,id=console,fd=7" in argv
    assert argv[argv.index("-smp") + 1] == "2" and argv[argv.index("-m") + 1] == "784M"
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"  # one host thread per vCPU
    assert "loader,file=/b/boot.bin,addr=0x70000000,force-raw=on" in argv
    assert "loader,addr=0x70000000,cpu-num=0" in argv


def test_linux_guest_is_booted_by_qemu_with_its_own_device_tree_unless_told():
    linux = msgspec.structs.replace(PLAN, images=[], entry=None, kernel="/b/vmlinuz", initrd="/b/initrd",
                                    append="console=ttyAMA0 quiet")
    argv = qemu_argv(linux, console_fd=7, owner_qmp_fd=8, control_fd=9)
    assert argv[argv.index("-kernel") + 1] == "/b/vmlinuz"
    assert argv[argv.index("-initrd") + 1] == "/b/initrd"
    assert argv[argv.index("-append") + 1] == "console=ttyAMA0 quiet"
    assert "-dtb" not in argv and not any(a.startswith("loader,") for a in argv)


def test_a_comma_in_an_image_path_is_escaped_for_qemu():
    plan = msgspec.structs.replace(PLAN, images=[LoaderImage(file="/b/a,b.bin", address=0x70000000)])
    assert "loader,file=/b/a,,b.bin,addr=0x70000000,force-raw=on" in qemu_argv(
        plan, console_fd=7, owner_qmp_fd=8, control_fd=9)


def test_accel_tcg_when_asked_and_kvm_refused_for_a_foreign_architecture():
    assert choose_accel("tcg", "aarch64") == "tcg"
    assert choose_accel("auto", "riscv64") == "tcg"
    with pytest.raises(BackendError, match="cannot run riscv64 guests with KVM"):
        choose_accel("kvm", "riscv64")


# ---- the host template -------------------------------------------------------------------------

def test_shipped_host_template_lends_every_cpu_this_process_may_use():
    host = load_host(shipped_templates_dir() / "kvm" / "kvm-host.toml")
    assert host.cell_cpu_set == frozenset(os.sched_getaffinity(0))
    assert host.root_keeps_cpus == 0 and host.memory.pools[0].end == host.memory_mib << 20


@pytest.mark.parametrize(("text", "problem"), [
    ('name = "x"\nmemory_mib = 64\nbackend = "jailhouse"\n', 'backend = \'jailhouse\', expected "kvm"'),
    ('name = "x"\nmemory_mib = 64\ncpus = "3-1"\n', "cpus:"),
    ('name = "x"\nmemory_mib = 0\n', "must be positive"),
    ('name = "x"\nmemory_mib = 64\ncolour = "red"\n', "unknown field"),
])
def test_invalid_host_template_is_one_line_naming_the_file(tmp_path, text, problem):
    path = tmp_path / "host.toml"
    path.write_text(text)
    with pytest.raises(HostTemplateError) as raised:
        load_host(path)
    message = str(raised.value)
    assert str(path) in message and problem in message and "\n" not in message


# ---- cgroups -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "relative"), [
    ("/default/abc", "default/abc"),
    ("kubepods-besteffort-pod12.slice:cri-containerd:abc",
     "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope"),
    ("system.slice:runphi:z1", "system.slice/runphi-z1.scope"),
])
def test_cgroups_path_in_cgroupfs_and_systemd_forms(path, relative):
    assert cgroup_relative(path) == relative


# ---- with real QEMU: whose process the VM is ----------------------------------------------------

@pytest.fixture
def kvm_cli(built_inmates, subreaper, tmp_path):  # noqa: F811
    """The runphi CLI on the KVM backend (its own state dir and runphi.toml)."""
    from tools.testbed.containerd import kvm_env

    cli = RuntimeCli(tmp_path, {**os.environ, **kvm_env(tmp_path)})
    cli.inmates = built_inmates  # type: ignore[attr-defined]
    try:
        yield cli
    finally:
        cli.close()


def ticker_bundle(cli: RuntimeCli, name: str, **config) -> Path:
    bundle = write_zic_bundle(cli.base / name, (cli.inmates / "ticker.bin").read_bytes(), BOOT)
    if config:
        spec = json.loads((bundle / "config.json").read_text())
        spec.update(config)
        (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def vm_status(cli: RuntimeCli, container_id: str) -> dict:
    return json.loads((cli.base / "node" / "kvm-cells" / container_id / "status.json").read_text())


def parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def test_the_vm_is_the_monitors_child_and_dies_with_it(kvm_cli):
    monitor = kvm_cli.create("owned", ticker_bundle(kvm_cli, "owned"))
    qemu = vm_status(kvm_cli, "owned")["pid"]
    assert parent_of(qemu) == monitor, "the VM does not belong to the ZIC's monitor"
    os.kill(monitor, signal.SIGKILL)
    wait_exit(monitor)
    wait_for(lambda: not Path(f"/proc/{qemu}").exists() or "State:\tZ" in Path(f"/proc/{qemu}/status").read_text(),
             what="the VM to die with its monitor")
    kvm_cli.run("delete", "--force", "owned", check=True)
    assert not (kvm_cli.base / "node" / "kvm-cells" / "owned").exists()


def test_the_vm_runs_in_the_containers_cgroup(kvm_cli):
    cgroup = f"/runphi-test-{uuid.uuid4().hex[:8]}"
    dirs = cgroup_dirs(cgroup)
    if not dirs:
        pytest.skip("no writable cgroup hierarchy on this host")
    kvm_cli.create("grouped", ticker_bundle(kvm_cli, "grouped", linux={"cgroupsPath": cgroup}))
    qemu = vm_status(kvm_cli, "grouped")["pid"]
    for directory in dirs:
        assert str(qemu) in (directory / "cgroup.procs").read_text().split(), directory
    kvm_cli.run("delete", "--force", "grouped", check=True)
    assert not any(directory.exists() for directory in dirs), "the container's cgroup was left behind"


def test_a_guest_reset_fails_the_cell_139_naming_its_cpus(kvm_cli):
    """-no-reboot: a guest's PSCI SYSTEM_RESET stops the VM; runphi counts it a crash, as Jailhouse does."""
    bundle = write_zic_bundle(kvm_cli.base / "reset", (kvm_cli.inmates / "reset.bin").read_bytes(), BOOT)
    monitor = kvm_cli.started("reset", bundle)
    assert wait_exit(monitor, timeout=60) == 139
    status = vm_status(kvm_cli, "reset")
    assert status["phase"] == "failed" and status["detail"] == "failed: guest reset", status
    assert status["failed_cpus"] and "Hello from runphi inmate reset" in kvm_cli.run("logs", "reset").stdout


def test_vcpu_pinning_of_the_image_decides_which_host_cpu_runs_which_vcpu():
    from runphi.backends.kvm.backend import vcpu_host_cpus
    from runphi.image import BootDescription

    def boot(pins):
        return BootDescription(source=Path("/c"), inmate=Path("/b"), vcpu_pins=tuple(pins))

    assert vcpu_host_cpus(boot([(0, 5), (1, 3)]), frozenset({3, 5})) == [5, 3]
    assert vcpu_host_cpus(boot([]), frozenset({6, 2})) == [2, 6]
    with pytest.raises(BackendError, match="each vCPU 0..N-1 exactly once"):
        vcpu_host_cpus(boot([(1, 3)]), frozenset({3}))


def test_preallocated_locked_guest_ram_when_the_host_template_asks():
    plan = msgspec.structs.replace(PLAN, preallocate=True, lock_memory=True)
    argv = qemu_argv(plan, console_fd=7, owner_qmp_fd=8, control_fd=9)
    assert "-mem-prealloc" in argv and argv[argv.index("-overcommit") + 1] == "mem-lock=on"


def test_kill_before_start_stops_the_vm_at_once_without_waiting_for_a_power_button(kvm_cli):
    """A VM that never ran has no guest to ask: TERM ends it with 143 at once, not after the grace
    deadline (here a minute, far beyond the wait)."""
    bundle = ticker_bundle(kvm_cli, "unstarted", annotations={"org.runphi.runtime": "runphi",
                                                              "org.runphi.shutdown-timeout-ms": "60000"})
    monitor = kvm_cli.create("unstarted", bundle)
    kvm_cli.run("kill", "unstarted", "TERM", check=True)
    assert wait_exit(monitor, timeout=20) == 143
    assert vm_status(kvm_cli, "unstarted")["phase"] == "shut down"


# ---- create waits for the monitor's bring-up ----------------------------------------------------

@pytest.mark.parametrize(("answer", "close", "outcome"), [
    (b"ok", True, None),
    (b"error QEMU could not bring up VM z: no kernel", True, "QEMU could not bring up VM z: no kernel"),
    (b"", True, "its monitor exited before bringing the cell up"),
    (b"", False, "did not bring the cell up within 0 s"),
])
def test_create_learns_how_the_monitors_bring_up_went(answer, close, outcome):
    from runphi.monitor import SpawnedMonitor

    read_end, write_end = os.pipe()
    if answer:
        os.write(write_end, answer)
    if close:
        os.close(write_end)
    try:
        monitor = SpawnedMonitor(os.getpid(), read_end)
        if outcome is None:
            monitor.wait_until_ready(timeout=5)
        else:
            with pytest.raises(BackendError, match=outcome):
                monitor.wait_until_ready(timeout=0.2 if not close else 5)
    finally:
        if not close:
            os.close(write_end)


# ---- a networked ZIC's link ----------------------------------------------------------------------

def test_link_slots_are_the_30s_of_the_link_subnet_after_the_first():
    from runphi.backends.kvm.net import plan_link, tap_name
    from runphi.backends.links import link_slots

    assert list(link_slots("169.254.100.0/28")) == [1, 2, 3]
    link = plan_link("web", "169.254.100.0/24", 2)
    assert (link.host_address, link.guest_address) == ("169.254.100.9", "169.254.100.10")
    assert link.guest_argument() == "runphi.net=169.254.100.10/30,169.254.100.9"
    assert link.tap == tap_name("web") and len(link.tap) <= 15 and link.mac.startswith("02:")
    with pytest.raises(BackendError, match="does not fit"):
        plan_link("web", "169.254.100.0/28", 4)


def test_a_networked_vm_gets_a_virtio_net_device_on_its_tap_and_no_pci_rom():
    from runphi.backends.kvm.net import plan_link

    link = plan_link("web", "169.254.100.0/24", 1)
    plan = msgspec.structs.replace(PLAN, host_link=link)
    argv = qemu_argv(plan, console_fd=7, owner_qmp_fd=8, control_fd=9)
    assert argv[argv.index("-netdev") + 1] == f"tap,id=net0,ifname={link.tap},script=no,downscript=no"
    assert f"virtio-net-device,netdev=net0,mac={link.mac}" in argv
    assert not any("pci" in arg for arg in argv)
    in_a_pod = qemu_argv(plan, console_fd=7, owner_qmp_fd=8, control_fd=9, tap_fd=10)
    assert in_a_pod[in_a_pod.index("-netdev") + 1] == "tap,id=net0,fd=10"  # opened in the pod's namespace


def test_no_free_link_refuses_the_next_networked_zic_with_one_line(tmp_path):
    from runphi.backends.ledger import AllocationError, NodeLedger, ResourceRequest

    template = tmp_path / "host.toml"
    template.write_text('name = "small"\nmemory_mib = 256\ncpus = "0"\nlink_subnet = "169.254.100.0/29"\n')
    ledger = NodeLedger(load_host(template), tmp_path / "node", root_cpus=lambda: frozenset({0}),
                        live_cells=frozenset, cell_name=str)
    assert ledger.allocate("a", ResourceRequest(cpus=frozenset(), cpu_count=0, network=True)).ivshmem_slot == 1
    with pytest.raises(AllocationError) as refused:
        ledger.allocate("b", ResourceRequest(cpus=frozenset(), cpu_count=0, network=True))
    assert "a network link requested, all 1 tap links are in use" in str(refused.value)


def test_metrics_report_each_vcpus_cpu_time_and_the_ledger(kvm_cli):
    """On KVM, ``runphi metrics`` reports the CPU time of the VM's vCPU thread on its ledger
    CPU (it grows while the ticker runs) and the ledger's CPUs in use; there are no pools."""
    from prometheus_client.parser import text_string_to_metric_families

    kvm_cli.started("metered", ticker_bundle(kvm_cli, "metered"))
    kvm_cli.console_until("metered", b"tick", timeout=60)

    def scrape() -> dict[tuple[str, str], float]:
        done = kvm_cli.run("metrics", check=True)
        return {(s.name, s.labels.get("cpu", s.labels.get("resource", ""))): s.value
                for family in text_string_to_metric_families(done.stdout) for s in family.samples
                if s.labels.get("container_id", "metered") == "metered"}

    first = scrape()
    [cpu] = [c for (name, c) in first if name == "runphi_zic_cpu_seconds_total"]
    ledger = json.loads((kvm_cli.base / "node" / "jailhouse-ledger.json").read_text())["allocations"]
    assert [cpu] == [str(c) for c in ledger["metered"]["cpus"]]
    assert first[("runphi_node_resource_used", "cpus")] == 1
    assert not any(name.startswith("runphi_hypervisor_pool") for name, _ in first)
    wait_for(lambda: scrape()[("runphi_zic_cpu_seconds_total", cpu)] > first[("runphi_zic_cpu_seconds_total", cpu)],
             timeout=30, what="the vCPU's CPU time to grow")
    kvm_cli.run("delete", "--force", "metered", check=True)
