"""A Linux guest goes through create/start like `jailhouse cell linux` would boot it.

The simulator ships no helper scripts and no real kernel runs here, so the
board's `linux-loader.bin` (next to its `jailhouse` tool, where Jailhouse installs
it) is a script guest that reports it ran; the kernel is a stand-in arm64 Image
and the device tree is QEMU virt's. What is checked: the cell starts at the
loader, and every piece lands where the placement says.
"""

from __future__ import annotations

import struct

import pytest

from tests.test_lifecycle_harness import board, guest_script, subreaper, wait_exit, zic  # noqa: F401
from tools.linux_guest.testing import virt_dtb_or_skip


@pytest.fixture
def linux_bundle(zic, tmp_path):
    dtb = virt_dtb_or_skip(tmp_path / "virt.dtb")
    loader = zic.board.root / "libexec" / "jailhouse" / "linux-loader.bin"
    loader.parent.mkdir(parents=True, exist_ok=True)
    loader.write_bytes(guest_script("print linux-loader: jumping to the kernel\\n", "shutdown"))
    bundle = zic.bundle("linux", b"", boot={"os_var": "linux", "inmate": "/boot/Image", "dtb": "/boot/virt.dtb",
                                            "initrd": "/boot/rootfs.cpio", "memory": 32},
                        annotations={"org.runphi.linux.cmdline": "console=ttyAMA0 quiet"})
    boot = bundle / "rootfs" / "boot"
    (boot / "virt.dtb").write_bytes(dtb)
    header = bytearray(64)
    struct.pack_into("<Q", header, 8, 0x80000)
    header[56:60] = b"ARM\x64"
    (boot / "Image").write_bytes(bytes(header) + bytes(2 << 20))
    (boot / "rootfs.cpio").write_bytes(b"070701" + bytes(4096))
    yield bundle
    loader.unlink()


def test_linux_guest_boots_through_the_loader(zic, linux_bundle):
    pid = zic.create("lin1", linux_bundle)
    from runphi.backends.jailhouse.cellconfig import read_cell
    from runphi.backends.jailhouse.linux import parse_fdt

    _, cell = read_cell((zic.root / "lin1" / "lin1.cell").read_bytes())
    assert cell.cpu_reset_address == 0
    dtb = parse_fdt((zic.root / "lin1" / "guest.dtb").read_bytes())
    chosen = dtb.root.child("chosen")
    assert chosen.props["bootargs"] == b"console=ttyAMA0 quiet\0"
    assert chosen.props["linux,initrd-end"] > chosen.props["linux,initrd-start"]
    zic.run("start", "lin1", check=True)
    assert wait_exit(pid) == 0
    logs = zic.run("logs", "lin1", check=True)
    assert "linux-loader: jumping to the kernel" in logs.stdout


def _drop_dtb(bundle) -> None:
    import json

    description = bundle / "rootfs" / "boot" / "config.json"
    data = json.loads(description.read_text())
    del data["dtb"]
    description.write_text(json.dumps(data))


def test_linux_guest_without_a_device_tree_gets_the_platforms(zic, linux_bundle):
    from runphi.backends.jailhouse.linux import parse_fdt

    _drop_dtb(linux_bundle)
    pid = zic.create("lin3", linux_bundle)
    dtb = parse_fdt((zic.root / "lin3" / "guest.dtb").read_bytes())
    # The simulator's inmate-qemu-arm64.dtb (sim-qemu-arm64's linux_dtb), patched.
    assert dtb.root.props["model"] == b"Jailhouse cell on QEMU ARM64\0"
    assert dtb.root.child("chosen").props["bootargs"] == b"console=ttyAMA0 quiet\0"
    zic.run("delete", "--force", "lin3", check=True)
    wait_exit(pid)


def test_linux_guest_without_a_device_tree_is_refused_without_a_platform_default(zic, linux_bundle, tmp_path):
    from pathlib import Path

    _drop_dtb(linux_bundle)
    template = Path(__file__).resolve().parent.parent / "templates" / "sim-qemu-arm64.toml"
    platform = tmp_path / "no-linux-dtb.toml"
    platform.write_text("\n".join(line for line in template.read_text().splitlines()
                                  if not line.startswith("linux_dtb")))
    zic.env["RUNPHI_PLATFORM"] = str(platform)
    result = zic.run("create", "--bundle", str(linux_bundle), "lin2")
    assert result.returncode == 1 and "needs a device tree" in result.stderr
    assert zic.board.cells() == {} and not (zic.root / "lin2").exists()
