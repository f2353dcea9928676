"""Platform templates: every shipped board loads; bad templates fail with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from runphi.backends.jailhouse import cellconfig as cc
from runphi.backends.jailhouse.errors import PlatformError
from runphi.backends.jailhouse.platform import (
    available_platforms,
    default_placeholders,
    load_platform,
    parse_platform,
)

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
SHIPPED = ["kria-kv260", "qemu-arm64", "sim-qemu-arm64", "zcu102", "zcu104"]


def test_all_shipped_templates_are_present_and_valid() -> None:
    assert available_platforms(TEMPLATES) == SHIPPED
    for name in SHIPPED:
        platform = load_platform(name, TEMPLATES)
        assert platform.name == name
        assert platform.profile.name in cc.PROFILES


def test_sim_board_matches_the_simulator_facts() -> None:
    p = load_platform("sim-qemu-arm64", TEMPLATES)
    assert p.profile.name == "runphi-rev13" and p.arch == cc.Architecture.ARM64
    assert p.root_cell == "sim-qemu-arm64"
    assert p.cell_flag_bits == cc.CELL_PASSIVE_COMMREG | cc.CELL_VIRTUAL_CONSOLE_PERMITTED
    assert (p.gic.gicd, p.gic.gicr, p.gic.pin_base) == (0x08000000, 0x080A0000, 32)
    assert [(pool.start, pool.end) for pool in p.memory.pools] == [(0x50000000, 0x7F800000)]
    assert (p.memory.convention, p.memory.low_ram_size, p.memory.main_ram_guest) == ("qemu", 0x10000, 0x70000000)
    assert p.default_reset_address == 0x70000000
    assert (p.comm_region.guest, p.comm_region.size) == (0x80000000, 0x1000)
    assert p.ivshmem is not None
    assert [p.ivshmem.window_of(n) for n in (1, 2)] == [0x7F900000, 0x7FA00000]
    assert (p.ivshmem.domain, p.ivshmem.vpci_irq_base, p.ivshmem.intx_irq(1)) == (1, 108, 141)
    assert p.per_cell_uarts and len(p.uarts) == 7
    for n, uart in enumerate(p.uarts, start=1):
        assert (uart.phys, uart.guest, uart.size) == (0x09000000 + n * 0x1000, 0x09000000, 0x1000)
        assert (uart.irq, uart.phys_irq) == (33, 33 + n)
        assert uart.host_device({"sim_root": "/sim"}) == f"/sim/dev/ttyAMA{n}"
        assert uart.console() == cc.Console(address=0x09000000, size=0x1000, type=cc.CON_TYPE_PL011, flags=3)


def test_qemu_board_shares_one_uart() -> None:
    p = load_platform("qemu-arm64", TEMPLATES)
    assert not p.per_cell_uarts and len(p.uarts) == 1 and p.uarts[0].device == ""


def test_boards_use_omnivisor_with_rpus() -> None:
    for name, rpus in (("zcu102", [0, 1]), ("zcu104", [0, 1]), ("kria-kv260", [0])):
        p = load_platform(name, TEMPLATES)
        assert p.profile.name == "omnivisor-rev14"
        assert [r.id for r in p.rpus] == rpus
        assert p.memory.convention == "flat" and p.memory.main_ram_guest == 0
        assert p.uarts[0].console().type == cc.CON_TYPE_XUARTPS and not p.per_cell_uarts


def test_placeholder_needs_a_sim_root(monkeypatch) -> None:
    uart = load_platform("sim-qemu-arm64", TEMPLATES).uarts[0]
    with pytest.raises(PlatformError, match=r"needs \{sim_root\}: set RUNPHI_SIM_ROOT"):
        uart.host_device({})
    monkeypatch.delenv("RUNPHI_SIM_ROOT", raising=False)
    assert default_placeholders("/tmp/x/sys/devices/jailhouse") == {"sim_root": "/tmp/x"}
    assert default_placeholders("/elsewhere") == {}
    monkeypatch.setenv("RUNPHI_SIM_ROOT", "/srv/sim")
    assert default_placeholders("/tmp/x/sys/devices/jailhouse") == {"sim_root": "/srv/sim"}


def test_missing_template_lists_the_known_ones(tmp_path) -> None:
    with pytest.raises(PlatformError, match="does not exist .*sim-qemu-arm64"):
        load_platform("nope", TEMPLATES)
    (tmp_path / "board.toml").write_text((TEMPLATES / "zcu104.toml").read_text())
    assert load_platform(str(tmp_path / "board.toml"), TEMPLATES).name == "zcu104"


GOOD = (TEMPLATES / "sim-qemu-arm64.toml").read_text()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (("[gic]", "[gic]\ncolour = 1"), "unknown field `colour`"),
        (('format = "runphi-rev13"', 'format = "rev99"'), "format 'rev99' is not one of"),
        (('cell_cpus = "1-7"', 'cell_cpus = "7-1"'), "cell_cpus: invalid CPU list element"),
        (('cell_cpus = "1-7"', 'cell_cpus = ""'), "cell_cpus is empty"),
        (('architecture = "arm64"', 'architecture = "riscv"'), "architecture 'riscv'"),
        (('"PASSIVE_COMMREG"', '"PASIVE"'), "unknown flag 'PASIVE'"),
        (("end = 0x7f800000", "end = 0x40000000"), "must be non-empty and page aligned"),
        (("alignment = 0x200000", "alignment = 0x300000"), "power of two"),
        (("slots = [1, 2]", "slots = [1, 1]"), "must be distinct PCI slots"),
        (("pin_base = 32", "pin_base = 40"), "not a multiple of 32"),
        (("gicd = 0x08000000", 'gicd = "x"'), "Expected `int`, got `str`"),
        (("[memory]", "[memory\n"), "is not valid TOML"),
    ],
)
def test_bad_templates_fail_with_the_reason(change: tuple[str, str], reason: str) -> None:
    text = GOOD.replace(*change, 1)
    assert text != GOOD
    with pytest.raises(PlatformError) as err:
        parse_platform(text, "board.toml")
    message = str(err.value)
    assert message.startswith("platform template board.toml ")
    assert reason in message
    assert "\n" not in message
