"""``runphi metrics [--format prometheus|openmetrics] [--listen ADDR:PORT]``: the node's ZICs
in the Prometheus/OpenMetrics text formats.

Without ``--listen``: one snapshot printed and exit — in the classic Prometheus text format
by default, which node-exporter's textfile collector reads, or with ``--format
openmetrics``. With it: an exporter serving ``/metrics``
on ``ADDR:PORT`` (``127.0.0.1`` when only ``:PORT`` is given) until SIGTERM/SIGINT,
taking a fresh snapshot for every scrape. Built on the official ``prometheus_client``
(its text format, its HTTP server). The families are listed in docs/monitoring.md;
:data:`FAMILIES` is their one definition here.

ZICs are looked for under the global ``--root`` and the node's ``state_dir`` (see
:mod:`runphi.core.observe`).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator

from runphi.core.observe import NodeSnapshot, ZicSample, take_snapshot
from runphi.errors import UsageError

DEFAULT_LISTEN_ADDRESS = "127.0.0.1"
ZIC_LABELS = ("container_id", "namespace", "cell", "pod", "pod_namespace")
OCI_STATES = ("created", "running", "stopped")

#: name → (kind, help, extra labels after ZIC_LABELS, or the node-level labels)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "runphi_zic_info": ("gauge", "A ZIC known to runphi (always 1), with its backend.", ("backend",)),
    "runphi_zic_state": ("gauge", "1 for the ZIC's OCI state, 0 for the others.", ("state",)),
    "runphi_zic_cell_state": ("gauge", "1 for the state its hypervisor reports for the cell.", ("state",)),
    "runphi_zic_uptime_seconds": ("gauge", "Seconds since the ZIC was created (0 once stopped).", ()),
    "runphi_zic_last_exit_status": ("gauge", "Exit status of the ZIC's last run (absent while running).", ()),
    "runphi_zic_vmexits": ("counter", "VM exits of the cell into the hypervisor, all reasons.", ()),
    "runphi_zic_vmexits_by_reason": ("counter", "VM exits of the cell by reason (Jailhouse's names).",
                                     ("reason",)),
    "runphi_zic_cpu_vmexits": ("counter", "VM exits of one CPU of the cell, all reasons.", ("cpu",)),
    "runphi_zic_failed_cpus": ("gauge", "How many of the cell's CPUs are parked after a fatal trap.", ()),
    "runphi_zic_cpu_failed": ("gauge", "1 when this CPU of the cell is parked after a fatal trap.", ("cpu",)),
    "runphi_zic_cpu_seconds": ("counter", "CPU time the cell's CPU ran guest code (KVM: its vCPU thread).",
                               ("cpu",)),
    "runphi_zic_kvm_events": ("counter", "KVM's own per-VM counters, where the host shows them.", ("event",)),
    "runphi_zic_console_bytes": ("counter", "Console bytes read from the cell's UART.", ()),
    "runphi_zic_console_dropped_bytes": ("counter", "Console bytes dropped because nobody read them in time.", ()),
    "runphi_zic_console_lost_bytes": ("counter", "Console bytes lost at the end (sink gone, deadline).", ()),
    "runphi_node_resource_used": ("gauge", "Units of a node resource ZICs hold (RAM in bytes).", ("resource",)),
    "runphi_node_resource_free": ("gauge", "Units of a node resource still free (RAM in bytes).", ("resource",)),
    "runphi_hypervisor_pool_size_pages": ("gauge", "Pages in one of the hypervisor's pools.", ("pool",)),
    "runphi_hypervisor_pool_used_pages": ("gauge", "Pages used in one of the hypervisor's pools.", ("pool",)),
    "runphi_verb_duration_seconds": ("histogram", "How long successful create/start/delete took.", ("verb",)),
}
NODE_FAMILIES = ("runphi_node_resource_used", "runphi_node_resource_free", "runphi_hypervisor_pool_size_pages",
                 "runphi_hypervisor_pool_used_pages", "runphi_verb_duration_seconds")


class NodeCollector:
    """A prometheus_client collector: a fresh :class:`NodeSnapshot` per collection."""

    def __init__(self, ctx) -> None:
        self._ctx = ctx

    def snapshot(self) -> NodeSnapshot:
        ctx = self._ctx
        return take_snapshot(ctx.backend(), ctx.config.backend, ctx.config.state_dir,
                             [ctx.root, ctx.config.state_dir])

    def collect(self) -> Iterator:
        families = _new_families()
        snapshot = self.snapshot()
        for zic in snapshot.zics:
            _add_zic(families, zic, snapshot.backend)
        _add_node(families, snapshot)
        yield from families.values()


def _new_families() -> dict:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    kinds = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily, "histogram": HistogramMetricFamily}
    return {name: kinds[kind](name, text, labels=list(extra if name in NODE_FAMILIES else ZIC_LABELS + extra))
            for name, (kind, text, extra) in FAMILIES.items()}


def _add_zic(families: dict, zic: ZicSample, backend: str) -> None:
    base = [zic.container_id, zic.namespace, zic.cell, zic.pod, zic.pod_namespace]

    def add(name: str, value: float, *extra: str) -> None:
        families[name].add_metric(base + list(extra), value)

    add("runphi_zic_info", 1, backend)
    for state in OCI_STATES:
        add("runphi_zic_state", 1 if zic.status == state else 0, state)
    add("runphi_zic_uptime_seconds", zic.uptime_seconds)
    if zic.exit_code is not None and zic.status == "stopped":
        add("runphi_zic_last_exit_status", zic.exit_code)
    if zic.console is not None:
        add("runphi_zic_console_bytes", zic.console.read_bytes)
        add("runphi_zic_console_dropped_bytes", zic.console.dropped_bytes)
        add("runphi_zic_console_lost_bytes", zic.console.lost_bytes)
    if zic.stats is not None:
        _add_cell(add, zic)


def _add_cell(add, zic: ZicSample) -> None:
    stats = zic.stats
    assert stats is not None
    add("runphi_zic_cell_state", 1, stats.status.state.value)
    add("runphi_zic_failed_cpus", len(stats.failed_cpus))
    for cpu in zic.cpus:
        add("runphi_zic_cpu_failed", 1 if cpu in stats.failed_cpus else 0, str(cpu))
    if stats.vmexits:
        add("runphi_zic_vmexits", stats.vmexits.get("total", 0))
        for reason, count in sorted(stats.vmexits.items()):
            if reason != "total":
                add("runphi_zic_vmexits_by_reason", count, reason)
    for cpu, counters in sorted(stats.vmexits_per_cpu.items()):
        add("runphi_zic_cpu_vmexits", counters.get("total", 0), str(cpu))
    for cpu, seconds in sorted(stats.cpu_seconds.items()):
        add("runphi_zic_cpu_seconds", seconds, str(cpu))
    for event, count in sorted(stats.extra.items()):
        add("runphi_zic_kvm_events", count, event)


def _add_node(families: dict, snapshot: NodeSnapshot) -> None:
    for use in snapshot.resources:
        families["runphi_node_resource_used"].add_metric([use.resource], use.used)
        families["runphi_node_resource_free"].add_metric([use.resource], use.free)
    for pool in snapshot.pools:
        families["runphi_hypervisor_pool_size_pages"].add_metric([pool.name], pool.size_pages)
        families["runphi_hypervisor_pool_used_pages"].add_metric([pool.name], pool.used_pages)
    for verb, histogram in sorted(snapshot.latencies.items()):
        buckets = [("+Inf" if bound == float("inf") else repr(bound), count)
                   for bound, count in histogram.cumulative()]
        families["runphi_verb_duration_seconds"].add_metric([verb], buckets, histogram.sum)


def registry_for(ctx):
    """A registry holding only the node's collector (no process/platform defaults)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(ctx))
    return registry


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``:PORT`` (→ 127.0.0.1) or ``[v6]:PORT``; UsageError when malformed."""
    address, _, port = text.rpartition(":")
    address = address.strip("[]") or DEFAULT_LISTEN_ADDRESS
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {text!r}: expected ADDR:PORT (e.g. 127.0.0.1:9712)")
    return address, int(port)


def run(args, ctx) -> int:
    """Print one snapshot, or serve the exporter until a signal ends it."""
    registry = registry_for(ctx)
    if not args.listen:
        from prometheus_client import exposition
        from prometheus_client.openmetrics import exposition as openmetrics

        text = (openmetrics if args.format == "openmetrics" else exposition).generate_latest(registry)
        sys.stdout.write(text.decode())
        return 0
    return serve(registry, *parse_listen(args.listen))


def serve(registry, address: str, port: int) -> int:
    """The exporter (prometheus_client's HTTP server thread) until SIGTERM or SIGINT; 0 then."""
    from prometheus_client import start_http_server

    stop_signals = {signal.SIGTERM, signal.SIGINT}
    # Blocked before the server's thread exists, so it inherits the mask and the signals
    # wait for sigwait below instead of killing the process mid-scrape.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        server, thread = start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        raise UsageError(f"cannot listen on {address}:{port}: {exc.strerror or exc}") from None
    sys.stderr.write(f"runphi metrics: serving http://{address}:{port}/metrics\n")
    sys.stderr.flush()
    signal.sigwait(stop_signals)
    server.shutdown()
    thread.join(timeout=5)
    return 0
