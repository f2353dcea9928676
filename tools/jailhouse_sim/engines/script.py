"""The script engine: declarative test guests, and opaque images as idle guests.

A script guest is an image whose first line is ``#!jailhouse-sim-inmate``;
every following line is one instruction (see the README for the language).
Any other image is an *opaque* guest under this engine: it prints one banner
line with its size and sha256 prefix and then idles until it is stopped.
"""

from __future__ import annotations

import hashlib
import itertools
import math

import msgspec
import trio

from ..engine import GuestHost, GuestSpec, LinuxBoot, LoadedImage

MAGIC = b"#!jailhouse-sim-inmate"
DEFAULT_FLOOD_PATTERN = b"0123456789abcdef"
DEFAULT_FAULT_ADDRESS = 0xDEAD0000
_FLOOD_CHUNK = 4096
_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "0": b"\0", "\\": b"\\", '"': b'"', "'": b"'", "e": b"\x1b"}


class Print(msgspec.Struct, tag="print", frozen=True):
    text: bytes


class Console(msgspec.Struct, tag="console", frozen=True):
    text: bytes


class Tick(msgspec.Struct, tag="tick", frozen=True):
    period_ms: int
    text: bytes


class Sleep(msgspec.Struct, tag="sleep", frozen=True):
    ms: int


class Echo(msgspec.Struct, tag="echo", frozen=True):
    until: bytes | None


class Flood(msgspec.Struct, tag="flood", frozen=True):
    count: int
    pattern: bytes


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    pass


class Fault(msgspec.Struct, tag="fault", frozen=True):
    address: int


class SetState(msgspec.Struct, tag="state", frozen=True):
    state: str


class Halt(msgspec.Struct, tag="halt", frozen=True):
    pass


Instruction = Print | Console | Tick | Sleep | Echo | Flood | Shutdown | Fault | SetState | Halt


class ScriptError(Exception):
    """A script line that does not parse: ``line`` is 1-based in the image."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


def is_script(data: bytes) -> bool:
    """True if an image is a script guest."""
    return data.startswith(MAGIC) and data[len(MAGIC) : len(MAGIC) + 1] in (b"\n", b"\r", b"\0", b"")


def unescape(text: str) -> bytes:
    """C-style escapes (``\\n``, ``\\xff``, ``\\0``...); ``\\n`` goes out as ``\\r\\n`` like the inmate library."""
    out = bytearray()
    i = 0
    raw = text.encode("utf-8", "surrogateescape")
    while i < len(raw):
        ch = raw[i : i + 1]
        if ch != b"\\" or i + 1 == len(raw):
            out += ch
            i += 1
            continue
        code = chr(raw[i + 1])
        if code == "x":
            digits = raw[i + 2 : i + 4]
            if len(digits) != 2 or not all(chr(d) in "0123456789abcdefABCDEF" for d in digits):
                raise ValueError(f"bad escape \\x{digits.decode(errors='replace')}")
            out.append(int(digits, 16))
            i += 4
        elif code in _ESCAPES:
            out += _ESCAPES[code]
            i += 2
        else:
            raise ValueError(f"unknown escape \\{code}")
    return bytes(out).replace(b"\n", b"\r\n")


def _int(text: str, what: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {text!r}") from None
    if value < 0:
        raise ValueError(f"{what} must not be negative")
    return value


def _parse_line(words: list[str], rest: str) -> Instruction:
    op = words[0]
    if op == "print":
        return Print(unescape(rest))
    if op == "console":
        return Console(unescape(rest))
    if op == "tick":
        if len(words) < 3:
            raise ValueError("usage: tick MS TEXT")
        return Tick(_int(words[1], "MS") or 1, unescape(rest.split(None, 1)[1]))
    if op == "sleep" and len(words) == 2:
        return Sleep(_int(words[1], "MS"))
    if op == "echo" and len(words) in (1, 3) and (len(words) == 1 or words[1] == "until"):
        return Echo(unescape(words[2]) if len(words) == 3 else None)
    if op == "flood" and len(words) >= 2:
        pattern = unescape(rest.split(None, 1)[1]) if len(words) > 2 else DEFAULT_FLOOD_PATTERN
        if not pattern:
            raise ValueError("flood pattern must not be empty")
        return Flood(_int(words[1], "BYTES"), pattern)
    if op == "fault" and len(words) <= 2:
        return Fault(_int(words[1], "ADDR") if len(words) == 2 else DEFAULT_FAULT_ADDRESS)
    simple = {"shutdown": Shutdown(), "halt": Halt(), "lock": SetState("running/locked"),
              "unlock": SetState("running"), "comm-abi-mismatch": SetState("Comm ABI mismatch")}
    if op in simple and len(words) == 1:
        return simple[op]
    raise ValueError(f"unknown or malformed instruction {op!r}")


def parse_script(data: bytes) -> list[Instruction]:
    """Parse a script image (trailing NULs from ``cell load -s`` are ignored)."""
    text = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
    program: list[Instruction] = []
    for number, line in enumerate(text.splitlines()[1:], start=2):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        words = stripped.split()
        rest = line.lstrip().split(None, 1)[1] if len(words) > 1 else ""
        try:
            program.append(_parse_line(words, rest))
        except ValueError as e:
            raise ScriptError(number, str(e)) from None
    return program


def guest_image(spec: GuestSpec) -> LoadedImage | None:
    """The image the cell boots: the latest load covering the reset address (later loads
    overwrite earlier ones, like memory), else the latest script image, else the latest image."""
    at_reset = [i for i in spec.images if i.address <= spec.reset_address < i.address + len(i.data)]
    scripts = [image for image in spec.images if is_script(image.data)]
    return (at_reset or scripts or list(spec.images) or [None])[-1]


class ScriptGuest:
    """One running script guest (state kept between instructions)."""

    def __init__(self, spec: GuestSpec, host: GuestHost) -> None:
        self.spec = spec
        self.host = host
        self.boot_cpu = spec.cpus[0] if spec.cpus else 0

    async def write(self, data: bytes) -> None:
        self.host.count_vmexits(self.boot_cpu, "mmio")
        await self.host.uart_write(data)

    async def run(self, program: list[Instruction]) -> bool:
        """Run the program; True when the guest ended itself (shutdown/fault)."""
        for cpu in self.spec.cpus[1:]:
            self.host.count_vmexits(self.boot_cpu, "psci")  # CPU_ON for each secondary
        for step in program:
            if await self.execute(step):
                return True
        return False

    async def execute(self, step: Instruction) -> bool:
        match step:
            case Print(text):
                await self.write(text)
            case Console(text):
                # One DEBUG_CONSOLE_PUTC hypercall per byte; the host writes nothing for a cell
                # without the virtual-console flags (the hypercall fails with EPERM).
                self.host.count_vmexits(self.boot_cpu, "hypercall", len(text))
                self.host.hv_write(text)
            case Tick(period, text):
                await self.tick(period, text)
            case Sleep(ms):
                await trio.sleep(ms / 1000)
                self.host.count_vmexits(self.boot_cpu, "virt_irq")
            case Echo(until):
                await self.echo(until)
            case Flood(count, pattern):
                await self.flood(count, pattern)
            case Shutdown():
                self.host.count_vmexits(self.boot_cpu, "psci")
                self.host.set_state("shut down")
                return True
            case Fault(address):
                for cpu in self.spec.cpus:
                    reason = f"Unhandled data write at 0x{address:x}(4)" if cpu == self.boot_cpu else ""
                    self.host.park_cpu(cpu, reason)
                return True
            case SetState(state):
                self.host.set_state(state)
            case Halt():
                await trio.sleep_forever()
        return False

    async def tick(self, period_ms: int, text: bytes) -> None:
        deadline = trio.current_time()
        for n in itertools.count(1):
            deadline += period_ms / 1000
            await self.write(text + f" {n}".encode() + b"\r\n")
            await trio.sleep_until(deadline)
            self.host.count_vmexits(self.boot_cpu, "virt_irq")

    async def echo(self, until: bytes | None) -> None:
        line = bytearray()
        while True:
            data = await self.host.uart_read()
            self.host.count_vmexits(self.boot_cpu, "virt_irq")
            await self.write(data)
            if until is None:
                continue
            for byte in data:
                if byte in b"\r\n":
                    if bytes(line) == until:
                        return
                    line.clear()
                else:
                    line.append(byte)

    async def flood(self, count: int, pattern: bytes) -> None:
        block = pattern * math.ceil(_FLOOD_CHUNK / len(pattern))
        sent = 0
        while sent < count:
            # Keep the pattern phase continuous across chunks.
            offset = sent % len(pattern)
            chunk = (block + pattern)[offset : offset + min(_FLOOD_CHUNK, count - sent)]
            await self.write(chunk)
            sent += len(chunk)


class ScriptEngine:
    """Runs script guests; any other image runs as an opaque idle guest."""

    name = "script"

    async def run(self, spec: GuestSpec, host: GuestHost) -> None:
        if spec.linux is not None:
            await self.run_linux(spec.linux, host)
            return
        image = guest_image(spec)
        if image is not None and is_script(image.data):
            await self.run_script(image, spec, host)
        else:
            await self.run_opaque(image, host)

    async def run_script(self, image: LoadedImage, spec: GuestSpec, host: GuestHost) -> None:
        guest = ScriptGuest(spec, host)
        try:
            program = parse_script(image.data)
        except ScriptError as e:
            # A malformed script behaves like a guest that traps on its first instruction.
            for cpu in spec.cpus:
                host.park_cpu(cpu, f"jailhouse-sim: script error, {e}" if cpu == guest.boot_cpu else "")
            return
        if not await guest.run(program):
            await trio.sleep_forever()  # returning from main: the cell still reads `running`

    async def run_opaque(self, image: LoadedImage | None, host: GuestHost) -> None:
        if image is not None:
            digest = hashlib.sha256(image.data).hexdigest()[:12]
            banner = f"[jailhouse-sim] opaque guest at 0x{image.address:x}: {len(image.data)} bytes, sha256 {digest}\r\n"
            await host.uart_write(banner.encode())
        await trio.sleep_forever()

    async def run_linux(self, linux: LinuxBoot, host: GuestHost) -> None:
        """A `cell linux` boot without a CPU to run it: one banner line naming what would boot, then idle."""
        digest = hashlib.sha256(linux.kernel).hexdigest()[:12]
        initrd = f"initrd {len(linux.initrd)} bytes" if linux.initrd is not None else "no initrd"
        banner = (f"[jailhouse-sim] linux guest: kernel {len(linux.kernel)} bytes, sha256 {digest}; "
                  f'{initrd}; cmdline "{linux.cmdline}"\r\n')
        await host.uart_write(banner.encode())
        await trio.sleep_forever()
