"""A ZIC's virtual machine: the plan ``launch`` writes, and QEMU's command line for it.

The plan (:class:`VmPlan`, ``vm.json`` in the cell's directory) is complete: the
owner that brings the VM up needs nothing else. The command line has only explicit
devices (``-nodefaults``, no display, no default serial backend):

* the machine's own UART (the PL011 of ``virt``) on ``-serial chardev:console``, a
  socket the owner's console pipeline holds the other end of (no NIC unless the ZIC
  asks for a network);
* two QMP monitors: the owner's (events, power button, quit) and the control
  socket the verbs use (``cont``, ``stop``, ``query-status``);
* a bare-metal or Zephyr inmate placed at ``starting_vaddress`` with QEMU's generic
  loader, the first vCPU starting there; a Linux guest booted by QEMU itself with
  ``-kernel``/``-initrd``/``-dtb`` (QEMU's own device tree when the image has none);
* a networked ZIC's virtio-net device on its tap (:mod:`runphi.backends.kvm.net`);
* ``-S`` (the vCPUs wait for ``cont``: ``start``), ``-no-shutdown``/``-no-reboot``
  (a guest power-off or reset stops the VM instead of ending or restarting it, so
  the owner can tell which it was) and ``-d guest_errors`` (a store to unassigned
  memory is reported: the guest faulted).
"""

from __future__ import annotations

import os
import platform as host_platform
from typing import Literal

import msgspec

from runphi.backends.base import BackendError
from runphi.backends.kvm.net import Link, PodLink

Accel = Literal["kvm", "tcg"]

#: What ``platform.machine()`` says on hosts whose QEMU guest architecture has another name.
_HOST_ARCH = {"arm64": "aarch64", "amd64": "x86_64"}


class LoaderImage(msgspec.Struct, frozen=True):
    """One file QEMU's generic loader places into guest memory."""

    file: str
    address: int


class VmPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Everything QEMU needs for one ZIC (``vm.json`` in the cell's directory)."""

    name: str
    binary: str
    accel: Accel
    machine: str
    cpu: str
    #: ``-m``: guest RAM (MiB), covering a bare-metal inmate's placement.
    memory_mib: int
    #: vCPU i runs on host CPU ``vcpu_host_cpus[i]`` (the ledger's CPUs, honouring vcpu_pinning).
    vcpu_host_cpus: list[int]
    images: list[LoaderImage] = []
    entry: int | None = None
    kernel: str = ""
    initrd: str = ""
    dtb: str = ""
    append: str = ""
    preallocate: bool = False
    lock_memory: bool = False
    #: The container's cgroup (OCI ``linux.cgroupsPath``), joined by the VM process ("" = none).
    cgroup: str = ""
    #: A networked ZIC's link: a tap on the host with a link-local /30, or (in a pod) a tap
    #: inside the pod's network namespace, which reaches QEMU as an fd. None: no network.
    host_link: Link | None = None
    pod_link: PodLink | None = None

    @property
    def link(self) -> Link | PodLink | None:
        return self.pod_link or self.host_link


def choose_accel(setting: str, guest_arch: str) -> Accel:
    """``kvm`` when asked or when ``auto`` finds /dev/kvm usable for a guest of the host's
    architecture; else ``tcg`` (the development mode). BackendError when ``kvm`` is asked
    for and cannot be had."""
    host_arch = _HOST_ARCH.get(host_platform.machine(), host_platform.machine())
    usable = host_arch == guest_arch and os.access("/dev/kvm", os.R_OK | os.W_OK)
    if setting == "tcg" or (setting == "auto" and not usable):
        return "tcg"
    if not usable:
        why = (f"this {host_arch} host cannot run {guest_arch} guests with KVM" if host_arch != guest_arch
               else "/dev/kvm is missing or not accessible")
        raise BackendError(f"[kvm] accel = \"kvm\", but {why} (use accel = \"auto\" or \"tcg\")")
    return "kvm"


def qemu_argv(plan: VmPlan, *, console_fd: int, owner_qmp_fd: int, control_fd: int, tap_fd: int = -1) -> list[str]:
    """The QEMU command line of ``plan``; the fds are QEMU's ends of its sockets (and the tap
    of a ZIC in a pod, opened in the pod's namespace)."""
    accel = "kvm" if plan.accel == "kvm" else "tcg,thread=multi"
    argv = [
        plan.binary,
        "-name", plan.name,
        "-machine", plan.machine,
        "-accel", accel,
        "-cpu", plan.cpu,
        "-smp", str(len(plan.vcpu_host_cpus)),
        "-m", f"{plan.memory_mib}M",
        "-nodefaults", "-display", "none", "-no-user-config",
        "-S", "-no-shutdown", "-no-reboot",
        "-d", "guest_errors",
        "-chardev", f"socket,id=console,fd={console_fd}",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=owner,fd={owner_qmp_fd}",
        "-mon", "chardev=owner,mode=control",
        "-chardev", f"socket,id=control,fd={control_fd},server=on,wait=off",
        "-mon", "chardev=control,mode=control",
    ]  # fmt: skip
    if plan.preallocate:
        argv += ["-mem-prealloc"]
    if plan.lock_memory:
        argv += ["-overcommit", "mem-lock=on"]
    link = plan.link
    if link is not None:
        # virtio-net on a virtio-mmio transport of `virt`: no PCI option ROM needed.
        tap = f"fd={tap_fd}" if tap_fd >= 0 else f"ifname={link.tap},script=no,downscript=no"
        argv += ["-netdev", f"tap,id=net0,{tap}", "-device", f"virtio-net-device,netdev=net0,mac={link.mac}"]
    argv += _boot_arguments(plan)
    return argv


def _boot_arguments(plan: VmPlan) -> list[str]:
    if plan.kernel:
        argv = ["-kernel", plan.kernel]
        if plan.initrd:
            argv += ["-initrd", plan.initrd]
        if plan.dtb:
            argv += ["-dtb", plan.dtb]
        if plan.append:
            argv += ["-append", plan.append]
        return argv
    argv = []
    for image in plan.images:
        # QEMU option values double their commas.
        argv += ["-device", f"loader,file={image.file.replace(',', ',,')},addr={image.address:#x},force-raw=on"]
    if plan.entry is not None:
        argv += ["-device", f"loader,addr={plan.entry:#x},cpu-num=0"]
    return argv
