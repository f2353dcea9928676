"""runphi's side of Linux ZICs that the Linux guest relies on: the kernel command line
gets the console of the ZIC's UART slot."""

from __future__ import annotations

import pytest

from runphi.backends.jailhouse import cellconfig as cc
from runphi.backends.jailhouse.linux import console_device, with_console
from runphi.backends.jailhouse.platform import load_platform


@pytest.mark.parametrize("cmdline, expected", [
    ("", "console=ttyAMA0"),
    ("quiet", "console=ttyAMA0 quiet"),
    ("console=ttyAMA0,115200 quiet", "console=ttyAMA0,115200 quiet"),
    ("quiet console=hvc0", "quiet console=hvc0"),
])
def test_console_is_added_unless_the_user_named_one(cmdline, expected):
    assert with_console(cmdline, "ttyAMA0") == expected


def test_without_a_known_console_device_the_line_is_unchanged():
    assert with_console("quiet", None) == "quiet"
    assert console_device(cc.CON_TYPE_NONE) is None


@pytest.mark.parametrize("platform, device", [("sim-qemu-arm64", "ttyAMA0"), ("qemu-arm64", "ttyAMA0"),
                                              ("zcu102", "ttyPS0")])
def test_shipped_platforms_name_their_uart_tty(platform, device, tmp_path):
    from pathlib import Path

    templates = Path(__file__).resolve().parent.parent / "templates"
    uarts = load_platform(platform, templates).uarts
    assert uarts, platform
    assert {console_device(slot.console().type) for slot in uarts} == {device}
