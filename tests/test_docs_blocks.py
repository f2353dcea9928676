"""Every shell block of docs/*.md and tools/*/README.md runs and does what its text says.

The convention for these files (the top README's blocks: tests/test_e2e_readme.py):

* a ```sh block holds commands a reader can paste as they are — no ``<placeholders>``
  (variables such as ``root=$(mktemp -d)`` instead) — and a test here runs it;
* a ```sh block that cannot run on a test machine (a real board, a Kubernetes
  cluster, Docker, a binary this repository does not ship) has the line
  ``<!-- not run: REASON -->`` directly above its opening fence;
* what is not a command (a synopsis, output, a config file) gets another info string
  (```text, ```toml, ...); nothing is an indented code block.

A shell block that is neither registered here with ``@runs`` nor marked fails
``test_every_shell_block_is_run_or_marked``.

The only edits, as in tests/test_e2e_readme.py, keep a run private: ``mktemp`` honours
a private ``TMPDIR``; blocks that write into their working directory run in a temporary
one whose ``tools`` and ``.venv`` link to the checkout; ``ctr`` talks to the test's
private containerd, runphi's installed path and ``/run/runphi`` become the test's, and
``image import`` gains ``--platform linux/arm64`` on a host that is not arm64; the
benchmarks' scratch goes to a private ``RUNPHI_BENCH_TMPDIR``. Blocks that need a
terminal run on a pty and are typed into.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from tests.docblocks import (REPO_ROOT, clean_env, ctr_prelude, import_platform, indented_code_lines,
                             private_paths, sh_block, shell_blocks)
from tests.fdread import read_until
from tests.test_e2e_readme import HELLO_CONSOLE
from tools.testbed.containerd import NAMESPACE, short_tempdir

DOCS = (*sorted(REPO_ROOT.glob("tools/*/README.md")), *sorted((REPO_ROOT / "docs").glob("*.md")))
#: Fewer run blocks than this means the extraction broke, not that the docs shrank.
MIN_RUN_BLOCKS = 12
PLACEHOLDER = re.compile(r"<[A-Za-z][\w.-]*>")
LINUX_BOOT_TIMEOUT = 180.0

#: Every shell block a test here runs: (file, heading, index) → the test's name.
RUN: dict[tuple[str, str, int], str] = {}


def runs(*keys: tuple[str, str, int]):
    """Register the decorated test as the one that runs these doc blocks."""
    def register(test):
        for key in keys:
            assert key not in RUN, f"{key} is run by {RUN[key]} already"
            RUN[key] = test.__name__
        return test
    return register


def block(key: tuple[str, str, int]) -> str:
    """The text of the doc block ``key`` names."""
    path, heading, index = key
    return sh_block(REPO_ROOT / path, heading, index)


def shell_env(**extra: str) -> dict[str, str]:
    """A reader's environment: the venv's tools first on PATH, no runphi variables."""
    venv_bin = Path(sys.executable).parent
    return clean_env(PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}", **extra)


def run_block(text: str, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``text`` run by bash as a script that stops at the first failing command."""
    return subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@contextmanager
def private_tmpdir(prefix: str) -> Iterator[Path]:
    """A short private directory for ``TMPDIR``; removed afterwards, with every simulator
    a block brought up under it (after a failure half-way) brought down first."""
    path = short_tempdir(prefix)
    try:
        yield path
    finally:
        for pid_file in path.glob("**/run/jailhouse-sim.pid"):
            subprocess.run([str(Path(sys.executable).parent / "jailhouse-sim"), "down", "--root",
                            str(pid_file.parent.parent)], capture_output=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        shutil.rmtree(path, ignore_errors=True)


def checkout_dir(path: Path) -> Path:
    """``path`` made to look like a checkout (``tools``, ``.venv``) for blocks that write where they run."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tools", ".venv"):
        (path / name).symlink_to(REPO_ROOT / name)
    return path


class Terminal:
    """A block run by bash on a pty, read and typed into as a person at a terminal would."""

    def __init__(self, text: str, cwd: Path, env: dict[str, str]) -> None:
        master, slave = os.openpty()
        try:
            self.process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", text], cwd=cwd, env=env,
                                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.master = master
        self.seen = bytearray()

    @property
    def text(self) -> str:
        """Everything the terminal showed so far."""
        return self.seen.decode(errors="replace")

    def expect(self, text: str, after: int = 0, timeout: float = 60.0) -> int:
        """Wait for ``text`` at or after offset ``after``; the offset just past it."""
        needle = text.encode()
        read_until(self.master, needle, self.seen, start=after, timeout=timeout)
        return self.seen.index(needle, after) + len(needle)

    def type(self, line: str) -> int:
        """Type ``line`` and Enter; the offset of the output that follows."""
        mark = len(self.seen)
        os.write(self.master, line.encode() + b"\r")
        return mark

    def wait(self, timeout: float) -> int:
        """The block's exit status, reading its output meanwhile; AssertionError past ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout:g} s; tail:\n{self.text[-3000:]}")
            self._drain(0.2)
        self._drain(0.2)
        return self.process.returncode

    def _drain(self, quiet: float) -> None:
        while select.select([self.master], [], [], quiet)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: nothing holds the pty any more
                return
            if not chunk:
                return
            self.seen += chunk

    def close(self) -> None:
        """Kill what is still running of the block (its process group), then the pty."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        os.close(self.master)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A private temporary directory for one test, removed after it."""
    with private_tmpdir("rphi-docs-") as path:
        yield path


@pytest.fixture(scope="module")
def linux_guest():
    """The project's Linux guest from the shared cache (built once; skips only without QEMU/apt)."""
    from tools.linux_guest.testing import guest_or_skip

    return guest_or_skip()


# ---- the convention ------------------------------------------------------------------------


def all_blocks():
    """Every shell block of DOCS."""
    return [found for doc in DOCS for found in shell_blocks(doc)]


def test_every_shell_block_is_run_or_marked():
    blocks = all_blocks()
    unmarked = {found.key for found in blocks if found.not_run is None}
    assert sorted(unmarked - RUN.keys()) == [], \
        "shell blocks no test runs: run them here (@runs) or mark them <!-- not run: REASON -->"
    assert sorted(RUN.keys() - unmarked) == [], "registered blocks that are gone or marked not run"
    assert [found.key for found in blocks if found.not_run == ""] == [], "a not-run marker without a reason"
    assert len(RUN) >= MIN_RUN_BLOCKS


def test_every_not_run_marker_stands_right_above_a_shell_block():
    for doc in DOCS:
        markers = [line for line in doc.read_text().splitlines() if line.strip().startswith("<!-- not run")]
        assert len(markers) == sum(found.not_run is not None for found in shell_blocks(doc)), doc


def test_shell_blocks_have_no_placeholders_and_no_command_hides_in_an_indented_block():
    assert [(found.key, PLACEHOLDER.findall(found.text)) for found in all_blocks()
            if PLACEHOLDER.search(found.text)] == []
    assert {doc.relative_to(REPO_ROOT).as_posix(): indented_code_lines(doc) for doc in DOCS
            if indented_code_lines(doc)} == {}


# ---- tools/jailhouse_sim/README.md ---------------------------------------------------------

SIM_EXAMPLE = ("tools/jailhouse_sim/README.md", "Usage", 0)


@runs(SIM_EXAMPLE)
def test_simulator_example_brings_a_board_up_shows_it_and_stops_it():
    with private_tmpdir("rphi-docsim-") as tmp:
        done = run_block(block(SIM_EXAMPLE), REPO_ROOT, shell_env(TMPDIR=str(tmp)), timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        [board] = tmp.glob("tmp.*/board")
        out = done.stdout
        assert re.search(r"^jailhouse-sim: board sim-qemu-arm64 up \(engine script, pid \d+, hypervisor enabled\)$",
                         out, re.M)
        assert f"uart 1     {board}/dev/ttyAMA1\n" in out
        assert "Jailhouse management tool v0.12 (jailhouse-sim)\n" in out
        assert re.search(r"^0\s+sim-qemu-arm64\s+running\s+0-7\s*$", out, re.M)
        status = json.loads(out[out.index("{\n"):out.index("\n}\n") + 2])
        assert (status["engine"], [cell["name"] for cell in status["cells"]]) == ("script", ["sim-qemu-arm64"])
        assert out.endswith(f"jailhouse-sim: stopped in {board}\n")
        assert not (board / "run" / "jailhouse-sim.pid").exists()


# ---- tools/inmates/README.md ---------------------------------------------------------------

INMATES_BUILD = ("tools/inmates/README.md", "Building", 0)
INMATES_QEMU = ("tools/inmates/README.md", "Running one by hand", 0)
INMATES_SIM = ("tools/inmates/README.md", "Running one by hand", 1)
INMATES_BENCH = ("tools/inmates/README.md", "How fast a cell starts", 0)


@pytest.fixture(scope="module")
def inmates_build() -> Iterator[tuple[subprocess.CompletedProcess, Path]]:
    """The Building block run once in a private copy of the sources, and that copy's out/.

    A copy, because other tests use the checkout's out/ while this one rebuilds it.
    """
    from tools.inmates.build import missing_tools

    if reason := missing_tools():
        pytest.skip(f"QEMU inmates: {reason}")
    with private_tmpdir("rphi-docs-") as copy:
        (copy / "tools").mkdir()
        shutil.copy(REPO_ROOT / "tools/__init__.py", copy / "tools")
        shutil.copytree(REPO_ROOT / "tools/inmates", copy / "tools/inmates", ignore=shutil.ignore_patterns("out"))
        yield run_block(block(INMATES_BUILD), copy, shell_env(), timeout=600), copy / "tools/inmates/out"


@pytest.mark.qemu
@runs(INMATES_BUILD)
def test_inmates_build_block_builds_every_program_and_prints_the_output_directory(inmates_build):
    from tools.inmates.build import PROGRAMS

    done, out = inmates_build
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == str(out)
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(f"{p}.bin" for p in PROGRAMS)
    assert sorted(p.name for p in out.glob("*.elf")) == sorted(f"{p}.elf" for p in PROGRAMS)


@pytest.mark.qemu
def test_inmates_build_block_rebuilds_for_another_flood_size_and_back(inmates_build):
    done, out = inmates_build
    assert done.returncode == 0, done.stdout + done.stderr
    assert "-DFLOOD_BYTES=1048576" in done.stdout  # the second make rebuilt with the other size
    # ... and the last line is "the same" as the first: built again with the default size.
    assert [p.name for p in out.glob(".config-*")] == [".config-0x70000000-0x09000000-0x08000000-0x080a0000-65536"]


@pytest.mark.qemu
@runs(INMATES_QEMU)
def test_plain_qemu_block_prints_hello_and_powers_off(built_inmates):
    done = run_block(block(INMATES_QEMU), REPO_ROOT, shell_env(), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert HELLO_CONSOLE in done.stdout.replace("\r\n", "\n")


@pytest.mark.qemu
@runs(INMATES_SIM)
def test_simulator_block_starts_echo_in_a_cell_reads_its_uart_and_shuts_it_down(built_inmates):
    with private_tmpdir("rphi-docinm-") as tmp:
        done = run_block(block(INMATES_SIM), REPO_ROOT, shell_env(TMPDIR=str(tmp)), timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        [board] = tmp.glob("tmp.*/board")
        assert ("Hello from runphi inmate echo\necho: type a line, 'exit' powers off\n"
                "running\nshut down\n"
                f"jailhouse-sim: stopped in {board}\n") in done.stdout.replace("\r\n", "\n")
        assert not (board / "run" / "jailhouse-sim.pid").exists()


@pytest.mark.qemu
@runs(INMATES_BENCH)
def test_first_byte_block_times_hello_ten_times_under_the_engine_and_bare_qemu(built_inmates):
    done = run_block(block(INMATES_BENCH), REPO_ROOT, shell_env(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for series in ("engine: launch -> first UART byte", "engine: launch -> shut down",
                   "bare QEMU: launch -> first byte"):
        assert re.search(rf"^\s+{re.escape(series)}\s+10\s", done.stdout, re.M), done.stdout
    assert re.search(r"engine / bare QEMU \(first byte\): \d+\.\d\dx", done.stdout)


# ---- docs/BENCHMARKS.md --------------------------------------------------------------------

BENCH_SMOKE = ("docs/BENCHMARKS.md", "Running", 1)


@runs(BENCH_SMOKE)
def test_bench_smoke_block_prints_a_table_per_suite_and_exits_0_only_when_all_held():
    from tools.bench.__main__ import SUITES

    with private_tmpdir("rphi-docbench-") as tmp:
        done = run_block(block(BENCH_SMOKE), REPO_ROOT, shell_env(RUNPHI_BENCH_TMPDIR=str(tmp)), timeout=1200)
    headers = re.findall(r"^== (\w+) \(", done.stdout, re.M)
    assert headers == list(SUITES), done.stdout + done.stderr
    verdict = done.stdout.strip().splitlines()[-1]
    assert re.match(r"\d+/\d+ budgets met", verdict), verdict
    # Timings here are not the test's business; that the exit status matches the verdict is.
    assert done.returncode == (1 if "FAILED:" in verdict else 0), verdict


# ---- docs/images.md ------------------------------------------------------------------------

IMAGES_MKZIC = ("docs/images.md", "With mkzic", 0)
IMAGES_CTR = ("docs/images.md", "With mkzic", 1)
IMAGE_LINE = r"^image docker\.io/library/hello:latest sha256:[0-9a-f]{64} %s$"


def archive_boot_config(archive: Path) -> dict:
    """``/boot/config.json`` as stored in the layer of an OCI image archive."""
    with tarfile.open(archive) as layout:
        def blob(digest: str) -> bytes:
            return layout.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}").read()

        index = json.loads(layout.extractfile("index.json").read())
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        layer = blob(manifest["layers"][0]["digest"])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as files:
        return json.loads(files.extractfile("boot/config.json").read())


@pytest.mark.qemu
@runs(IMAGES_MKZIC)
def test_mkzic_block_writes_a_bundle_and_an_archive(built_inmates, scratch):
    cwd = checkout_dir(scratch / "checkout")
    done = run_block(block(IMAGES_MKZIC), cwd, shell_env(), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    [bundle_line, image_line] = done.stdout.splitlines()
    assert bundle_line == f"bundle {cwd / 'out/hello'}"
    assert re.match(IMAGE_LINE % re.escape(str(cwd / "out/hello.tar")), image_line), image_line
    description = {"os_var": "baremetal", "inmate": "/boot/hello.bin", "starting_vaddress": "0x70000000",
                   "memory": 16, "vcpus": 1}
    boot = cwd / "out/hello/rootfs/boot"
    assert json.loads((boot / "config.json").read_text()) == description
    assert (boot / "hello.bin").read_bytes() == (built_inmates / "hello.bin").read_bytes()
    assert json.loads((cwd / "out/hello/config.json").read_text())["process"]["args"] == ["/boot/hello.bin"]
    assert archive_boot_config(cwd / "out/hello.tar") == description


@pytest.mark.containerd
@pytest.mark.qemu
@runs(IMAGES_CTR)
def test_import_and_run_block_prints_hellos_console_and_exits_0(zic_node, zic_events, built_inmates, scratch):
    ctd = zic_node.containerd
    cwd = checkout_dir(scratch / "checkout")
    text = (block(IMAGES_MKZIC) + ctr_prelude(ctd)
            + private_paths(import_platform(block(IMAGES_CTR)), ctd, zic_node.runphi))
    try:
        done = run_block(text, cwd, shell_env(), timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        ctd.ctr("images", "rm", "--sync", "docker.io/library/hello:latest")
    assert done.stdout.replace("\r\n", "\n").endswith(HELLO_CONSOLE)
    assert zic_events.exit_status("hello1") == 0
    assert "hello1" not in zic_node.cells() and zic_node.ledger() == {}


# ---- docs/kubernetes.md --------------------------------------------------------------------

K8S_SECTION = "5. Build a ZIC image and put it on the board"
K8S_MKZIC = ("docs/kubernetes.md", K8S_SECTION, 0)
K8S_IMPORT = ("docs/kubernetes.md", K8S_SECTION, 1)


@pytest.mark.qemu
@runs(K8S_MKZIC)
def test_kubernetes_mkzic_block_leaves_cpus_and_memory_to_the_pod(built_inmates, scratch):
    cwd = checkout_dir(scratch / "checkout")
    done = run_block(block(K8S_MKZIC), cwd, shell_env(), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.match(IMAGE_LINE % re.escape(str(cwd / "hello.tar")), done.stdout.strip()), done.stdout
    assert archive_boot_config(cwd / "hello.tar") == {"os_var": "baremetal", "inmate": "/boot/hello.bin",
                                                      "starting_vaddress": "0x70000000"}


@pytest.mark.containerd
@pytest.mark.qemu
@runs(K8S_IMPORT)
def test_kubernetes_import_block_puts_the_image_in_the_k8s_io_namespace(zic_node, built_inmates, scratch):
    ctd = zic_node.containerd
    cwd = checkout_dir(scratch / "checkout")
    text = block(K8S_MKZIC) + ctr_prelude(ctd) + import_platform(block(K8S_IMPORT))
    k8s_ctr = ["ctr", "--address", str(ctd.address), "--namespace", "k8s.io"]
    try:
        done = run_block(text, cwd, shell_env(), timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        listed = subprocess.run([*k8s_ctr, "images", "ls", "--quiet"], capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL)
    finally:
        subprocess.run([*k8s_ctr, "images", "rm", "--sync", "docker.io/library/hello:latest"],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert listed.stdout.split() == ["docker.io/library/hello:latest"]
    mine = ctd.ctr("images", "ls", "--quiet")
    assert b"docker.io/library/hello:latest" not in mine.stdout  # k8s.io, not the default namespace


# ---- docs/linux-zic.md ---------------------------------------------------------------------

LINUX_IMAGE = ("docs/linux-zic.md", "Building the image", 0)
LINUX_SECTION = "The project's Linux guest (Debian kernel + busybox)"
LINUX_GUEST = ("docs/linux-zic.md", LINUX_SECTION, 0)
LINUX_ON_SIM = ("docs/linux-zic.md", LINUX_SECTION, 1)


def shell_session(term: Terminal) -> None:
    """Wait for the guest's shell, check it answers, and power the guest off from it."""
    from tools.linux_guest import BANNER, PROMPT

    term.expect(PROMPT, term.expect(BANNER, timeout=LINUX_BOOT_TIMEOUT), timeout=60)
    mark = term.type("uname -m")
    # "\r": a terminal may add its own CR before the guest's CR LF.
    term.expect(PROMPT, term.expect("\naarch64\r", mark, timeout=30), timeout=30)
    term.type("poweroff")


@pytest.mark.containerd
@pytest.mark.qemu
@runs(LINUX_IMAGE)
def test_linux_image_block_builds_imports_and_ctr_run_t_gives_the_guests_shell(zic_node, zic_events,
                                                                                linux_guest, scratch):
    from tools.linux_guest import SHUTDOWN_MESSAGE, default_cache_dir
    from tools.linux_guest.zic import default_dtb

    cwd = checkout_dir(scratch / "checkout")
    # The reader's own kernel, initramfs and device tree: those of the project's guest.
    (cwd / "Image").symlink_to(linux_guest.kernel)
    (cwd / "rootfs.cpio.gz").symlink_to(linux_guest.initrd)
    (cwd / "guest.dtb").symlink_to(default_dtb(default_cache_dir()))
    ctd = zic_node.containerd
    term = Terminal(ctr_prelude(ctd) + private_paths(import_platform(block(LINUX_IMAGE)), ctd, zic_node.runphi),
                    cwd, shell_env())
    try:
        shell_session(term)
        assert term.wait(timeout=120) == 0, term.text[-3000:]
    finally:
        term.close()
        ctd.ctr("containers", "rm", "lin1")
        ctd.ctr("images", "rm", "--sync", "docker.io/library/my-linux:1.0")
    assert SHUTDOWN_MESSAGE in term.text
    assert zic_events.exit_status("lin1") == 0
    assert "lin1" not in zic_node.cells() and zic_node.ledger() == {}
    assert b"lin1" not in ctd.ctr("containers", "ls", "--quiet").stdout  # --rm removed it


@pytest.mark.qemu
@runs(LINUX_GUEST)
def test_linux_guest_block_builds_boots_and_packages_the_cached_guest(linux_guest, scratch):
    cwd = checkout_dir(scratch / "checkout")
    term = Terminal(block(LINUX_GUEST), cwd, shell_env())
    try:
        term.expect(f"kernel {linux_guest.kernel}\r\ninitrd {linux_guest.initrd}\r\n", timeout=120)
        shell_session(term)
        assert term.wait(timeout=600) == 0, term.text[-3000:]
    finally:
        term.close()
    text = term.text.replace("\r\n", "\n")
    archive = cwd / "linux.tar"
    assert re.search(rf"^image docker\.io/library/linux-guest:latest sha256:[0-9a-f]{{64}} {re.escape(str(archive))}$",
                     text, re.M), text[-2000:]
    assert f"\nbundle {cwd / 'linux'}\n" in text
    assert archive_boot_config(archive)["os_var"] == "linux"
    config = json.loads((cwd / "linux/config.json").read_text())
    assert config["annotations"]["org.runphi.runtime"] == "runphi"


@pytest.mark.qemu
@runs(LINUX_ON_SIM)
def test_linux_on_the_simulator_block_gives_a_shell_and_poweroff_exits_0(linux_guest):
    from tools.linux_guest import SHUTDOWN_MESSAGE

    with private_tmpdir("rphi-doclin-") as tmp:
        term = Terminal(block(LINUX_ON_SIM), REPO_ROOT, shell_env(TMPDIR=str(tmp)))
        try:
            shell_session(term)
            assert term.wait(timeout=180) == 0, term.text[-3000:]
        finally:
            term.close()
        [sim] = tmp.glob("rphi-*/sim")
        assert not (sim / "run" / "jailhouse-sim.pid").exists()
    text = term.text.replace("\r\n", "\n")
    assert SHUTDOWN_MESSAGE in text and f"jailhouse-sim: stopped in {sim}\n" in text


# ---- docs/shim-events.md -------------------------------------------------------------------

SHIM_EVENTS_SUBSCRIBER = ("docs/shim-events.md", "An example subscriber", 0)


class _Lines:
    """Lines of a trio receive stream (None at its end)."""

    def __init__(self, stream) -> None:
        self.stream, self.buffer = stream, b""

    async def next(self) -> str | None:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some()
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


async def _until_subscribed(publisher, lines: _Lines, errors: Path) -> None:
    """Publish probe failures until the subscriber prints one: from then on it sees every event."""
    from runphi.shim.events import CELL_FAILED
    from runphi.shim.proto.runphi_events_pb2 import CellFailed

    for attempt in range(1, 1000):
        publisher.publish(CELL_FAILED, CellFailed(container_id=f"probe-{attempt}", state="failed"))
        with trio.move_on_after(0.5):
            line = await lines.next()
            assert line is not None, f"the block ended: {errors.read_text()}"
            assert json.loads(line)["container_id"].startswith("probe-"), line
            return


@runs(SHIM_EVENTS_SUBSCRIBER)
async def test_subscriber_block_prints_the_cell_failed_runphis_publisher_sent(containerd, scratch, nursery):
    """The block, run as written against a private containerd, decodes what the shim's publisher sends."""
    from google.protobuf import timestamp_pb2

    from runphi.shim.events import CELL_FAILED, Publisher
    from runphi.shim.proto.runphi_events_pb2 import CellFailed

    warnings: list[str] = []
    publisher = Publisher(str(containerd.base / "ttrpc.sock"), NAMESPACE, warnings.append)
    await nursery.start(publisher.run)
    errors = scratch / "stderr"
    env = shell_env(TMPDIR=str(scratch), CONTAINERD_ADDRESS=str(containerd.address))
    with open(errors, "wb") as stderr:
        process = await trio.lowlevel.open_process(
            ["bash", "-euo", "pipefail", "-c", block(SHIM_EVENTS_SUBSCRIBER)], cwd=REPO_ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
    try:
        lines = _Lines(process.stdout)
        failed_at = timestamp_pb2.Timestamp(seconds=1_796_000_000, nanos=123_456_789)
        with trio.fail_after(60):
            await _until_subscribed(publisher, lines, errors)
            publisher.publish(CELL_FAILED, CellFailed(container_id="zic-1", cell="runphi-zic-1", failed_cpus=[3],
                                                      state="Comm ABI mismatch", failed_at=failed_at, cpus=[2, 3]))
            while (line := await lines.next()) is not None and '"zic-1"' not in line:
                pass
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
    assert line is not None, errors.read_text()
    assert json.loads(line) == {"namespace": NAMESPACE, "container_id": "zic-1", "cell": "runphi-zic-1",
                                "failed_cpus": [3], "state": "Comm ABI mismatch",
                                "failed_at": "2026-11-30T00:53:20.123456789Z", "cpus": [2, 3]}
    assert warnings == []
