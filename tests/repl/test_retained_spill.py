"""The retained log keeps only its newest writes in memory; the rest wait in a spill file until dropped."""

from __future__ import annotations

import os
import random
import threading

import trio

from colofs.core.forward import ForwardedWrite
from colofs.repl import retained
from colofs.repl.retained import RetainedBudget, RetainedLog
from tests.repl.conftest import wait_until
from tests.repl.test_crash import SIZE, _write
from tests.waiting import DEADLINE

MiB = 1 << 20


def _writes(first: int, n: int, size: int = 4096, seed: int = 1) -> list[ForwardedWrite]:
    rng = random.Random(seed)
    return [ForwardedWrite(s, "d", rng.randrange(1 << 16) * 4096, rng.randbytes(size)) for s in range(first, first + n)]


async def test_sixteen_mib_of_writes_keep_at_most_the_resident_limit_in_memory(tmp_path) -> None:
    limit = 1 * MiB
    budget = RetainedBudget(1 << 30)
    log = RetainedLog(1, budget, spill_dir=str(tmp_path), resident_limit=limit)
    writes = _writes(1, 4096)  # 16 MiB of 4 KiB writes
    peak = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run_spill)
        for i, w in enumerate(writes):
            log.append(w)
            log.mark_sent(w.seq)  # as a streaming link does, a batch at a time
            if i % 64 == 63:  # where a daemon's loop serves other tasks: the spill task may run
                await wait_until(lambda: log.resident <= limit, what="the spill task within its limit")
            peak = max(peak, log.resident)
        assert peak <= limit + 64 * 4096
        assert log.nbytes == budget.total == 16 * MiB  # what the log holds (and the budget counts) is unchanged
        assert log.resident <= limit + 64 * 4096 and log.resident < log.nbytes
        for w in writes:  # spilled or not, every write reads back as it was appended
            got = log.get(w.seq)
            assert (got.seq, got.disk, got.offset, bytes(got.data)) == (w.seq, w.disk, w.offset, w.data)
        assert log.bytes_after(100) == (4096 - 100) * 4096 and log.size(7) == 4096
        await log.read_back(1, 4096, 1 * MiB)  # a resend's next batch, read in a thread: 256 writes of 4 KiB
        assert sorted(log._back) == list(range(1, 257))
        assert log.get(1).data == writes[0].data and 1 not in log._back  # handed out once
        await log.read_back(4096, 4096, 1 * MiB)  # the newest write is in memory: nothing to read, no scan
        assert not log._back
        assert log.drop_through(2048) == 2048 * 4096 and log.get(2049).data == writes[2048].data
        fd = log._spill.fd  # type: ignore[union-attr]
        assert os.fstat(fd).st_size > 0
        log.drop_through(4096)  # a confirmed checkpoint past everything: the file holds nothing needed
        assert log.resident == log.nbytes == budget.total == 0
        await wait_until(lambda: os.fstat(fd).st_size == 0, what="the emptied spill file truncated")
        log.append(_writes(4097, 1)[0])
        assert log.get(4097).seq == 4097
        nursery.cancel_scope.cancel()
    assert log._spill is not None and log._spill.fd == -1  # closed when its task ends
    assert not os.listdir(tmp_path)  # unnamed: nothing left in the directory


async def test_writes_not_sent_yet_are_spilled_only_past_twice_the_limit(tmp_path) -> None:
    """Each unsent write spilled would be read back for its batch: a briefly lagging link keeps them."""
    limit = 64 * 4096
    log = RetainedLog(1, spill_dir=str(tmp_path), resident_limit=limit)
    for w in _writes(1, 160):  # 640 KiB: 2.5 times the limit, 8 of them sent
        log.append(w)
    log.sent = 8
    assert await log.spill_once() == 32 * 4096  # the 8 sent, then unsent ones down to twice the limit
    assert log.resident == 2 * limit and log._cold == 32
    assert await log.spill_once() == 0  # within twice the limit, and nothing sent left in memory
    log.sent = 160
    assert await log.spill_once() == 2 * limit - limit // 2 and log.resident == limit // 2
    assert log._cold == 128
    assert [log.get(s).data for s in (1, 32, 33, 160)] == [_writes(1, 160)[s - 1].data for s in (1, 32, 33, 160)]


async def test_writes_dropped_or_reset_during_a_spill_stay_dropped(tmp_path, monkeypatch) -> None:
    """The data is written in a thread; what the log dropped meanwhile is not brought back as spilled."""
    started, release = threading.Event(), threading.Event()
    real = retained._write_all

    def slow_write(fd: int, bufs: list, pos: int) -> None:
        started.set()
        release.wait(DEADLINE)
        real(fd, bufs, pos)

    monkeypatch.setattr(retained, "_write_all", slow_write)
    log = RetainedLog(1, spill_dir=str(tmp_path), resident_limit=64 * 4096)
    for w in _writes(1, 128):
        log.append(w)
    log.sent = 128
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.spill_once)
        await trio.to_thread.run_sync(started.wait, DEADLINE)
        assert log.drop_through(10) == 10 * 4096  # dropped while their data is being written
        release.set()
    assert log.start == 11 and log.nbytes == 118 * 4096
    assert log._cold == 96 - 10 and log.resident == 32 * 4096  # spilled down to half the limit, the dropped not
    assert log.get(11).data == _writes(1, 128)[10].data

    started.clear()
    release.clear()
    for w in _writes(129, 64, seed=2):
        log.append(w)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.spill_once)
        await trio.to_thread.run_sync(started.wait, DEADLINE)
        log.reset(500)  # the stream broke: the log restarts empty
        release.set()
    assert log.nbytes == log.resident == log._cold == 0 and len(log) == 0
    w = ForwardedWrite(500, "d", 0, b"z" * 4096)
    log.append(w)
    assert log.get(500) is w


async def test_a_killed_secondary_catches_up_from_spilled_retained_writes(pair, repl_errors, monkeypatch) -> None:
    """The writes a restarted secondary needs come back from the spill file: no resync, identical disks."""
    limit = 64 << 10
    monkeypatch.setattr(retained, "RESIDENT_LIMIT", limit)
    rng = random.Random(3)
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary()
    port = pair.port
    await pair.start_primary()
    img = bytearray(SIZE)
    await _write(pair, rng, img, 40)
    await pair.link("vm").replicate_checkpoint()
    await _write(pair, rng, img, 150)
    await pair.caught_up()
    log = pair.link("vm").tracking.retained
    assert log.resident_limit == limit
    await wait_until(lambda: log.resident <= limit, what="the retained writes spilled down to the limit")
    assert log.nbytes > 4 * limit and log._cold > 0
    resyncs_before = pair.repl.status("vm")["resyncs"]

    await pair.kill_secondary()
    await _write(pair, rng, img, 30)  # the primary goes on alone
    from colofs.core import Store

    pair.secondary = await Store.open(pair.sdir, role="secondary")
    await pair.start_secondary(port=port)
    res = await pair.link("vm").replicate_checkpoint()
    assert res.seq == pair.primary.vm("vm").state.last_applied
    await pair.assert_identical()
    st = pair.repl.status("vm")
    assert st["resyncs"] == resyncs_before and st["stream_breaks"] == 0, "resumed from the retained writes"
    assert not repl_errors()


async def test_a_log_that_cannot_spill_keeps_its_writes_in_memory(tmp_path, caplog) -> None:
    """A spill file that cannot be made (here: no such directory) never fails replication."""
    log = RetainedLog(1, spill_dir=str(tmp_path / "gone"), resident_limit=4 * 4096)
    writes = _writes(1, 16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run_spill)
        for w in writes:
            log.append(w)
            log.mark_sent(w.seq)
        await wait_until(lambda: "cannot spill" in caplog.text, what="the spill failure logged")
        assert log.resident == log.nbytes == 16 * 4096 and log._cold == 0
        log.append(_writes(17, 1)[0])  # appending goes on, and asks for no more spills
        assert [log.get(w.seq).data for w in writes] == [w.data for w in writes]
        nursery.cancel_scope.cancel()


async def test_a_lagging_link_keeps_at_most_eight_mib_of_retained_writes_in_memory(tmp_path) -> None:
    """With the default limit, writes not yet sent stay in memory only up to twice it: 8 MiB, not 16.

    A 1 MiB write's data is in the worker's memory once as the FUSE request's
    buffer; every MiB the log keeps beside it adds to the process's peak
    (bench/primary_memory.py).
    """
    log = RetainedLog(1, spill_dir=str(tmp_path))
    assert log.resident_limit == retained.RESIDENT_LIMIT
    writes = _writes(1, 32, size=MiB)  # a fill the link lags behind: nothing sent yet
    peak = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run_spill)
        for w in writes:
            log.append(w)
            await wait_until(lambda: log.resident <= 2 * log.resident_limit, what="the spill task within twice its limit")
            peak = max(peak, log.resident)
        assert log.nbytes == 32 * MiB and log.get(1).data == writes[0].data  # spilled, not lost
        nursery.cancel_scope.cancel()
    assert peak <= 8 * MiB
