"""Per-disk request counters the FUSE read and write handlers keep: plain numbers, nothing else.

These run on every request, so they cost a dict lookup, a bisect and a few
additions: no locks (everything runs in the trio loop), no Prometheus
objects. :mod:`colofs.metrics` copies them into an immutable snapshot when
it is scraped.
"""

from __future__ import annotations

from bisect import bisect_left

LATENCY_BOUNDS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)
"""Upper bounds (seconds) of the latency histogram buckets; one more bucket counts the rest (+Inf)."""


class Histogram:
    """Counts per bucket of :data:`LATENCY_BOUNDS` (not cumulative) and the sum of the values."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.sum += seconds


class DiskIO:
    """One disk's reads and writes: operations, bytes, and latency per kind."""

    __slots__ = ("read_bytes", "read_latency", "reads", "write_bytes", "write_latency", "writes")

    def __init__(self) -> None:
        self.reads = 0
        self.read_bytes = 0
        self.writes = 0
        self.write_bytes = 0
        self.read_latency = Histogram()
        self.write_latency = Histogram()

    def read(self, nbytes: int, seconds: float) -> None:
        self.reads += 1
        self.read_bytes += nbytes
        self.read_latency.observe(seconds)

    def write(self, nbytes: int, seconds: float) -> None:
        self.writes += 1
        self.write_bytes += nbytes
        self.write_latency.observe(seconds)


class IOStats:
    """The :class:`DiskIO` of every disk a mount served, keyed by ``(vm, disk)``."""

    def __init__(self) -> None:
        self.disks: dict[tuple[str, str], DiskIO] = {}

    def of(self, vm: str, disk: str) -> DiskIO:
        key = (vm, disk)
        got = self.disks.get(key)
        if got is None:
            got = self.disks[key] = DiskIO()
        return got
