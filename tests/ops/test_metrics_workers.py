"""``--metrics`` with ``--workers``: the supervisor gathers each worker's figures into one ``/metrics``.

Real worker processes (tests/fs/workerstub.py plays their supervisor's
channel end) serve two VMs of one store; :class:`WorkerFigures` over a
stand-in of the supervisor's fleet is served with ``serve_metrics`` on
loopback and scraped over HTTP, parsed with ``prometheus_client.parser``.
Every family of a single-process mount is there with the same labels, each
VM's series come from its worker, no sample appears twice, and a stopped
(SIGSTOP) or killed worker leaves the scrape working with its VM marked down.
Smaller tests drive the gathering with stand-in channels: the store-wide
counters never go backwards across a silent or restarted worker, a worker's
series for another VM are dropped, and figures larger than one channel
message travel in pages.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from colofs.core import Store
from colofs.fs.config import add_mount_arguments, config_from_args
from colofs.fs.iostats import Histogram
from colofs.fs.metrics import Figures, Hist, render, serve_metrics, to_rows
from colofs.workers.channel import Channel, RemoteError, channel_pair, encode
from colofs.workers.metrics import WorkerFigures, page
from colofs.workers.table import Table
from mountctl.pair import free_port
from tests.e2e.pair import direct_pwrite
from tests.fs.mounts import mountctl
from tests.fs.workerstub import MiB, Supervisor
from tests.mountable import mount_skip_reason
from tests.ops.test_metrics import Scrape, check_all_listed
from tests.waiting import wait_until_sync

WORKER_FAMILIES = {"colofs_worker_up": "gauge", "colofs_worker_state": "gauge",
                   "colofs_worker_restarts": "counter", "colofs_worker_memory_bytes": "gauge"}
REASON = mount_skip_reason()


class StubFleet:
    """What :class:`WorkerFigures` reads of the supervisor's fleet: its table and each VM's channel."""

    def __init__(self) -> None:
        self.table = Table()
        self.channels: dict[str, Any] = {}

    def serving(self, vm: str, pid: int, channel: Any, restarts: int = 0) -> None:
        w = self.table.add(vm)
        w.restarts = restarts
        self.table.started(w, pid, 0.0)
        self.table.ready(w, 0.0)
        self.channels[vm] = channel


def no_sample_twice(s: Scrape) -> None:
    for name, samples in s.samples.items():
        seen = [tuple(sorted(labels.items())) for labels, _ in samples]
        twice = {x for x in seen if seen.count(x) > 1}
        assert not twice, f"{name}: samples appear twice: {sorted(twice)}"


def series_of(s: Scrape, vm: str) -> set[str]:
    """The names of the samples carrying ``vm``, but for the supervisor's worker_* families."""
    return {name for name, samples in s.samples.items() if not name.startswith("colofs_worker_")
            and any(labels.get("vm") == vm for labels, _ in samples)}


def scrape_sync(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
        assert r.status == 200
        return Scrape(r.read().decode())


async def scrape(port: int) -> Scrape:
    """A scrape from a thread: the server answers in this test's trio loop."""
    return await trio.to_thread.run_sync(scrape_sync, port)


async def until_up(port: int, vm: str) -> Scrape:
    def up() -> Scrape | None:
        s = scrape_sync(port)
        return s if s.value("colofs_worker_up", vm=vm) == 1 else None
    return await trio.to_thread.run_sync(wait_until_sync, up, 60, f"{vm}'s worker to answer a scrape again")


def test_workers_accepts_metrics(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    add_mount_arguments(p)
    cfg = config_from_args(p.parse_args(["--role", "primary", "--store", str(tmp_path / "s"), "--workers",
                                         "--metrics", "127.0.0.1:9100", str(tmp_path / "mnt")]))
    assert cfg.workers and cfg.metrics is not None and (cfg.metrics.host, cfg.metrics.port) == ("127.0.0.1", 9100)


@pytest.mark.skipif(REASON is not None, reason=f"mount test {REASON}")
async def test_the_supervisor_serves_every_workers_vm_and_marks_a_stopped_or_dead_one_down(tmp_path: Path) -> None:
    store = await Store.open(str(tmp_path / "store"), role="primary", create=True)
    await store.close()
    sups = [Supervisor(tmp_path, "primary", vm=vm) for vm in ("vm0", "vm1")]
    fleet = StubFleet()
    try:
        async with trio.open_nursery() as nursery:
            for sup in sups:
                await sup.start(nursery, create_vm="primary", restarts=1)
                await sup.wait_for("opened")
                os.mkdir(sup.vm_mount)
            for i, sup in enumerate(sups):
                await sup.wait_for("ready")
                assert sup.proc is not None and sup.channel is not None
                fleet.serving(sup.vm, sup.proc.pid, sup.channel, restarts=1)
                await sup.channel.call("create_disk", timeout=60, disk="d0", size=4 * MiB, block_size=4096)
                await trio.to_thread.run_sync(write, Path(sup.vm_mount, "d0.raw"), 2 + 3 * i)
            await trio.to_thread.run_sync(mountctl, "checkpoint", sups[0].vm_mount)
            port = await nursery.start(serve_metrics, WorkerFigures(fleet), "127.0.0.1", 0)

            s = await scrape(port)
            check_all_listed(s)  # the single-process families, with the same types
            assert {n: s.types.get(n) for n in WORKER_FAMILIES} == WORKER_FAMILIES
            no_sample_twice(s)
            for vm, writes in (("vm0", 2), ("vm1", 5)):
                d = {"vm": vm, "disk": "d0"}
                assert s.value("colofs_writes_total", **d) == writes
                assert s.value("colofs_write_bytes_total", **d) == writes * 4096
                assert s.value("colofs_request_seconds_count", **d, kind="write") == writes
                assert s.value("colofs_replication_state", vm=vm, state="not configured") == 1
                assert s.value("colofs_worker_up", vm=vm) == 1
                assert s.value("colofs_worker_state", vm=vm, state="serving") == 1
                assert s.value("colofs_worker_state", vm=vm, state="hung") == 0
                assert s.value("colofs_worker_restarts_total", vm=vm) == 1
                assert s.value("colofs_worker_memory_bytes", vm=vm, kind="rss") > 0
                assert 0 < s.value("colofs_worker_memory_bytes", vm=vm, kind="pss") \
                    <= s.value("colofs_worker_memory_bytes", vm=vm, kind="rss")
            assert s.value("colofs_checkpoints_total", vm="vm0") == 1
            assert s.value("colofs_checkpoints_total", vm="vm1") == 0
            both = series_of(s, "vm1")
            assert "colofs_writes_total" in both and series_of(s, "vm0") == both

            # A stopped worker: the scrape still answers, within the gathering's timeout, without its VM.
            victim = sups[1].proc
            assert victim is not None
            victim.send_signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                s = await scrape(port)
                assert time.monotonic() - t0 < 30
                assert s.value("colofs_worker_up", vm="vm1") == 0 and s.value("colofs_worker_up", vm="vm0") == 1
                assert series_of(s, "vm1") == set()
                assert s.value("colofs_writes_total", vm="vm0", disk="d0") == 2
                no_sample_twice(s)
            finally:
                victim.send_signal(signal.SIGCONT)
            s = await until_up(port, "vm1")
            assert s.value("colofs_writes_total", vm="vm1", disk="d0") == 5

            # A dead worker: its channel is closed; the supervisor's table shows it crashed.
            victim.send_signal(signal.SIGKILL)
            code = await trio.to_thread.run_sync(victim.wait)
            assert sups[1].channel is not None
            await sups[1].channel.closed.wait()
            fleet.table.exited(fleet.table.workers["vm1"], code, 1.0)
            s = await scrape(port)
            check_all_listed(s)
            no_sample_twice(s)
            assert s.value("colofs_worker_up", vm="vm1") == 0
            assert s.value("colofs_worker_state", vm="vm1", state="crashed") == 1
            assert "colofs_worker_memory_bytes" not in series_of_all(s, "vm1")
            assert series_of(s, "vm1") == set()
            assert s.value("colofs_writes_total", vm="vm0", disk="d0") == 2
            nursery.cancel_scope.cancel()
    finally:
        for sup in sups:
            sup.cleanup()


def series_of_all(s: Scrape, vm: str) -> set[str]:
    return {name for name, samples in s.samples.items() if any(labels.get("vm") == vm for labels, _ in samples)}

def write(path: Path, n: int) -> None:
    """``n`` O_DIRECT writes of 4 KiB: each is one request of the VM's mount (the page cache merges none)."""
    for i in range(n):
        direct_pwrite(path, i * 4096, bytes([i + 1]) * 4096)

def absent_pid(n: int) -> int:
    """A pid no process can have (above the kernel's pid_max): its memory is simply not reported."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + n


def worker_figures(vm: str, writes: int, refused: dict[str, int]) -> Figures:
    h = Histogram()
    for _ in range(writes):
        h.observe(0.001)
    return Figures({"colofs_writes": (((vm, "d0"), float(writes)),),
                    "colofs_request_seconds": (((vm, "d0", "write"), Hist.of(h)),),
                    "colofs_refused_connections": tuple(((r,), float(n)) for r, n in refused.items())})


class FakeChannel:
    """A worker's channel end as the gathering sees it: answers ``metrics`` with given figures, or hangs."""

    def __init__(self, pid: int, figures: Figures, extra_rows: tuple[list[Any], ...] = ()) -> None:
        self.closed = trio.Event()
        self.pid = pid
        self.figures = figures
        self.extra_rows = extra_rows
        self.hang = False

    async def call(self, op: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
        assert op == "metrics"
        if self.hang:
            await trio.sleep_forever()
        reply = page(self.figures, fields.get("after"))
        return {**reply, "rows": [*reply["rows"], *self.extra_rows], "pid": self.pid}


async def test_store_wide_counters_never_go_backwards_and_a_worker_reports_only_its_vm() -> None:
    fleet = StubFleet()
    vm0 = FakeChannel(100, worker_figures("vm0", 3, {"handshake_failed": 2}),
                      extra_rows=(["colofs_writes", ["vm9", "d0"], 7.0],  # another VM's: not this worker's to say
                                  ["colofs_writes", ["vm0"], 1.0],  # malformed: one label short
                                  ["colofs_unknown", [], 1.0]))
    vm1 = FakeChannel(200, worker_figures("vm1", 5, {"handshake_failed": 1, "admission": 4}))
    fleet.serving("vm0", absent_pid(1), vm0)
    fleet.serving("vm1", absent_pid(2), vm1)
    router = {"preamble": 5, "handshake_failed": 1}
    gather = WorkerFigures(fleet, refused=lambda: router, timeout=0.5)

    def refused(s: Scrape) -> dict[str, float]:
        return {lab["reason"]: v for lab, v in s.samples["colofs_refused_connections_total"]}

    s = Scrape(render(await gather.gather()).decode())
    check_all_listed(s)
    no_sample_twice(s)
    assert refused(s) == {"handshake_failed": 4, "admission": 4, "preamble": 5}
    assert s.value("colofs_writes_total", vm="vm0") == 3 and s.value("colofs_writes_total", vm="vm1") == 5
    assert series_of_all(s, "vm9") == set()
    assert s.value("colofs_request_seconds_count", vm="vm1", kind="write") == 5
    assert "colofs_worker_memory_bytes" not in series_of_all(s, "vm0")

    # vm0's worker hangs: its VM is absent, but what it counted store-wide stays counted.
    vm0.hang = True
    s = Scrape(render(await gather.gather()).decode())
    assert s.value("colofs_worker_up", vm="vm0") == 0 and s.value("colofs_worker_up", vm="vm1") == 1
    assert series_of(s, "vm0") == set()
    assert refused(s) == {"handshake_failed": 4, "admission": 4, "preamble": 5}

    # It is killed and restarted: the new worker counts from 0, the sum goes on from where it was.
    fleet.table.exited(fleet.table.workers["vm0"], -9, 1.0)
    fleet.table.restarting(fleet.table.workers["vm0"])
    fleet.serving("vm0", absent_pid(3), FakeChannel(101, worker_figures("vm0", 0, {"handshake_failed": 1})),
                  restarts=1)
    router["preamble"] = 6
    s = Scrape(render(await gather.gather()).decode())
    assert refused(s) == {"handshake_failed": 5, "admission": 4, "preamble": 6}
    assert s.value("colofs_worker_restarts_total", vm="vm0") == 1
    assert s.value("colofs_writes_total", vm="vm0") == 0  # a per-VM counter resets with its worker, as at a remount

    # A VM the supervisor no longer has: its worker's refusals stay in the sum.
    del fleet.table.workers["vm1"]
    s = Scrape(render(await gather.gather()).decode())
    assert refused(s) == {"handshake_failed": 5, "admission": 4, "preamble": 6}
    assert series_of_all(s, "vm1") == set()


async def test_a_vm_with_many_disks_travels_in_pages_each_row_once() -> None:
    names = [f"disk-{i:03d}-" + "x" * 200 for i in range(300)]
    h = Histogram()
    h.observe(0.002)
    figures = Figures({"colofs_writes": tuple((("vm0", d), float(i)) for i, d in enumerate(names)),
                       "colofs_request_seconds": tuple((("vm0", d, k), Hist.of(h)) for d in names
                                                       for k in ("read", "write")),
                       "colofs_damaged": ((("vm0",), 0.0),)})
    with pytest.raises(ValueError, match="over the"):
        encode({"rows": to_rows(figures)})  # one reply could not carry them
    pages = 0

    async def worker(msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        nonlocal pages
        pages += 1
        return {**page(figures, msg.get("after")), "pid": 4242}

    async def supervisor(msg: dict[str, Any], fds: list[int]) -> None:
        return None

    ours, theirs = channel_pair()
    sup_end, worker_end = Channel(ours, label="supervisor"), Channel(theirs, label="worker")
    fleet = StubFleet()
    fleet.serving("vm0", absent_pid(1), sup_end)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker_end.run, worker)
        nursery.start_soon(sup_end.run, supervisor)
        got = await WorkerFigures(fleet, timeout=60).gather()
        with pytest.raises(RemoteError) as bad:
            await sup_end.call("metrics", timeout=60, after="not a cursor")
        nursery.cancel_scope.cancel()
    assert pages >= 3
    for name, rows in figures.series.items():
        assert sorted(got.series[name]) == sorted(rows), name
    s = Scrape(render(got).decode())
    no_sample_twice(s)
    assert len(s.samples["colofs_writes_total"]) == 300
    assert bad.value.errno == errno.EINVAL


def _supervisor_serves_metrics() -> bool:
    """Whether the supervisor starts the metrics server (the lines it needs: colofs/workers/metrics.py's doc)."""
    try:
        from colofs.workers import supervisor
    except ImportError:
        return False
    return "WorkerFigures" in inspect.getsource(supervisor)


@pytest.fixture
def wpair(tmp_path: Path) -> Iterator[Any]:
    from tests.workers.conftest import WorkersPair

    p = WorkersPair(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()


@pytest.mark.skipif(REASON is not None, reason=f"mount test {REASON}")
@pytest.mark.skipif(not _supervisor_serves_metrics(), reason="the supervisor does not start WorkerFigures yet")
def test_a_workers_pair_serves_each_hosts_metrics_from_its_supervisor(wpair: Any) -> None:
    sport, pport = free_port(), free_port()
    wpair.mount_secondary("--workers", "--metrics", f"127.0.0.1:{sport}")
    wpair.mount_primary("--workers", "--metrics", f"127.0.0.1:{pport}")
    wpair.tracker.remember()
    for vm, writes in (("vm1", 4), ("vm2", 2)):
        mountctl("create", str(wpair.pri.mnt), f"{vm}/d0", "--size", "4M")
        wpair.wait_disk(vm, "d0", 4 * MiB)
        write(wpair.pfile(vm), writes)
    assert wpair.checkpoint("vm1")["replicated"] is True
    wpair.wait_caught_up("vm1")
    wpair.tracker.remember()
    # A stranger without the route preamble is refused by the secondary's supervisor, never by a worker.
    with socket.create_connection(("127.0.0.1", wpair.port), timeout=30) as stranger:
        try:  # the router reads the 8 bytes of a preamble, refuses, and closes with the rest unread (a reset)
            stranger.sendall(b"GET / HTTP/1.0\r\n\r\n" * 8)
            while stranger.recv(4096):
                pass
        except OSError:
            pass

    p = scrape_sync(pport)
    check_all_listed(p)
    assert {n: p.types.get(n) for n in WORKER_FAMILIES} == WORKER_FAMILIES
    no_sample_twice(p)
    for vm, writes in (("vm1", 4), ("vm2", 2)):
        assert p.value("colofs_writes_total", vm=vm, disk="d0") == writes
        assert p.value("colofs_replication_state", vm=vm, state="connected") == 1
        assert p.value("colofs_worker_up", vm=vm) == 1
        assert p.value("colofs_worker_state", vm=vm, state="serving") == 1
        assert p.value("colofs_worker_memory_bytes", vm=vm, kind="pss") > 0
    assert p.value("colofs_checkpoints_total", vm="vm1") == 1 and p.value("colofs_checkpoints_total", vm="vm2") == 0

    s = wait_until_sync(lambda: (lambda x: x if sum(v for _, v in x.samples.get(
        "colofs_refused_connections_total", [])) >= 1 else None)(scrape_sync(sport)),
        what="the secondary's metrics to count the refused stranger")
    check_all_listed(s)
    no_sample_twice(s)
    assert sum(v for _, v in s.samples["colofs_refused_connections_total"]) == 1
    assert s.value("colofs_checkpoints_total", vm="vm1") == 1  # counted once: by vm1's worker, not its supervisor
    assert s.value("colofs_worker_up", vm="vm1") == 1 and s.value("colofs_worker_up", vm="vm2") == 1

    # The primary's vm2 worker stopped: the scrape answers without vm2, which is marked down.
    victim = wpair.worker_pid(wpair.pri, "vm2")
    os.kill(victim, signal.SIGSTOP)
    try:
        p = scrape_sync(pport)
        no_sample_twice(p)
        assert p.value("colofs_worker_up", vm="vm2") == 0 and p.value("colofs_worker_up", vm="vm1") == 1
        assert series_of(p, "vm2") == set()
        assert p.value("colofs_writes_total", vm="vm1", disk="d0") == 4
    finally:
        os.kill(victim, signal.SIGCONT)
    wait_until_sync(lambda: scrape_sync(pport).value("colofs_worker_up", vm="vm2") == 1, what="vm2's worker up again")

    # Killed: the scrape goes on; once restarted, vm2 is back with its restart counted.
    os.kill(victim, signal.SIGKILL)
    p = scrape_sync(pport)
    no_sample_twice(p)
    assert p.value("colofs_writes_total", vm="vm1", disk="d0") == 4
    p = wait_until_sync(lambda: (lambda x: x if x.value("colofs_worker_restarts_total", vm="vm2") == 1
                                 and x.value("colofs_worker_state", vm="vm2", state="serving") == 1
                                 and x.value("colofs_worker_up", vm="vm2") == 1 else None)(scrape_sync(pport)),
                        what="vm2's restarted worker serving, in the metrics")
    check_all_listed(p)
    no_sample_twice(p)
    assert p.value("colofs_writes_total", vm="vm2", disk="d0") == 0  # counted anew by the new worker
    wpair.tracker.remember()


@pytest.mark.skipif(REASON is not None, reason=f"mount test {REASON}")
@pytest.mark.skipif(not _supervisor_serves_metrics(), reason="the supervisor does not start WorkerFigures yet")
def test_a_busy_metrics_port_stops_a_workers_mount_with_the_reason(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = mountctl("mount", "--workers", "--role", "primary", "--store", str(tmp_path / "store"), "--metrics",
                       f"127.0.0.1:{port}", str(mnt), check=False)
    try:
        assert res.returncode != 0
        assert f"--metrics: cannot listen on 127.0.0.1:{port}" in res.stderr
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            mountctl("umount", str(mnt), check=False)
