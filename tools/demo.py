"""``python -m tools.demo`` — what ``bash setup.sh demo`` runs.

Boots real aarch64 guests as ZICs on the Jailhouse simulator and shows their
console:

1. builds the test inmates (``tools/inmates``) and packages ``hello`` and
   ``echo`` as ZIC images with mkzic;
2. brings up a simulated board (QEMU engine) and, when containerd can be used
   (root, containerd/ctr/runc installed), a private containerd that runs them
   with runphi's own shim (runtime ``io.containerd.runphi.v2``);
3. ``ctr image import`` + ``ctr run --rm`` of ``hello``: the guest's UART
   output, streamed through runphi and containerd; then ``echo``, with the demo
   typing a line into the guest and reading it back;
4. without containerd, the same two ZICs through ``runphi run``;
5. with ``--linux``, a Linux ZIC (Debian's arm64 kernel + a busybox initramfs, from
   ``tools/linux_guest``): on a terminal you get its shell (``poweroff`` ends it),
   otherwise the demo types ``uname -m`` and ``poweroff`` into it;
6. stops everything it started (containerd, the board and its QEMUs) and, unless
   ``--workdir`` was given, removes its directory.

Exit status 0 when every guest behaved as expected; otherwise one
``demo: error: ...`` line and 1.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: How long one guest step may take on a slow, busy machine.
STEP_TIMEOUT_S = 120.0
#: Longest work directory whose sockets still fit a unix socket path.
MAX_WORKDIR_CHARS = 80
DEMO_LINE = b"hello from the demo"
IMAGE_TAG = "demo"


class DemoError(Exception):
    """Something the demo needs did not work; the message is the whole explanation."""


def narrate(text: str) -> None:
    """One narration line on stdout."""
    print(f"demo: {text}", flush=True)


# ---- the guest's console, shown live -------------------------------------------------------------

class ConsoleView:
    """A command whose stdout is a guest console: printed live, line by line, and searchable.

    stdin is a pipe (the demo types into the guest through it); stderr goes to a
    file that is quoted if the command fails.
    """

    PREFIX = "  guest | "

    def __init__(self, argv: list[str], env: dict[str, str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                            env=env)
        self.seen = b""
        self._pending = b""

    def _show(self, chunk: bytes) -> None:
        self.seen += chunk
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            # busybox's shell asks the terminal for the cursor position (ESC [6n) at each
            # prompt; shown to a real terminal, the query would be answered into our stdin.
            # busybox init starts its lines with \r, which would overwrite the prefix.
            shown = line.strip(b"\r").replace(b"\x1b[6n", b"")
            print(self.PREFIX + shown.decode(errors="replace"), flush=True)

    def _read_chunk(self, deadline: float) -> bytes:
        """The next bytes of the console ("" at its end); DemoError after the deadline."""
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([self.process.stdout], [], [], max(remaining, 0))
        if not ready:
            raise DemoError(f"the guest console went quiet for {STEP_TIMEOUT_S:.0f} s; "
                            f"last output: {self.seen[-200:]!r}")
        return os.read(self.process.stdout.fileno(), 4096)

    def expect(self, marker: bytes) -> None:
        """Show the console until ``marker`` has appeared in it."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while marker not in self.seen:
            chunk = self._read_chunk(deadline)
            if not chunk:
                raise DemoError(f"the guest console ended before {marker.decode()!r}: {self._failure()}")
            self._show(chunk)

    def type_line(self, line: bytes) -> None:
        """Send ``line`` and Enter (CR, what a terminal sends) to the guest."""
        narrate(f"typing {line.decode()!r} + Enter into the guest")
        self.process.stdin.write(line + b"\r")
        self.process.stdin.flush()

    def finish(self) -> int:
        """Show the console to its end and return the command's exit status."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while chunk := self._read_chunk(deadline):
            self._show(chunk)
        if self._pending:
            self._show(b"\n")
        self.process.stdin.close()
        self.process.stdout.close()
        return self.process.wait(STEP_TIMEOUT_S)

    def close(self) -> None:
        """Kill the command if it is still running (after an error)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if not stream.closed:
                stream.close()

    def _failure(self) -> str:
        status = self.process.wait(STEP_TIMEOUT_S)
        stderr = self.stderr_path.read_text(errors="replace").strip()
        return f"exit status {status}" + (f", {stderr}" if stderr else "")


@contextmanager
def console_view(argv: list[str], env: dict[str, str], stderr_path: Path) -> Iterator[ConsoleView]:
    """A :class:`ConsoleView` that is killed on the way out if it is still running."""
    view = ConsoleView(argv, env, stderr_path)
    try:
        yield view
    finally:
        view.close()


def guest_failed(guest: str, status: int, stderr_path: Path, expectation: str = "expected 0") -> DemoError:
    """The error for a guest that did not end as the demo expects, quoting the command's stderr."""
    return DemoError(f"the {guest} guest ended with status {status}, {expectation}: "
                     f"{stderr_path.read_text(errors='replace').strip()}")


def show_hello(argv: list[str], env: dict[str, str], base: Path) -> None:
    """Run the hello ZIC to its end; it must power off cleanly (status 0)."""
    with console_view(argv, env, base / "hello.stderr") as view:
        view.expect(b"Hello from runphi inmate hello")
        status = view.finish()
    if status != 0 or b"hello: done, powering off" not in view.seen:
        raise guest_failed("hello", status, base / "hello.stderr", "expected 0 after its last line")
    narrate("hello powered itself off: exit status 0")


def show_echo(argv: list[str], env: dict[str, str], base: Path) -> None:
    """Type a line into the echo ZIC, see it come back, then end it with `exit`."""
    with console_view(argv, env, base / "echo.stderr") as view:
        view.expect(b"> ")
        view.type_line(DEMO_LINE)
        view.expect(DEMO_LINE + b"\r\n> ")
        view.type_line(b"exit")
        view.expect(b"echo: bye")
        status = view.finish()
    if status != 0:
        raise guest_failed("echo", status, base / "echo.stderr")
    narrate("echo sent the line back and powered off on `exit`: exit status 0")


def show_linux_scripted(argv: list[str], env: dict[str, str], base: Path) -> None:
    """Drive the Linux ZIC's shell: ``uname -m`` must answer aarch64, ``poweroff`` must end it with 0."""
    from tools.linux_guest import BANNER, PROMPT

    with console_view(argv, env, base / "linux.stderr") as view:
        view.expect(BANNER.encode())
        view.expect(PROMPT.encode())
        view.type_line(b"uname -m")
        view.expect(b"aarch64\r\n")
        view.type_line(b"poweroff")
        view.expect(b"reboot: Power down")
        status = view.finish()
    if status != 0:
        raise guest_failed("Linux", status, base / "linux.stderr")
    narrate("the Linux guest answered and powered off in order: exit status 0")


def show_linux(argv: list[str], env: dict[str, str], base: Path) -> None:
    """The interactive part: the user's terminal is the guest's console when there is one."""
    if not sys.stdin.isatty():
        show_linux_scripted(argv, env, base)
        return
    narrate("you are on the Linux guest's console now; type `poweroff` to end it")
    status = subprocess.run(argv, env=env).returncode
    narrate(f"the Linux guest ended: exit status {status}")


# ---- building the ZICs ---------------------------------------------------------------------------

def build_inmates() -> Path:
    """Build the aarch64 inmates; returns the directory with ``<name>.bin``."""
    from tools.inmates.build import InmateBuildError, ensure_built, missing_tools

    reason = missing_tools()
    if reason:
        raise DemoError(f"cannot build the guests: {reason}; `bash setup.sh demo` installs it")
    narrate("building the aarch64 test guests (tools/inmates: hello, echo, ...)")
    try:
        return ensure_built()
    except InmateBuildError as error:
        raise DemoError(f"building the guests failed: {error}") from None


def assemble_zic(inmate: Path):
    """A bare-metal ZIC: the inmate at 0x70000000, 16 MiB, one CPU."""
    from tools.mkzic import BootDescription, Description, assemble

    known = BootDescription(os_var="baremetal", starting_vaddress="0x70000000", memory=16, vcpus=1)
    return assemble(Description(known=known), {"inmate": inmate})


def assemble_linux_zic():
    """The Linux ZIC of ``tools/linux_guest`` (fetched with apt and cached on first use)."""
    from tools.linux_guest import build, default_cache_dir
    from tools.linux_guest.zic import DEFAULT_MEMORY_MIB, default_dtb
    from tools.mkzic import BootDescription, Description, assemble

    narrate("building the Linux guest: Debian's arm64 kernel + a busybox initramfs (tools/linux_guest)")
    guest = build()
    known = BootDescription(os_var="linux", memory=DEFAULT_MEMORY_MIB, vcpus=1)
    return assemble(Description(known=known), {"inmate": Path(guest.kernel), "initrd": Path(guest.initrd),
                                               "dtb": default_dtb(default_cache_dir())})


def write_image(inmate: Path, out_dir: Path) -> tuple[str, Path]:
    """mkzic's OCI image archive of ``inmate``; returns (full image name, archive)."""
    from tools.mkzic import build_image_archive, parse_image_name, write_archive

    archive = build_image_archive(assemble_zic(inmate), parse_image_name(f"{inmate.stem}:{IMAGE_TAG}"))
    return archive.name.full(), write_archive(out_dir / f"{inmate.stem}.tar", archive)


def write_bundle(inmate: Path, out_dir: Path) -> Path:
    """mkzic's OCI bundle of ``inmate`` (for ``runphi run``)."""
    from tools.mkzic import runtime_spec, write_bundle as mkzic_write_bundle

    zic = assemble_zic(inmate)
    out_dir.mkdir(parents=True, exist_ok=True)
    return mkzic_write_bundle(out_dir / inmate.stem, zic, runtime_spec(zic, hostname=inmate.stem))


# ---- the two ways of running them ----------------------------------------------------------------

def require_qemu() -> None:
    """Fail with the fix when QEMU (the simulator's guest engine) is missing."""
    if shutil.which("qemu-system-aarch64") is None:
        raise DemoError("qemu-system-aarch64 is not installed (Debian: qemu-system-arm); "
                        "`bash setup.sh demo` installs it")


def runphi_binary() -> Path:
    """runphi as installed next to this interpreter (the venv setup.sh made)."""
    candidate = Path(sys.executable).parent / "runphi"
    if not candidate.exists():
        raise DemoError(f"{candidate} is missing: install runphi with `bash setup.sh deps`")
    return candidate


def run_under_containerd(base: Path, inmates: Path, linux: bool = False) -> None:
    """Import both ZIC images into a private containerd and ``ctr run`` them with runphi
    (then the Linux ZIC, with ``-t`` on a terminal)."""
    from tools.testbed.containerd import ZicNode

    images = dict(write_image(inmates / f"{name}.bin", base) for name in ("hello", "echo"))
    narrate("packaged hello and echo as ZIC images with mkzic: " + ", ".join(images))
    node = ZicNode(base / "zic-node", runphi_binary(), mode="shim")
    narrate(f"starting a simulated Jailhouse board (QEMU engine) and a private containerd in {node.base}")
    node.start()
    try:
        for archive in images.values():
            import_image(node, archive)
        narrate("imported both images; containerd runs them with runphi's shim, io.containerd.runphi.v2")
        for short, show in (("hello", show_hello), ("echo", show_echo)):
            image = next(name for name in images if f"/{short}:" in name)
            narrate(f"ctr run --rm {image} demo-{short}   (runtime: io.containerd.runphi.v2)")
            show(node.containerd.ctr_argv("run", "--rm", *node.zic_flags(), image, f"demo-{short}"),
                 node.containerd.env, base)
        if linux:
            run_linux_under_containerd(node, base)
    finally:
        narrate("stopping containerd and the board")
        node.stop()


def import_image(node, archive: Path) -> None:
    """``ctr images import`` of a ZIC image archive into the node's containerd; DemoError on failure."""
    from tools.testbed.containerd import ZIC_IMAGE_PLATFORM

    imported = node.containerd.ctr("images", "import", "--platform", ZIC_IMAGE_PLATFORM, str(archive))
    if imported.returncode != 0:
        raise DemoError(f"ctr images import {archive.name} failed: {imported.stderr.decode().strip()}")


def run_linux_under_containerd(node, base: Path) -> None:
    """Import the Linux ZIC and ``ctr run`` it (``-t`` when the demo has a terminal)."""
    from tools.mkzic import build_image_archive, parse_image_name, write_archive

    archive = build_image_archive(assemble_linux_zic(), parse_image_name(f"linux:{IMAGE_TAG}"))
    path = write_archive(base / "linux.tar", archive)
    import_image(node, path)
    terminal = ["-t"] if sys.stdin.isatty() else []
    image = archive.name.full()
    narrate(f"ctr run --rm {'-t ' if terminal else ''}{image} demo-linux   (runtime: io.containerd.runphi.v2)")
    show_linux(node.containerd.ctr_argv("run", "--rm", *terminal, *node.zic_flags(), image, "demo-linux"),
               node.containerd.env, base)


def runphi_run_argv(base: Path, bundle: Path, container_id: str) -> list[str]:
    """``runphi run`` of ``bundle`` as ``container_id``, with its state under ``base/root``."""
    return [str(runphi_binary()), "--root", str(base / "root"), "run", "--bundle", str(bundle), container_id]


def run_directly(base: Path, inmates: Path, linux: bool = False) -> None:
    """Run both ZICs with ``runphi run`` against a simulated board (no containerd)."""
    from tools.testbed.containerd import SIM_PLATFORM, simulator_env
    from tools.jailhouse_sim.testing import SimBoard

    bundles = {name: write_bundle(inmates / f"{name}.bin", base / "bundles") for name in ("hello", "echo")}
    narrate("packaged hello and echo as ZIC bundles with mkzic in " + str(base / "bundles"))
    narrate(f"starting a simulated Jailhouse board (QEMU engine) in {base / 'sim'}")
    board = SimBoard.start(base / "sim", board=SIM_PLATFORM, engine="qemu")
    env = {**os.environ, **simulator_env(base / "sim", base)}
    try:
        for name, show in (("hello", show_hello), ("echo", show_echo)):
            narrate(f"runphi run --bundle {bundles[name]} demo-{name}")
            show(runphi_run_argv(base, bundles[name], f"demo-{name}"), env, base)
        if linux:
            from tools.mkzic import runtime_spec, write_bundle as mkzic_write_bundle

            zic = assemble_linux_zic()
            bundle = mkzic_write_bundle(base / "bundles" / "linux", zic, runtime_spec(zic, hostname="linux"))
            narrate(f"runphi run --bundle {bundle} demo-linux")
            show_linux(runphi_run_argv(base, bundle, "demo-linux"), env, base)
    finally:
        narrate("stopping the board")
        board.stop()


# ---- main ----------------------------------------------------------------------------------------

@contextmanager
def work_directory(requested: str | None) -> Iterator[Path]:
    """``--workdir`` (created, must be empty; kept) or a fresh temporary one (removed)."""
    if requested is None:
        base = Path(tempfile.mkdtemp(prefix="runphi-demo-", dir="/tmp"))
        try:
            yield base
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return
    base = Path(requested).absolute()
    if len(str(base)) > MAX_WORKDIR_CHARS:
        raise DemoError(f"--workdir {base} is too long for the unix sockets inside it "
                        f"(at most {MAX_WORKDIR_CHARS} characters); choose a shorter path")
    base.mkdir(parents=True, exist_ok=True)
    if any(base.iterdir()):
        raise DemoError(f"--workdir {base} is not empty; give an empty or new directory")
    yield base


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The demo's options (``--workdir``, ``--no-containerd``)."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.demo",
        description="Boot real aarch64 guests as ZICs on runphi's Jailhouse simulator and show their console.")
    parser.add_argument("--workdir", help="put the board, containerd and images here and keep them "
                                          "(default: a temporary directory, removed at the end)")
    parser.add_argument("--no-containerd", action="store_true",
                        help="run the ZICs with `runphi run` even when containerd is available")
    parser.add_argument("--linux", action="store_true",
                        help="then boot a Linux ZIC and give you its shell (Debian's arm64 kernel, "
                             "fetched with apt and cached on first use)")
    return parser.parse_args(argv)


def run_demo(args: argparse.Namespace) -> None:
    """Everything between the first and the last narration line; DemoError on failure."""
    with work_directory(args.workdir) as base:
        require_qemu()
        inmates = build_inmates()
        from tools.testbed.containerd import containerd_missing

        reason = "--no-containerd" if args.no_containerd else containerd_missing()
        if reason is None:
            run_under_containerd(base, inmates, args.linux)
        else:
            narrate(f"not using containerd ({reason}): running the ZICs with `runphi run` directly")
            run_directly(base, inmates, args.linux)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 on success, 1 with one error line otherwise."""
    args = parse_args(argv)
    narrate("runphi boots partitioned containers (ZICs) as Jailhouse cells; here the board is "
            "runphi's Jailhouse simulator and the guests are real aarch64 programs under QEMU")
    from tools.toolerror import ToolError

    try:
        run_demo(args)
    except ToolError as error:  # mkzic's and linux_guest's
        print(f"demo: error: {error.line()}", file=sys.stderr, flush=True)
        return 1
    except DemoError as error:
        print(f"demo: error: {error}", file=sys.stderr, flush=True)
        return 1
    except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError) as error:
        # The simulator and containerd helpers report start-up failures this way; their
        # first line says what failed, the rest is a log tail.
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"demo: error: {first_line}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted; everything it started has been stopped", file=sys.stderr, flush=True)
        return 130
    narrate("done: every guest ran, printed through runphi and exited 0; nothing is left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
