"""A small Linux guest for Linux ZICs: Debian's arm64 kernel and a busybox initramfs.

``python -m tools.linux_guest fetch|build|run [--cache DIR]``; see :mod:`tools.linux_guest.cli`.
"""

from tools.linux_guest.errors import LinuxGuestError
from tools.linux_guest.guest import (DEFAULT_KERNEL_PACKAGE, Fetched, LinuxGuest, build,
                                     default_cache_dir, fetch, qemu_argv)
from tools.linux_guest.initramfs import (BANNER, HOSTNAME, HTTP_BULK_PATH, HTTP_BULK_SCRIPT, HTTP_BULK_SIZE,
                                         HTTP_PAGE, HTTP_PORT, NET_ARGUMENT, NET_DEVICE,
                                         NET_FAILED_MESSAGE, NET_MODULES, NET_READY_MESSAGE,
                                         POWER_KEY_MESSAGE, PROMPT, SHUTDOWN_MESSAGE, build_initramfs,
                                         net_argument, net_ready_line)

__all__ = ["BANNER", "DEFAULT_KERNEL_PACKAGE", "HOSTNAME", "HTTP_BULK_PATH", "HTTP_BULK_SCRIPT", "HTTP_BULK_SIZE",
           "HTTP_PAGE", "HTTP_PORT", "NET_ARGUMENT",
           "NET_DEVICE", "NET_FAILED_MESSAGE", "NET_MODULES", "NET_READY_MESSAGE", "POWER_KEY_MESSAGE",
           "PROMPT", "SHUTDOWN_MESSAGE", "Fetched", "LinuxGuest", "LinuxGuestError", "build",
           "build_initramfs", "default_cache_dir", "fetch", "net_argument", "net_ready_line", "qemu_argv"]
