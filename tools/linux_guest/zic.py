"""A Linux ZIC from the cached guest: kernel + initramfs + device tree, built by mkzic.

The boot description is ``{"os_var": "linux", "inmate": "/boot/vmlinuz-…",
"initrd": "/boot/initrd.cpio.gz", "dtb": "/boot/<dtb>", "memory": …, "vcpus": …}``
(plus ``"net": "true"`` for a networked ZIC); runphi places and patches them as
``jailhouse cell linux`` would.
"""

from __future__ import annotations

from pathlib import Path

from tools.linux_guest.guest import LinuxGuest, guest_dir

DEFAULT_MEMORY_MIB = 128
"""Debian's kernel (≈32 MiB, the same again reserved for its decompression) plus room to run."""
DEFAULT_DTB_NAME = "inmate-qemu-arm64.dtb"
CMDLINE_ANNOTATION = "org.runphi.linux.cmdline"


def default_dtb(cache: Path) -> Path:
    """The simulator board's guest device tree, written into the cache (for ZICs run on the simulator).

    Real boards need the device tree that matches their Linux cell: pass it instead.
    """
    from tools.jailhouse_sim.fdt import inmate_tree, serialize

    path = guest_dir(cache) / DEFAULT_DTB_NAME
    data = serialize(inmate_tree())
    if not path.is_file() or path.read_bytes() != data:
        path.write_bytes(data)
    return path


def mkzic_argv(guest: LinuxGuest, dtb: Path, *, memory_mib: int = DEFAULT_MEMORY_MIB, vcpus: int = 1,
               bundle: Path | None = None, archive: Path | None = None, name: str | None = None,
               terminal: bool = False, cmdline: str | None = None,
               annotations: list[str] | None = None, net: bool = False) -> list[str]:
    """The ``python -m tools.mkzic`` arguments that build the Linux ZIC."""
    argv = ["--os-var", "linux", "--inmate", guest.kernel, "--initrd", guest.initrd, "--dtb", str(dtb),
            "--memory", str(memory_mib), "--vcpus", str(vcpus)]
    if net:
        argv += ["--net", "true"]
    if bundle is not None:
        argv += ["--bundle", str(bundle)]
        if terminal:
            argv.append("--terminal")
        if cmdline is not None:
            argv += ["--annotation", f"{CMDLINE_ANNOTATION}={cmdline}"]
        for annotation in annotations or []:
            argv += ["--annotation", annotation]
    if archive is not None:
        argv += ["--archive", str(archive), "--name", name or "linux-guest:latest"]
    return argv
