"""The networked Linux guest, booted directly under QEMU: ``runphi.net=`` on its kernel
command line brings ``eth0`` (virtio-net on a virtio-mmio transport) up and busybox httpd
serves the known page and the bulk body its CGI script streams, fetched over a tap in a
network namespace this test makes.

All traffic stays inside that namespace, on 169.254.0.0/16: QEMU opens no tap itself, it
gets the tap's fd (``-netdev tap,fd=N``), opened inside the namespace.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.linux_guest import (BANNER, HTTP_BULK_PATH, HTTP_BULK_SIZE, HTTP_PAGE, NET_DEVICE, NET_FAILED_MESSAGE,
                               NET_MODULES, NET_READY_MESSAGE, PROMPT, SHUTDOWN_MESSAGE, LinuxGuest, net_argument,
                               net_ready_line)
from tools.linux_guest.testing import TapNamespace, boot_in_qemu, guest_or_skip, http_get_in, tap_namespace

pytestmark = pytest.mark.qemu

HOST = "169.254.77.1"
GUEST = "169.254.77.2"
PREFIX = 30
BOOT_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def linux_guest() -> LinuxGuest:
    return guest_or_skip()


@pytest.fixture
def link() -> Iterator[TapNamespace]:
    if os.geteuid() != 0:
        pytest.skip("making a network namespace and a tap needs root")
    if not Path("/dev/net/tun").exists():
        pytest.skip("no /dev/net/tun on this host (the kernel's tun driver)")
    with tap_namespace(f"rphi-guestnet-{os.getpid()}", "rphitap0", f"{HOST}/{PREFIX}") as made:
        yield made
    assert not Path(f"/run/netns/{made.name}").exists()


async def test_guest_serves_the_known_page_over_its_link(linux_guest, link, tmp_path: Path):
    cmdline = f"console=ttyAMA0 {net_argument(f'{GUEST}/{PREFIX}', HOST)}"
    async with boot_in_qemu(linux_guest, tmp_path, cmdline=cmdline, extra_argv=link.qemu_argv(),
                            pass_fds=[link.fd]) as vm:
        ready = await vm.console.expect(net_ready_line(f"{GUEST}/{PREFIX}"), timeout=BOOT_TIMEOUT)
        await vm.console.expect(PROMPT, await vm.console.expect(BANNER, ready))

        assert await http_get_in(link.name, GUEST) == (200, HTTP_PAGE.encode())
        status, _ = await http_get_in(link.name, GUEST, path="/no-such-page")
        assert status == 404
        status, body = await http_get_in(link.name, GUEST, path=HTTP_BULK_PATH, timeout=BOOT_TIMEOUT)
        assert status == 200 and len(body) == HTTP_BULK_SIZE and body.count(0) == HTTP_BULK_SIZE

        loaded = (await vm.run("cut -d' ' -f1 /proc/modules")).split()
        assert set(NET_MODULES) <= set(loaded), loaded
        routes = [line.strip() for line in (await vm.run("ip route")).splitlines()]
        assert f"default via {HOST} dev {NET_DEVICE}" in routes, routes
        assert await vm.run(f"cat /proc/sys/net/ipv6/conf/{NET_DEVICE}/disable_ipv6") == "1"

        mark = await vm.type("poweroff\n")
        assert await vm.wait_exit() == 0
        await vm.console.expect(SHUTDOWN_MESSAGE, mark, timeout=10)


async def test_without_the_argument_the_guest_has_no_network(linux_guest, tmp_path: Path):
    async with boot_in_qemu(linux_guest, tmp_path) as vm:
        await vm.console.expect(PROMPT, await vm.console.expect(BANNER, timeout=BOOT_TIMEOUT))
        loaded = (await vm.run("cut -d' ' -f1 /proc/modules")).split()
        assert not set(NET_MODULES) & set(loaded), loaded
        assert NET_READY_MESSAGE not in vm.console.text
        assert NET_FAILED_MESSAGE not in vm.console.text
        await vm.type("poweroff -f\n")
        assert await vm.wait_exit() == 0


async def test_a_missing_device_is_one_console_line_and_the_boot_goes_on(linux_guest, tmp_path: Path):
    cmdline = f"console=ttyAMA0 {net_argument(f'{GUEST}/{PREFIX}')}"
    async with boot_in_qemu(linux_guest, tmp_path, cmdline=cmdline) as vm:
        failed = await vm.console.expect(f"{NET_FAILED_MESSAGE}: no {NET_DEVICE}", timeout=BOOT_TIMEOUT)
        await vm.console.expect(PROMPT, await vm.console.expect(BANNER, failed))
        assert NET_READY_MESSAGE not in vm.console.text
        await vm.type("poweroff -f\n")
        assert await vm.wait_exit() == 0
