"""Prometheus metrics of a mount: immutable snapshots of its figures, rendered at ``/metrics``.

``--metrics HOST:PORT`` serves the text exposition format. A scrape is
answered by a small trio HTTP handler in the daemon's own loop: it takes a
:class:`Figures` snapshot (reading the counters the FUSE handlers keep, the
replication engine's status and the checkpoint and failover counts seen on
the event bus), then lets ``prometheus_client`` render it through
:class:`FiguresCollector`. The collector only reads the snapshot, a frozen
value, so it would be just as safe in another thread; nothing on the request
path of a VM's I/O touches a Prometheus object.

Process model: every series carries the VM (and disk) it belongs to, and
each VM is served by exactly one process, so figures from several processes
(with ``--workers``, the supervisor gathering its workers' snapshots,
:mod:`colofs.workers.metrics`) combine with :func:`merge` without counting
anything twice: series with equal labels are summed, which only happens for
the store-wide series (refused connections: each connection is refused by
exactly one process). The families and label sets are the same in both
models; the supervisor adds its own :data:`WORKER_SPEC` families.
Snapshots travel between processes as :func:`to_rows` / :func:`from_rows`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from colofs.events import EventBus
from colofs.fs.iostats import LATENCY_BOUNDS, Histogram

log = logging.getLogger(__name__)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
DISK = ("vm", "disk")
VM_ = ("vm",)
LINK_STATES = ("connected", "connecting", "resyncing", "refused", "stopped", "waiting", "failed over",
               "not replicated", "not configured")

SPEC: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "colofs_reads": (COUNTER, "Read requests served from a disk file", DISK),
    "colofs_read_bytes": (COUNTER, "Bytes read from a disk file", DISK),
    "colofs_writes": (COUNTER, "Write requests served on a disk file", DISK),
    "colofs_write_bytes": (COUNTER, "Bytes written to a disk file", DISK),
    "colofs_request_seconds": (HISTOGRAM, "Time to serve a read or write request", (*DISK, "kind")),
    "colofs_hidden_bytes": (GAUGE, "Bytes in the disk's hidden layer (since the last checkpoint)", DISK),
    "colofs_active_bytes": (GAUGE, "Bytes in the disk's active layer (since the last checkpoint)", DISK),
    "colofs_io_errors": (COUNTER, "I/O errors answered on the disk file since the mount", DISK),
    "colofs_checkpoints": (COUNTER, "Checkpoints taken through this mount", VM_),
    "colofs_checkpoint_seconds": (HISTOGRAM, "Time a checkpoint took, write-back and confirmation included", VM_),
    "colofs_failovers": (COUNTER, "Failovers of the VM done by this mount", VM_),
    "colofs_replication_state": (GAUGE, "1 for the VM's current replication state, 0 for the others",
                                 (*VM_, "state")),
    "colofs_backlog_writes": (GAUGE, "Writes the secondary has not acknowledged yet (primary)", VM_),
    "colofs_backlog_bytes": (GAUGE, "Bytes of writes the secondary has not acknowledged yet (primary)", VM_),
    "colofs_acked_seq": (GAUGE, "Last sequence number acknowledged by the secondary (applied, on a secondary)",
                         VM_),
    "colofs_last_seq": (GAUGE, "Last sequence number written on this node", VM_),
    "colofs_lz4_ratio": (GAUGE, "Bytes on the wire over raw bytes of the compressed bulk data (primary)", VM_),
    "colofs_resync_active": (GAUGE, "1 while a resync of the VM runs (primary)", VM_),
    "colofs_resync_blocks_total": (GAUGE, "Blocks the current or last resync compares (primary)", VM_),
    "colofs_resync_blocks_checked": (GAUGE, "Blocks the current or last resync has compared (primary)", VM_),
    "colofs_verify_active": (GAUGE, "1 while an online verify of the VM runs (primary)", VM_),
    "colofs_verify_blocks_total": (GAUGE, "Blocks the current or last verify compares (primary)", VM_),
    "colofs_verify_blocks_done": (GAUGE, "Blocks the current or last verify has done (primary)", VM_),
    "colofs_verify_blocks_differing": (GAUGE, "Blocks the last verify found different (primary)", VM_),
    "colofs_damaged": (GAUGE, "1 while the VM is quarantined as damaged", VM_),
    "colofs_refused_connections": (COUNTER, "Connections the secondary refused, by reason", ("reason",)),
}

WORKER_SPEC: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "colofs_worker_up": (GAUGE, "1 if the VM's worker answered this scrape (its VM's series are absent if 0)",
                         VM_),
    "colofs_worker_state": (GAUGE, "1 for the VM's worker's current state, 0 for the others", (*VM_, "state")),
    "colofs_worker_restarts": (COUNTER, "Times the supervisor restarted the VM's worker", VM_),
    "colofs_worker_memory_bytes": (GAUGE, "Memory of the VM's worker process (rss, pss, uss)", (*VM_, "kind")),
}
"""The supervisor's own families (``--workers``): rendered only by a supervisor, never by a worker."""


@dataclass(frozen=True)
class Hist:
    """A histogram's per-bucket counts (not cumulative, one per bound and +Inf) and its sum."""

    counts: tuple[int, ...]
    sum: float

    @classmethod
    def of(cls, h: Histogram) -> Hist:
        return cls(tuple(h.counts), h.sum)


Value = float | Hist


@dataclass(frozen=True)
class Figures:
    """One snapshot: per metric name, its series as ``(label values, value)``; never changed once made."""

    series: dict[str, tuple[tuple[tuple[str, ...], Value], ...]] = field(default_factory=dict)


def merge(parts: Iterable[Figures]) -> Figures:
    """Several processes' figures as one: series with equal labels are added (see the module doc)."""
    acc: dict[str, dict[tuple[str, ...], Value]] = {}
    for fig in parts:
        for name, rows in fig.series.items():
            out = acc.setdefault(name, {})
            for labels, value in rows:
                old = out.get(labels)
                if old is None:
                    out[labels] = value
                elif isinstance(old, Hist) and isinstance(value, Hist):
                    out[labels] = Hist(tuple(a + b for a, b in zip(old.counts, value.counts, strict=True)),
                                       old.sum + value.sum)
                elif not isinstance(old, Hist) and not isinstance(value, Hist):
                    out[labels] = old + value
    return Figures({name: tuple(rows.items()) for name, rows in acc.items()})


def to_rows(figures: Figures) -> list[list[Any]]:
    """A snapshot as JSON-ready rows ``[name, [labels], value]`` sorted by name and labels (see :func:`from_rows`)."""
    out: list[list[Any]] = []
    for name in sorted(figures.series):
        for labels, value in sorted(figures.series[name], key=lambda row: row[0]):
            v: Any = {"h": list(value.counts), "s": value.sum} if isinstance(value, Hist) else value
            out.append([name, list(labels), v])
    return out


def from_rows(rows: Iterable[Any], *, spec: dict[str, tuple[str, str, tuple[str, ...]]] = SPEC) -> tuple[Figures, int]:
    """Rows another process sent, checked against ``spec``: the figures and how many malformed rows were dropped."""
    acc: dict[str, dict[tuple[str, ...], Value]] = {}
    bad = 0
    for row in rows:
        value = _row_value(row, spec)
        if value is None:
            bad += 1
            continue
        acc.setdefault(row[0], {})[tuple(row[1])] = value
    return Figures({name: tuple(r.items()) for name, r in acc.items()}), bad


def _row_value(row: Any, spec: dict[str, tuple[str, str, tuple[str, ...]]]) -> Value | None:
    """The value of one well-formed row, or None: a known name, its number of string labels, a value of its kind."""
    if not isinstance(row, list) or len(row) != 3 or row[0] not in spec:
        return None
    name, labels, v = row
    kind, _, names = spec[name]
    if not isinstance(labels, list) or len(labels) != len(names) or not all(isinstance(x, str) for x in labels):
        return None
    if kind != HISTOGRAM:
        return _num(v)
    if not isinstance(v, dict):
        return None
    counts, total = v.get("h"), _num(v.get("s"))
    if (not isinstance(counts, list) or len(counts) != len(LATENCY_BOUNDS) + 1 or total is None
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)):
        return None
    return Hist(tuple(counts), total)


class FiguresCollector:
    """A ``prometheus_client`` collector over one :class:`Figures` snapshot.

    Every :data:`SPEC` metric is always listed (empty if no series), so a
    dashboard sees each family from the first scrape; the supervisor's
    :data:`WORKER_SPEC` families only where the snapshot has them.
    """

    def __init__(self, figures: Figures) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        extra = {name: v for name, v in WORKER_SPEC.items() if name in self.figures.series}
        for name, (kind, text, labels) in {**SPEC, **extra}.items():
            rows = self.figures.series.get(name, ())
            if kind == HISTOGRAM:
                h = HistogramMetricFamily(name, text, labels=list(labels))
                for values, v in rows:
                    assert isinstance(v, Hist)
                    cum, buckets = 0, []
                    for bound, n in zip((*LATENCY_BOUNDS, float("inf")), v.counts, strict=True):
                        cum += n
                        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
                    h.add_metric(list(values), buckets, v.sum)
                yield h
                continue
            fam = (CounterMetricFamily if kind == COUNTER else GaugeMetricFamily)(name, text, labels=list(labels))
            for values, v in rows:
                assert not isinstance(v, Hist)
                fam.add_metric(list(values), v)
            yield fam


class VMCounts:
    """Checkpoints and failovers per VM, counted from the event bus (each is emitted once)."""

    def __init__(self, bus: EventBus) -> None:
        self.checkpoints: dict[str, Histogram] = {}
        self.failovers: dict[str, int] = {}
        bus.watch(self._seen)

    def _seen(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "checkpoint":
            self.checkpoints.setdefault(event["vm"], Histogram()).observe(float(event.get("seconds", 0.0)))
        elif kind == "failover":
            self.failovers[event["vm"]] = self.failovers.get(event["vm"], 0) + 1


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


class Source(Protocol):
    """What :func:`serve_metrics` scrapes: one mount's :class:`FigureSource`, or a supervisor's gathering."""

    async def gather(self) -> Figures: ...


class FigureSource:
    """Takes :class:`Figures` snapshots of one mount (called in the trio loop only)."""

    def __init__(self, ops: Any, counts: VMCounts) -> None:
        self.ops = ops  # colofs.fs.operations.Operations (not imported: it imports this package's peers)
        self.counts = counts

    async def gather(self) -> Figures:
        return self.snapshot()

    def snapshot(self) -> Figures:
        ops = self.ops
        rows: dict[str, list[tuple[tuple[str, ...], Value]]] = {name: [] for name in SPEC}

        def put(name: str, labels: tuple[str, ...], value: Value | None) -> None:
            if value is not None:
                rows[name].append((labels, value))

        io = ops.io.disks
        for vm_name, vm in sorted(ops.store.vms.items()):
            for disk_name, disk in sorted(vm.disks.items()):
                lab = (vm_name, disk_name)
                d = io.get(lab)
                st = disk.status()
                put("colofs_reads", lab, d.reads if d else 0)
                put("colofs_read_bytes", lab, d.read_bytes if d else 0)
                put("colofs_writes", lab, d.writes if d else 0)
                put("colofs_write_bytes", lab, d.write_bytes if d else 0)
                put("colofs_request_seconds", (*lab, "read"), Hist.of(d.read_latency if d else Histogram()))
                put("colofs_request_seconds", (*lab, "write"), Hist.of(d.write_latency if d else Histogram()))
                put("colofs_hidden_bytes", lab, _num(st["hidden_bytes"]))
                put("colofs_active_bytes", lab, _num(st["active_bytes"]))
                put("colofs_io_errors", lab, ops.control.io_errors.get(f"{vm_name}/{disk_name}", 0))
            self._vm(vm_name, vm, put)
        srv = ops.repl.server
        if srv is not None:
            for reason, n in refusals({**srv.admission.status(), "refused": srv.stats["refused"]}).items():
                put("colofs_refused_connections", (reason,), n)
        return Figures({name: tuple(r) for name, r in rows.items()})

    def _vm(self, name: str, vm: Any, put: Callable[[str, tuple[str, ...], Value | None], None]) -> None:
        lab = (name,)
        cps = self.counts.checkpoints.get(name, Histogram())
        put("colofs_checkpoints", lab, sum(cps.counts))
        put("colofs_checkpoint_seconds", lab, Hist.of(cps))
        put("colofs_failovers", lab, self.counts.failovers.get(name, 0))
        peer = self.ops.repl.vm_status(vm)
        state = str(peer.get("state"))
        for s in sorted({*LINK_STATES, state}):
            put("colofs_replication_state", (name, s), 1.0 if s == state else 0.0)
        put("colofs_last_seq", lab, vm.state.last_applied)
        put("colofs_acked_seq", lab, _num(peer.get("acked_seq")))
        put("colofs_backlog_writes", lab, _num(peer.get("backlog_writes")) or 0.0)
        put("colofs_backlog_bytes", lab, _num(peer.get("backlog_bytes")) or 0.0)
        put("colofs_lz4_ratio", lab, _num(peer.get("lz4_ratio")))
        resync = peer.get("resync")
        if isinstance(resync, dict):
            put("colofs_resync_active", lab, 1.0 if resync.get("active") else 0.0)
            put("colofs_resync_blocks_total", lab, _num(resync.get("blocks_total")))
            put("colofs_resync_blocks_checked", lab, _num(resync.get("blocks_checked")))
        verify = self.ops.repl.verify_status(vm)
        if self.ops.repl.verifies is not None:
            v = verify or {}
            put("colofs_verify_active", lab, 1.0 if v.get("state") == "running" else 0.0)
            put("colofs_verify_blocks_total", lab, _num(v.get("blocks_total")) or 0.0)
            put("colofs_verify_blocks_done", lab, _num(v.get("blocks_done")) or 0.0)
            put("colofs_verify_blocks_differing", lab, _num(v.get("blocks_differing")) or 0.0)
        put("colofs_damaged", lab, 1.0 if vm.damage is not None else 0.0)


def refusals(status: Mapping[str, Any]) -> dict[str, int]:
    """Refused connections by reason from a listener's status (``refused``, ``refused_by_reason``).

    Those refused for a reason admission does not count are ``other``. A
    secondary's server gives this status, and so does a supervisor's router.
    """
    by_reason = {str(k): int(v) for k, v in dict(status.get("refused_by_reason") or {}).items()}
    other = int(status.get("refused") or 0) - sum(by_reason.values())
    return {**dict(sorted(by_reason.items())), "other": max(0, other)}


def render(figures: Figures) -> bytes:
    """The text exposition of one snapshot."""
    return generate_latest(FiguresCollector(figures))  # type: ignore[arg-type]


MAX_REQUEST = 8192
REQUEST_TIMEOUT = 10.0


async def serve_metrics(source: Source, host: str, port: int,
                        *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer ``GET /metrics`` on ``host:port`` until cancelled; reports the bound port once listening."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("metrics: serving http://%s:%d/metrics", host, bound)
    task_status.started(bound)
    await trio.serve_listeners(lambda s: _answer(s, source), listeners)


async def _answer(stream: trio.SocketStream, source: Source) -> None:
    try:
        head = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST:
                got = await stream.receive_some(MAX_REQUEST)
                if not got:
                    break
                head += got
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            await _reply(stream, 400, b"text/plain", b"only GET /metrics is served\n")
        elif parts[1].split(b"?", 1)[0] != b"/metrics":
            await _reply(stream, 404, b"text/plain", b"not found: the metrics are at /metrics\n")
        else:
            body = render(await source.gather())
            await _reply(stream, 200, CONTENT_TYPE_LATEST.encode(), body if parts[0] == b"GET" else b"",
                         length=len(body))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except Exception:
        log.exception("metrics: a scrape failed")
    finally:
        await trio.aclose_forcefully(stream)


async def _reply(stream: trio.SocketStream, code: int, ctype: bytes, body: bytes, *, length: int | None = None) -> None:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}[code]
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (code, reason, ctype, len(body) if length is None else length))
    await stream.send_all(head + body)
