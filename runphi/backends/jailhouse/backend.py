"""The Jailhouse :class:`~runphi.backends.base.Backend`: allocator + planner + writer + driver.

``launch`` is the hypervisor half of ``runphi create`` (DESIGN §3), synchronous
and without trio:

1. read the image's boot description; allocate CPUs/RAM/UART/link under the
   node ledger lock;
2. render the ``.cell`` into the container's directory;
3. ``cell create``; for a networked ZIC, configure the root side of its link
   (:mod:`runphi.backends.jailhouse.net`: on the host, or joined to the pod);
   ``cell load`` the inmate at its guest address (Omnivisor RPU images with ``-r``);
4. open the console UART, the cell's console source.

Every step registers its undo; any failure runs them in reverse order (fd
closed, cell destroyed, ledger released) and re-raises the one error, so a
failed launch leaves nothing behind. The terminal, the start fifo and the
monitor are the core's (:mod:`runphi.core.launch`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from runphi.backends.base import (GONE, LINUX_CMDLINE_ANNOTATION, BackendError, CellNotFound, CellRecord,
                                  CellStatistics, CellStats, CellStatus, LaunchedCell, LaunchRequest, PoolUse,
                                  ResourceBusy, WatchSettings, shutdown_timeout)
from runphi.backends.jailhouse.driver import JailhouseDriver, LoadImage, RpuImage
from runphi.errors import RunphiError
from runphi.pausepoint import pause_point
from runphi.undo import UndoStack

if TYPE_CHECKING:
    from runphi.backends.jailhouse.allocator import Allocator
    from runphi.backends.jailhouse.cellconfig import CellConfig
    from runphi.backends.jailhouse.platform import Platform
    from runphi.backends.ledger import Allocation, ResourceUse
    from runphi.backends.links import LinkAddresses
    from runphi.config import RuntimeConfig
    from runphi.image import BootDescription
    from runphi.log import VerbLog

#: Deadline for the `cell destroy` that undoes a failed create.
UNDO_TIMEOUT = 5.0


class JailhouseBackend:
    """One node's Jailhouse, as configured in runphi.toml (`[jailhouse]`)."""

    def __init__(self, config: RuntimeConfig, warn: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.jh = config.jailhouse
        self.driver = JailhouseDriver(self.jh.tool, self.jh.sysfs)
        self._warn = warn or (lambda message: None)
        self._platform: Platform | None = None

    # ---- pieces ------------------------------------------------------------

    @property
    def platform(self) -> Platform:
        if self._platform is None:
            from runphi.backends.jailhouse.platform import load_platform

            self._platform = load_platform(self.jh.platform, self.jh.templates_path())
        return self._platform

    def use_platform(self, name_or_path: str) -> None:
        """Plan for another platform than runphi.toml's (``cell-config --platform``)."""
        from runphi.backends.jailhouse.platform import load_platform

        self._platform = load_platform(name_or_path, self.jh.templates_path())

    def allocator(self) -> Allocator:
        from runphi.backends.jailhouse.allocator import Allocator

        return Allocator(self.platform, Path(self.config.state_dir), Path(self.jh.sysfs), warn=self._warn)

    # ---- the Backend protocol --------------------------------------------

    @property
    def poll_interval(self) -> float:
        return self.jh.poll_interval_ms / 1000

    def planned_cell_name(self, container_id: str) -> str:
        from runphi.backends.jailhouse.names import cell_name

        return cell_name(container_id)

    def cell_state(self, cell: CellRecord) -> CellStatus:
        from runphi.backends.jailhouse.driver import cell_status

        return cell_status(self.driver.cell_state(cell.cell_name, cell.cell_id))

    def cell_statistics(self, cell: CellRecord) -> CellStatistics:
        return self.driver.statistics(cell.cell_name, cell.cell_id)

    def failed_cpus(self, cell: CellRecord) -> frozenset[int]:
        return self.driver.failed_cpus(cell.cell_name, cell.cell_id)

    def stats(self, cell: CellRecord) -> CellStats:
        """The cell's sysfs state, failed CPUs and VM-exit counters (``statistics/``)."""
        status = self.cell_state(cell)
        if status == GONE:
            return CellStats(status=GONE)
        try:
            counters = self.cell_statistics(cell)
        except CellNotFound:
            return CellStats(status=GONE)
        return CellStats(status=status, failed_cpus=self.failed_cpus(cell),
                         vmexits=counters.total, vmexits_per_cpu=counters.per_cpu)

    def pools(self) -> list[PoolUse]:
        return self.driver.pools()

    def resources(self) -> list[ResourceUse]:
        return self.allocator().usage()

    def start_cell(self, cell_name: str) -> None:
        self.driver.start(cell_name)

    def shutdown_cell(self, cell_name: str, timeout: float | None = None) -> None:
        self.driver.shutdown(cell_name, timeout)

    def destroy_cell(self, cell_name: str, timeout: float | None = None) -> None:
        """Destroy the cell if it exists, undo its network link's root side, then release what
        its container held in the ledger.

        Idempotent: a cell that is already gone only has its resources released.
        """
        from runphi.backends.jailhouse.net import remove_root_link

        try:
            self.driver.destroy(cell_name, timeout)
        except CellNotFound:
            pass
        remove_root_link(self.config.state_dir, cell_name)
        self.firmware_link(cell_name).unlink(missing_ok=True)
        self.release_cell_resources(cell_name)

    def release_cell_resources(self, cell_name: str) -> None:
        """Drop the ledger entry of the container whose cell is `cell_name` (if any)."""
        from runphi.backends.jailhouse.names import cell_name as name_of

        allocator = self.allocator()
        for allocation in allocator.allocations():
            if name_of(allocation.container_id) == cell_name:
                allocator.release(allocation.container_id)

    # ---- create ------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> LaunchedCell:
        """Bring one ZIC's cell to created and loaded (module docstring); undo everything on failure."""
        undo = UndoStack()
        try:
            return self._launch(request, undo)
        except BaseException as exc:
            problems = undo.unwind()
            for problem in problems:
                self._warn(f"while undoing the create of {request.container_id}: {problem}")
            if isinstance(exc, (OSError,)) and not isinstance(exc, RunphiError):
                raise BackendError(str(exc)) from None
            raise

    def _launch(self, request: LaunchRequest, undo: UndoStack) -> LaunchedCell:
        from runphi.backends.jailhouse.cellconfig import write_cell
        from runphi.backends.jailhouse.names import cell_name
        from runphi.backends.ledger import request_from
        from runphi.image import load_boot_description

        cid = request.container_id
        grace = shutdown_timeout(request.config.annotations, self.jh.shutdown_timeout_ms)
        self.driver.require_available()
        boot = load_boot_description(Path(request.rootfs))
        self._refuse_unsupported(boot)
        platform = self.platform
        allocator = self.allocator()
        allocation = allocator.allocate(cid, request_from(request.config, boot, platform))
        undo.push("release node resources", lambda: allocator.release(cid))
        self._check_console(request, allocation, boot.console or platform.default_console)

        name = cell_name(cid)
        if self.driver.cell_id(name) is not None:
            raise ResourceBusy(f"a Jailhouse cell named {name!r} already exists "
                               "(left over, or used by another namespace): destroy it first")
        cell_config = self.planned_cell(allocation, boot, cid)
        addresses = self._link_addresses(allocation, boot)
        net_argument = addresses.guest_argument() if addresses is not None else ""
        linux_images = (self._prepare_linux(boot, cell_config, request, self._linux_console(allocation),
                                            net_argument) if boot.is_linux else None)
        cell_file = Path(request.container_dir, f"{name}.cell")
        cell_file.write_bytes(write_cell(cell_config, platform.profile))
        undo.push("remove the .cell file", lambda: cell_file.unlink(missing_ok=True))

        self._create_cell(str(cell_file), name, allocation)
        undo.push(f"destroy cell {name}", lambda: self.driver.destroy(name, UNDO_TIMEOUT))
        if addresses is not None and allocation.ivshmem_slot is not None:
            self._make_link(name, allocation.ivshmem_slot, addresses, request, undo)
        if linux_images is not None:
            self.driver.load(name, linux_images)
        elif boot.rpu_req:
            self._load_rpu(name, boot, allocation, undo)
        else:
            self._load(name, boot, cell_config)

        device, console_fd = self._open_console(request, allocation, undo)
        cell = CellRecord(cell_name=name, cell_id=self.driver.cell_id(name),
                          allocation=msgspec.to_builtins(allocation), uart_device=device)
        undo.discard()
        return LaunchedCell(cell=cell, console_fd=console_fd, watch=self._watch_settings(grace),
                            console_kind="hypervisor" if allocation.hypervisor_console else "uart")

    def _link_addresses(self, allocation: Allocation, boot: BootDescription) -> LinkAddresses | None:
        """The two ends of the ZIC's network link (None without one): the /30 of its slot in
        the platform's link subnet, or what the image's ``netconf`` states."""
        from runphi.backends.links import link_addresses

        ivshmem = self.platform.ivshmem
        if allocation.ivshmem_slot is None or ivshmem is None:
            return None
        return link_addresses(ivshmem.link_subnet, allocation.ivshmem_slot, boot.netconf)

    def _make_link(self, name: str, slot: int, addresses: LinkAddresses, request: LaunchRequest,
                   undo: UndoStack) -> None:
        """Configure the root side of the cell's link: on the root, or joined to the pod the
        spec names. Recorded before it is done, so ``destroy_cell`` undoes it after any crash."""
        from runphi.backends.jailhouse.net import (RootLink, find_root_netdev, make_root_link, plan_pod_link,
                                                   remove_root_link, write_record)
        from runphi.backends.jailhouse.platform import default_placeholders
        from runphi.backends.links import pod_namespace, read_pod_interface

        assert self.platform.ivshmem is not None
        directory = self.platform.ivshmem.netdev_path(slot, default_placeholders(self.jh.sysfs))
        link = RootLink(cell=name, interface=find_root_netdev(directory, name), addresses=addresses)
        namespace = pod_namespace(request.config)
        if namespace:
            link = plan_pod_link(link, read_pod_interface(namespace))
        state_dir = self.config.state_dir
        write_record(state_dir, link)
        undo.push("remove the network link", lambda: remove_root_link(state_dir, name))
        make_root_link(link)
        pause_point("create:linked")

    def _watch_settings(self, grace: float) -> WatchSettings:
        """How the monitor watches a cell of this Jailhouse (runphi.backends.jailhouse.watch)."""
        tool = os.path.abspath(self.jh.tool) if "/" in self.jh.tool else self.jh.tool
        return WatchSettings(backend="jailhouse", backend_config={"tool": tool, "sysfs": os.path.abspath(self.jh.sysfs)},
                             poll_interval=self.poll_interval,
                             probe_interval=self.jh.probe_interval_ms / 1000, shutdown_timeout=grace)

    def planned_cell(self, allocation: Allocation, boot: BootDescription, cid: str) -> CellConfig:
        """The cell ``launch`` writes for this allocation: the planner's, with a Linux guest
        starting at Jailhouse's loader (placed at guest address 0)."""
        from runphi.backends.jailhouse.plan import plan_cell

        cell = plan_cell(self.platform, allocation, boot, cid)
        return msgspec.structs.replace(cell, cpu_reset_address=0) if boot.is_linux else cell

    # ---- cell-config (Jailhouse's own tooling, beyond the protocol) ----------

    def cell_config_preview(self, bundle: Path, platform_name: str | None, fmt: str, log: VerbLog) -> bytes:
        """What ``runphi cell-config BUNDLE`` prints: the cell ``launch`` would write, rendered as ``fmt``.

        Never touches the hypervisor: the node's ledger is read only, and the root
        cell's CPUs come from sysfs when Jailhouse is enabled here, else the root is
        assumed to own every CPU the platform may give away plus CPU 0.
        """
        from runphi import oci
        from runphi.backends.jailhouse.preview import render
        from runphi.backends.ledger import request_from
        from runphi.image import load_boot_description

        if platform_name:
            self.use_platform(platform_name)
        platform = self.platform
        config = oci.load_config(bundle)
        boot = load_boot_description(config.rootfs(bundle), log)
        container_id = Path(bundle).resolve().name
        root_cpus = None
        if not (Path(self.jh.sysfs) / "cells" / "0" / "cpus_assigned_list").exists():
            root_cpus = platform.cell_cpu_set | {0}
            log.info("Jailhouse is not enabled here: planning as if the root cell owned all cell CPUs and CPU 0",
                     sysfs=self.jh.sysfs)
        allocation = self.allocator().preview(container_id, request_from(config, boot, platform), root_cpus)
        return render(self.planned_cell(allocation, boot, container_id), platform.profile, fmt, None)

    @staticmethod
    def decode_cell_config(path: Path, fmt: str, profile: str | None = None) -> bytes:
        """What ``runphi cell-config --decode FILE [--profile P]`` prints."""
        from runphi.backends.jailhouse.preview import decode_file

        return decode_file(path, fmt, profile)

    def _create_cell(self, cell_file: str, name: str, allocation: Allocation) -> None:
        try:
            self.driver.create(cell_file, name)
        except ResourceBusy as exc:
            raise ResourceBusy(self._busy_cause(allocation) or str(exc)) from None

    def _busy_cause(self, allocation: Allocation) -> str | None:
        """Name the CPU another cell owns, in user terms (None if it is not a CPU)."""
        try:
            root = self.driver.root_cpus()
        except BackendError:
            return None
        for cpu in sorted(allocation.cpus - root):
            owner = self.driver.cpu_owner(cpu)
            where = f"cell {owner!r}" if owner else "no cell (the root cell does not own it)"
            return (f"CPU {cpu} is owned by another cell ({where}); free it or pin the ZIC "
                    "to other CPUs")
        return None

    def _check_console(self, request: LaunchRequest, allocation: Allocation, wanted: str) -> None:
        """The hypervisor console is output only: refuse a terminal; note a ZIC left without a
        console because the lease was taken (its annotation allowed that)."""
        process = request.config.process
        terminal = process is not None and process.terminal
        if allocation.hypervisor_console and (terminal or request.open_stdin):
            raise BackendError(f"container {request.container_id}: its console is the hypervisor console, "
                               "which is output only: run it without a terminal (no -t) and without stdin")
        if wanted == "hypervisor" and not allocation.hypervisor_console:
            self._warn(f"container {request.container_id} runs without a console: the hypervisor console "
                       "is leased to another ZIC")

    @staticmethod
    def _refuse_unsupported(boot: BootDescription) -> None:
        """Refuse, before touching anything, the guests this build cannot boot yet."""
        if boot.rpu_req and boot.is_linux:
            raise BackendError("a Linux guest cannot run on an RPU "
                               "(remove rpu_req or use a bare-metal/RTOS image)")

    def _load(self, name: str, boot: BootDescription, cell_config) -> None:
        """`cell load` of the inmate at `starting_vaddress`, else at the cell's reset address.

        The inmate must fit the cell's RAM from there: checked first, so an
        oversized (or sparse multi-GiB) image is refused by its size instead of
        being streamed into the hypervisor until the tool's deadline.
        """
        from runphi.backends.jailhouse.plan import check_image_fits

        reset = cell_config.cpu_reset_address
        address = boot.starting_vaddress if boot.starting_vaddress is not None else reset
        try:
            size = os.stat(boot.inmate).st_size
            check_image_fits(cell_config, address, size, f"inmate {boot.inmate}")
        except OSError as exc:
            raise BackendError(f"cannot read the inmate {boot.inmate}: {exc.strerror}") from None
        self.driver.load(name, [LoadImage(file=str(boot.inmate), address=address)])

    def firmware_link(self, cell_name: str) -> Path:
        """Where a cell's RPU image is linked for the Omnivisor tool (a name unique per cell)."""
        import hashlib

        return Path(self.jh.firmware_dir) / f"runphi-{hashlib.sha256(cell_name.encode()).hexdigest()[:12]}.elf"

    def _load_rpu(self, name: str, boot: BootDescription, allocation: Allocation, undo: UndoStack) -> None:
        """`cell load CELL -r IMAGE RCPU`: the image is linked into the firmware directory first."""
        link = self.firmware_link(name)
        try:
            link.unlink(missing_ok=True)
            link.symlink_to(boot.inmate)
        except OSError as exc:
            raise BackendError(f"cannot link its RPU image into {self.jh.firmware_dir}: {exc.strerror} "
                               "(check [jailhouse] firmware_dir)") from None
        undo.push("remove the RPU image link", lambda: link.unlink(missing_ok=True))
        self.driver.load(name, [], [RpuImage(firmware=link.name, rcpu=min(allocation.rpus))])

    def linux_loader(self) -> Path:
        """Jailhouse's `linux-loader.bin`: `[jailhouse] linux_loader`, else
        `<prefix>/libexec/jailhouse/` next to the tool's `<prefix>/*bin/`."""
        import shutil

        if self.jh.linux_loader:
            return Path(self.jh.linux_loader)
        tool = shutil.which(self.jh.tool) or self.jh.tool
        return Path(os.path.abspath(tool)).parent.parent / "libexec" / "jailhouse" / "linux-loader.bin"

    def _linux_console(self, allocation: Allocation) -> str | None:
        """The guest tty of the ZIC's console UART slot (for ``console=``), or None without one."""
        from runphi.backends.jailhouse.linux import console_device

        uarts = self.platform.uarts
        if not uarts:
            return None
        slot = uarts[allocation.uart_slot if allocation.uart_slot is not None else 0]
        return console_device(slot.console().type)

    def _platform_linux_dtb(self) -> Path:
        """The platform's device tree for Linux guests without their own (`linux_dtb`)."""
        from runphi.backends.jailhouse.platform import PlatformError, default_placeholders

        if not self.platform.linux_dtb:
            raise BackendError("a Linux guest needs a device tree: set \"dtb\" "
                               "in the image's /boot/config.json (or linux_dtb in the platform file)")
        try:
            path = Path(self.platform.linux_dtb.format_map(default_placeholders(self.jh.sysfs)))
        except KeyError as exc:
            raise PlatformError(f"the platform's linux_dtb needs {{{exc.args[0]}}}: "
                                "set RUNPHI_SIM_ROOT") from None
        if not path.is_file():
            raise BackendError(f"the platform's Linux device tree {path} is missing; "
                               "set \"dtb\" in the image or fix linux_dtb in the platform file")
        return path

    def _prepare_linux(self, boot: BootDescription, cell_config: CellConfig, request: LaunchRequest,
                       console: str | None, net_argument: str) -> list[LoadImage]:
        """Place and patch a Linux guest (see runphi.backends.jailhouse.linux); the images to load.

        The kernel command line is the annotation's, with ``console=`` of the ZIC's UART
        slot in front unless the annotation names a console itself, and the network link's
        ``runphi.net=`` argument at the end for a networked ZIC."""
        from runphi.backends.jailhouse.linux import LinuxGuestError, patch_device_tree, place_linux, with_console

        loader = self.linux_loader()
        if not loader.is_file():
            raise BackendError(f"Jailhouse's Linux loader {loader} is missing "
                               "(install Jailhouse's inmates next to the jailhouse tool)")
        dtb_path = boot.dtb or self._platform_linux_dtb()
        kernel_path = boot.kernel or boot.inmate
        try:
            kernel = kernel_path.read_bytes()
            dtb = dtb_path.read_bytes()
            initrd_size = boot.initrd.stat().st_size if boot.initrd is not None else None
        except OSError as exc:
            raise BackendError(f"cannot read the Linux guest's files: {exc}") from None
        placed = place_linux(cell_config, loader_address=0, kernel=kernel, dtb_size=len(dtb) + 0x1000,
                             initrd_size=initrd_size)
        cmdline = with_console(request.config.annotations.get(LINUX_CMDLINE_ANNOTATION, ""), console)
        cmdline = f"{cmdline} {net_argument}".strip()
        patched = patch_device_tree(dtb, cell_config, placed, cmdline=cmdline, initrd_size=initrd_size)
        if len(patched) > len(dtb) + 0x1000:
            raise LinuxGuestError("the patched device tree outgrew the room left for it "
                                  f"(shorten {LINUX_CMDLINE_ANNOTATION})")
        dtb_file = Path(request.container_dir, "guest.dtb")
        dtb_file.write_bytes(patched)
        images = [LoadImage(file=str(loader), address=placed.loader),
                  LoadImage(string=placed.params, address=placed.params_address),
                  LoadImage(file=str(dtb_file), address=placed.dtb),
                  LoadImage(file=str(kernel_path), address=placed.kernel)]
        if boot.initrd is not None and placed.initrd is not None:
            images.append(LoadImage(file=str(boot.initrd), address=placed.initrd))
        return images

    def _open_console(self, request: LaunchRequest, allocation: Allocation, undo: UndoStack) -> tuple[str, int]:
        """(device, fd) of the ZIC's console: its UART slot, opened exclusively, or the hypervisor
        console it leased (read from here on, so nothing it prints is missed); ("", -1) without one."""
        from runphi.backends.jailhouse.platform import default_placeholders

        platform = self.platform
        if allocation.hypervisor_console:
            assert platform.hypervisor_console is not None
            device = platform.hypervisor_console.host_device(default_placeholders(self.jh.sysfs))
            fd = open_hypervisor_console(device, request.container_id)
            undo.push("close the hypervisor console", lambda: _close(fd))
            return device, fd
        if allocation.uart_slot is None and platform.per_cell_uarts:
            return "", -1
        if not platform.uarts:
            return "", -1
        slot = platform.uarts[allocation.uart_slot if allocation.uart_slot is not None else 0]
        device = slot.host_device(default_placeholders(self.jh.sysfs))
        if not device:
            return "", -1
        from runphi.console.uart import UartSettings, open_uart

        console = open_uart(device, UartSettings(baudrate=slot.baud), container_id=request.container_id)
        undo.push("close the console UART", lambda: _close(console.fd))
        return device, console.fd


def open_hypervisor_console(device: str, container_id: str) -> int:
    """A reader of the hypervisor console at ``device``, non-blocking: the device on a board, a
    Unix socket in the simulator (each connection a reader of its own, as each open is)."""
    import socket
    import stat

    try:
        if stat.S_ISSOCK(os.stat(device).st_mode):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as reader:
                reader.connect(device)
                reader.setblocking(False)
                return reader.detach()
        return os.open(device, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise BackendError(f"container {container_id}: cannot read the hypervisor console {device}: "
                           f"{exc.strerror or exc} (is Jailhouse's driver loaded?)") from None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
