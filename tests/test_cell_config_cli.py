"""`runphi cell-config`, run as the real program: decode any .cell, render a bundle's cell."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runphi.backends.jailhouse import cellconfig as cc

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RUNPHI_SHARED") or REPO.parent / "shared")
ZEPHYR_DEMO = SHARED / "vectors" / "runphi-fork-rev13-qemu-arm64-zephyr-demo.cell"
needs_vectors = pytest.mark.skipif(not ZEPHYR_DEMO.is_file(), reason=f"{ZEPHYR_DEMO} not found (set RUNPHI_SHARED)")


def runphi(*args: str, tmp_path: Path, sysfs: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {
        **os.environ,
        "RUNPHI_CONFIG": str(tmp_path / "runphi.toml"),
        "RUNPHI_STATE_DIR": str(tmp_path / "state"),
        "RUNPHI_SYSFS": str(sysfs or tmp_path / "no-jailhouse"),
        "RUNPHI_TEMPLATES": str(REPO / "templates"),
        "RUNPHI_PLATFORM": "sim-qemu-arm64",
    }
    (tmp_path / "runphi.toml").touch()
    return subprocess.run([sys.executable, "-c", "from runphi.cli import main; main()", *args], env=env, capture_output=True, cwd=REPO,
                          timeout=60)  # fmt: skip


def bundle(tmp_path: Path, description: dict, resources: dict | None = None, name: str = "zic-demo") -> Path:
    root = tmp_path / name
    (root / "rootfs" / "boot").mkdir(parents=True)
    (root / "rootfs" / "boot" / "zephyr.bin").write_bytes(b"\x00" * 16)
    (root / "rootfs" / "boot" / "config.json").write_text(json.dumps({"inmate": "/boot/zephyr.bin", **description}))
    config = {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "linux": {"resources": resources or {}}}
    (root / "config.json").write_text(json.dumps(config))
    return root


@needs_vectors
def test_decode_prints_every_field_with_flag_names(tmp_path: Path) -> None:
    out = runphi("cell-config", "--decode", str(ZEPHYR_DEMO), tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    for expected in (
        "profile:           runphi-rev13", "name:              qemu-arm64-zephyr-demo",
        "flags:             0x40000001 (PASSIVE_COMMREG|VIRTUAL_CONSOLE_PERMITTED)", "cpus:              0-1 (mask 0x3)",
        "vpci_irq_base:     108", "cpu_reset_address: 0x70000000", "msg_reply_timeout: 0",
        "type 3 (PL011) flags 0x3 (ACCESS_MMIO|REGDIST_4)", "memory regions (13):",
        "phys 0x0009000000 -> virt 0x0009000000 size 0x00001000 flags 0x93 (READ|WRITE|IO|ROOTSHARED)",
        "phys 0x007f900000 -> virt 0x0000000000 size 0x00010000 flags 0x47 (READ|WRITE|EXECUTE|LOADABLE)",
        "flags 0x23 (READ|WRITE|COMM_REGION)", "irqs: 33, 140, 141", "pci devices (2):",
        "type 3 (IVSHMEM) domain 0 bdf 0x8 (00:01.0)", "shmem_protocol 0x1 (VETH)", "stream ids (0): none",
        "qos devices (0):",
    ):  # fmt: skip
        assert expected in text, expected


@needs_vectors
def test_decode_reencodes_binary_and_c(tmp_path: Path) -> None:
    out = runphi("cell-config", "--decode", str(ZEPHYR_DEMO), "--format", "binary", "-o", str(tmp_path / "x.cell"),
                 tmp_path=tmp_path)  # fmt: skip
    assert out.returncode == 0 and out.stdout == b""
    assert (tmp_path / "x.cell").read_bytes() == ZEPHYR_DEMO.read_bytes()
    c_src = runphi("cell-config", "--decode", str(ZEPHYR_DEMO), "--format", "c", tmp_path=tmp_path).stdout.decode()
    assert "struct cell_desc cell;" in c_src and '"qemu-arm64-zephyr-demo"' in c_src


def test_decode_of_a_foreign_file_is_one_error_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.cell"
    junk.write_bytes(b"\x7fELF" + b"\0" * 200)
    out = runphi("cell-config", "--decode", str(junk), tmp_path=tmp_path)
    assert out.returncode == 1 and out.stdout == b""
    lines = out.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "not a Jailhouse cell configuration" in lines[0] and str(junk) in lines[0]
    assert "Traceback" not in out.stderr.decode()


def test_bundle_renders_the_planned_cell(tmp_path: Path) -> None:
    b = bundle(tmp_path, {"os_var": "zephyr", "starting_vaddress": "0x70000000", "net": "yes"},
               {"cpu": {"quota": 150000, "period": 100000}, "memory": {"limit": 32 << 20}})  # fmt: skip
    out = runphi("cell-config", str(b), "--format", "binary", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    profile, cell = cc.read_cell(out.stdout)
    assert profile.name == "runphi-rev13" and cell.name == "zic-demo"
    assert cell.cpus == {1, 2}
    assert [r.size for r in cell.memory_regions if r.flags & cc.MEM_DMA] == [32 << 20]
    assert cell.irqchips[0].irqs() == [33, 141] and len(cell.pci_devices) == 1
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_bundle_plan_respects_the_ledger_and_sysfs(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys" / "devices" / "jailhouse"
    (sysfs / "cells" / "0").mkdir(parents=True)
    (sysfs / "cells" / "0" / "cpus_assigned_list").write_text("0,4-5\n")
    b = bundle(tmp_path, {"os_var": "zephyr"})
    out = runphi("cell-config", str(b), "--platform", "sim-qemu-arm64", "--format", "text", tmp_path=tmp_path,
                 sysfs=sysfs)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "cpus:              4 (mask 0x10)" in out.stdout.decode()


@pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("objcopy")), reason="gcc/objcopy not installed")
def test_bundle_c_output_compiles_to_the_binary_output(tmp_path: Path) -> None:
    b = bundle(tmp_path, {"os_var": "zephyr"})
    binary = runphi("cell-config", str(b), "--platform", "zcu104", "--format", "binary", tmp_path=tmp_path).stdout
    source = runphi("cell-config", str(b), "--platform", "zcu104", "--format", "c", tmp_path=tmp_path).stdout
    (tmp_path / "cell.c").write_bytes(source)
    subprocess.run(["gcc", "-Wall", "-Wextra", "-Werror", "-c", "-o", tmp_path / "cell.o", tmp_path / "cell.c"], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".data", tmp_path / "cell.o", tmp_path / "cell.cell"], check=True)
    assert (tmp_path / "cell.cell").read_bytes() == binary
    assert cc.read_cell(binary)[0].name == "omnivisor-rev14"


def test_bundle_errors_are_one_line(tmp_path: Path) -> None:
    b = bundle(tmp_path, {"inmate": "/boot/../../etc/passwd"})
    out = runphi("cell-config", str(b), tmp_path=tmp_path)
    assert out.returncode == 1
    lines = out.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "contains '..'" in lines[0]
    out = runphi("cell-config", str(b), "--platform", "nosuchboard", tmp_path=tmp_path)
    assert out.returncode == 1 and "nosuchboard.toml does not exist" in out.stderr.decode()
    out = runphi("cell-config", tmp_path=tmp_path)
    assert out.returncode == 1 and "needs a BUNDLE" in out.stderr.decode()


def test_a_linux_bundle_previews_the_cell_create_writes(tmp_path: Path) -> None:
    """A Linux guest starts at Jailhouse's loader at guest 0: the preview says so, as create writes it."""
    linux = bundle(tmp_path, {"os_var": "linux", "kernel": "/boot/zephyr.bin"}, name="linux-demo")
    bare = bundle(tmp_path, {"starting_vaddress": "0x70000000"}, name="bare-demo")
    previews = {}
    for root in (linux, bare):
        out = runphi("cell-config", str(root), tmp_path=tmp_path)
        assert out.returncode == 0, out.stderr
        previews[root.name] = out.stdout.decode()
    assert "cpu_reset_address: 0x0\n" in previews["linux-demo"]
    assert "cpu_reset_address: 0x0\n" not in previews["bare-demo"]


def test_an_ambiguous_file_is_refused_until_its_profile_is_named(tmp_path: Path) -> None:
    from tests.test_cellconfig import RPU_DEMO

    cell = tmp_path / "rpu-demo.cell"
    cell.write_bytes(cc.write_cell(RPU_DEMO, cc.PROFILES["omnivisor-rev14"]))
    refused = runphi("cell-config", "--decode", str(cell), tmp_path=tmp_path)
    assert refused.returncode == 1 and b"valid as both rev14 and omnivisor-rev14" in refused.stderr
    named = runphi("cell-config", "--decode", str(cell), "--profile", "omnivisor-rev14", tmp_path=tmp_path)
    assert named.returncode == 0, named.stderr
    assert b"profile:           omnivisor-rev14" in named.stdout
    again = runphi("cell-config", "--decode", str(cell), "--profile", "omnivisor-rev14", "--format", "binary",
                   tmp_path=tmp_path)
    assert again.stdout == cell.read_bytes()
    misused = runphi("cell-config", "--profile", "rev14", str(cell), tmp_path=tmp_path)
    assert misused.returncode == 1 and b"--profile names the format of a --decode FILE" in misused.stderr
