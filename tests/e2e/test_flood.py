"""Strangers flooding the secondary's port lock nobody out, and cost it neither memory nor log space.

300 connections that never authenticate are held open (reopened a moment
after the secondary drops one), from ten loopback addresses other than the
primary's, and 8 more each send a 32 MiB frame before any handshake. Meanwhile a
freshly mounted primary attaches and checkpoints; over 10,000 such
connections the secondary daemon's peak RSS stays near its idle figure, and
its log grows by a few lines a second at most.
"""

from __future__ import annotations

import os
import resource
import struct
import threading
import time
from dataclasses import dataclass

import pytest
import trio

from colofs.wire.frames import FRAME_VERSION, MAGIC
from colofs.wire.messages import MessageType
from tests.e2e.pair import Pair
from tests.fs.mounts import mountctl
from tests.waiting import wait_until_sync

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

MiB = 1 << 20
KiB = 1 << 10
HOLDERS = 300
HOLDER_SOURCES = [f"127.0.0.{10 + i}" for i in range(10)]
BIG = 8
BIG_SOURCE = "127.0.0.5"
BIG_FRAME = 32 * MiB
PACE = 0.2  # a stranger reconnects this long after being dropped (a pace, not a wait for an outcome)
ATTACH_DEADLINE = 30.0  # hang bound; the time taken is printed (about 1 s here)


FLOOD_CONNECTIONS = 10_000
"""The flood goes on until the secondary has taken this many connections (the log is measured over them)."""


@dataclass
class FloodCounts:
    opened: int = 0
    dropped: int = 0
    big_frames_sent: int = 0
    big_cut: int = 0


class Flood:
    """The strangers, run by trio in a thread of their own until :meth:`stop`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.counts = FloodCounts()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _open(self, source: str) -> trio.socket.SocketType:
        sock = trio.socket.socket()
        try:
            await sock.bind((source, 0))
            await sock.connect(("127.0.0.1", self.port))
        except BaseException:
            sock.close()
            raise
        self.counts.opened += 1
        return sock

    async def _hold(self, source: str) -> None:
        while True:
            try:
                sock = await self._open(source)
            except OSError:
                await trio.sleep(PACE)
                continue
            with sock:
                try:
                    while await sock.recv(4096):
                        pass
                except OSError:
                    pass
            self.counts.dropped += 1
            await trio.sleep(PACE)

    async def _big(self) -> None:
        header = struct.pack("<4sBBHIIQ", MAGIC, FRAME_VERSION, int(MessageType.HELLO), 0,
                             BIG_FRAME, BIG_FRAME, 0)
        chunk = bytes(MiB)
        while True:
            try:
                sock = await self._open(BIG_SOURCE)
            except OSError:
                await trio.sleep(PACE)
                continue
            with sock:
                try:
                    await sock.send(header)
                    for _ in range(BIG_FRAME // MiB):
                        view = memoryview(chunk)
                        while view:
                            view = view[await sock.send(view):]
                    self.counts.big_frames_sent += 1
                    while await sock.recv(4096):
                        pass
                except OSError:
                    self.counts.big_cut += 1
            await trio.sleep(PACE)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for i in range(HOLDERS):
                nursery.start_soon(self._hold, HOLDER_SOURCES[i % len(HOLDER_SOURCES)])
            for _ in range(BIG):
                nursery.start_soon(self._big)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(30), "the flood did not start"

    def stop(self) -> None:
        if self._token is not None and self._thread.is_alive():
            assert self._stop is not None
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(30)


def _proc_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _enough_fds(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"needs {n} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def test_strangers_neither_lock_out_the_primary_nor_flood_memory_or_log(pair: Pair) -> None:
    _enough_fds(HOLDERS + BIG + 512)
    pair.mount_secondary()
    pid = pair.sec.pid
    logfile = pair.sec.store / ".colofs-mount.log"
    idle_rss = _proc_kib(pid, "VmRSS")
    log_before = logfile.stat().st_size
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current figure
    flood = Flood(pair.port)
    try:
        flood.start()
        wait_until_sync(lambda: flood.counts.dropped >= HOLDERS and flood.counts.big_cut + flood.counts.big_frames_sent >= BIG,
                        what="the flood to be turned away at least once per connection", timeout=60)
        t0 = time.monotonic()
        pair.mount_primary()
        mountctl("create", pair.pri.mnt, "vm1/d0", "--size", str(16 * MiB))
        wait_until_sync(lambda: pair.peer(pair.pri).get("state") == "connected", ATTACH_DEADLINE,
                        "the primary to attach through the flood")
        res = pair.checkpoint(timeout=ATTACH_DEADLINE)
        took = time.monotonic() - t0
        assert res["seq"] == pair.vm_status(pair.pri)["last_applied"]
        wait_until_sync(lambda: flood.counts.opened >= FLOOD_CONNECTIONS, 120,
                        f"{FLOOD_CONNECTIONS} flood connections")
    finally:
        flood.stop()
    grown = logfile.stat().st_size - log_before
    peak_rss = _proc_kib(pid, "VmHWM")
    rep = pair.status(pair.sec)["replication"]
    print(f"\nflood: attach+checkpoint {took:.2f} s; secondary RSS idle {idle_rss} KiB, peak {peak_rss} KiB "
          f"(+{(peak_rss - idle_rss) / 1024:.1f} MiB); log +{grown} B; {flood.counts}; {rep}")
    assert grown < 100 * KiB, f"the log grew by {grown} bytes"
    assert peak_rss - idle_rss < 32 * 1024, f"RSS went from {idle_rss} KiB to {peak_rss} KiB"
    why = rep["refused_by_reason"]
    assert why["pending_limit"] > 0 and why["handshake_failed"] > 0, why  # full; the 32 MiB frames refused
    assert rep["sessions"] == 1
    line = mountctl("status", pair.sec.mnt).stdout
    assert f"refused:{rep['refused']}(" in line and "pending_limit:" in line, line
