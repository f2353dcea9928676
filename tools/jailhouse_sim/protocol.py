"""Messages between the Python ``jailhouse`` client / ``jailhouse-sim`` and the daemon.

One JSON request per connection (the client half-closes), one JSON reply.
Bytes travel base64-encoded (msgspec's JSON convention for ``bytes``).
The compiled ``bin/jailhouse`` speaks the framed protocol of ``relay.py`` instead.
"""

from __future__ import annotations

import msgspec


class CellId(msgspec.Struct, frozen=True):
    id: int
    name: str = ""


class Image(msgspec.Struct, frozen=True):
    address: int
    data: bytes


class RcpuImage(msgspec.Struct, frozen=True):
    name: str
    rcpu: int


class _Request(msgspec.Struct, frozen=True, tag_field="op"):
    ioctl: str = ""


class Enable(_Request, tag="enable"):
    config: bytes = b""


class Disable(_Request, tag="disable"):
    pass


class CellCreate(_Request, tag="cell_create"):
    config: bytes = b""


class CellLoad(_Request, tag="cell_load"):
    cell: CellId = CellId(-1)
    images: list[Image] = []
    rcpu_images: list[RcpuImage] = []


class CellShutdown(_Request, tag="cell_shutdown"):
    cell: CellId = CellId(-1)
    images: list[Image] = []
    rcpu_images: list[RcpuImage] = []


class CellStart(_Request, tag="cell_start"):
    cell: CellId = CellId(-1)


class CellDestroy(_Request, tag="cell_destroy"):
    cell: CellId = CellId(-1)


class ConsoleRead(_Request, tag="console_read"):
    head: int = 0
    saved_seen: int = 0
    follow: bool = False


class Inject(_Request, tag="inject"):
    """Fault injection: the next ``count`` matching calls (-1: all) wait ``delay_ms``, then fail with ``errno`` (0: succeed)."""

    count: int = 1
    errno: int = 0
    delay_ms: int = 0
    only: str | None = None
    clear: bool = False


class Status(_Request, tag="status"):
    pass


class Stop(_Request, tag="stop"):
    pass


Request = Enable | Disable | CellCreate | CellLoad | CellShutdown | CellStart | CellDestroy | ConsoleRead | Inject | Status | Stop

# Operation names fault injection can target (``only``).
INJECTABLE = {
    "enable": Enable, "disable": Disable, "create": CellCreate, "load": CellLoad,
    "shutdown": CellShutdown, "start": CellStart, "destroy": CellDestroy,
}


class CellInfo(msgspec.Struct, frozen=True):
    id: int
    name: str
    state: str
    cpus: list[int]
    uart: str | None


class StatusInfo(msgspec.Struct, frozen=True):
    pid: int
    board: str
    engine: str
    enabled: bool
    root: str
    jailhouse: str
    sysfs: str
    console: str
    uarts: dict[int, str]
    cells: list[CellInfo]
    kernel_log: str
    daemon_log: str
    tool_runs: int = 0  # commands of the compiled bin/jailhouse being served (a console -f counts)


class Reply(msgspec.Struct, frozen=True, omit_defaults=True):
    errno: int = 0
    message: str = ""
    # console_read
    data: bytes = b""
    head: int = 0
    saved_seen: int = 0
    error: int = 0
    status: StatusInfo | None = None


decode_request = msgspec.json.Decoder(Request).decode
decode_reply = msgspec.json.Decoder(Reply).decode
encode = msgspec.json.Encoder().encode
