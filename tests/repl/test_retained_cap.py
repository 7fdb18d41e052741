"""Writers wait for the retained log's spill once twice its resident limit is in memory.

The spill writes to the page cache in a thread; when the kernel slows that
down (a busy disk), writes kept coming in and piled up in memory behind it
(65 MiB in a primary worker's 1 MiB fill) until the 64 MiB flow-control
bound of unacknowledged writes held the writers back.
"""

from __future__ import annotations

import random
import socket
import threading

import trio
import trio.testing

from colofs.core.forward import ForwardedWrite
from colofs.repl import retained
from colofs.repl.retained import RetainedLog
from tests.repl.test_crash import SIZE
from tests.waiting import DEADLINE, wait_until

KiB = 1 << 10


class SlowSpill:
    """Holds every spill write in its thread until :meth:`release`."""

    def __init__(self, monkeypatch) -> None:
        self.started = threading.Event()
        self._release = threading.Event()
        self._real = retained._write_all
        monkeypatch.setattr(retained, "_write_all", self._write)

    def _write(self, fd: int, bufs: list, pos: int) -> None:
        self.started.set()
        self._release.wait(DEADLINE)
        self._real(fd, bufs, pos)

    def release(self) -> None:
        self._release.set()


async def test_a_writer_waits_while_a_spill_lags_and_goes_on_once_it_frees_memory(tmp_path, monkeypatch) -> None:
    limit = 64 * KiB
    slow = SlowSpill(monkeypatch)
    log = RetainedLog(1, spill_dir=str(tmp_path), resident_limit=limit)
    rng = random.Random(5)
    writes = [ForwardedWrite(s, "d", s * 4 * KiB, rng.randbytes(4 * KiB)) for s in range(1, 257)]  # 1 MiB
    done = 0
    peak = 0

    async def writer() -> None:
        nonlocal done, peak
        for w in writes:
            await log.wait_resident()  # as the sink does before each write (Tracking.wait_room)
            log.append(w)
            peak = max(peak, log.resident)
            done += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run_spill)
        await trio.testing.wait_all_tasks_blocked()  # the spill task runs, waiting for work
        nursery.start_soon(writer)
        try:
            await trio.to_thread.run_sync(slow.started.wait, DEADLINE)
            await trio.testing.wait_all_tasks_blocked()
            assert done < len(writes)  # held back by the spill, not by anything else
            assert log.resident <= log.resident_cap + 4 * KiB
        finally:
            slow.release()  # the thread ends whatever failed
        await wait_until(lambda: done == len(writes), what="every write appended once the spill went on")
        assert peak <= log.resident_cap + 4 * KiB
        assert [bytes(log.get(s).data) for s in (1, 128, 256)] == [writes[s - 1].data for s in (1, 128, 256)]
        nursery.cancel_scope.cancel()


async def test_a_log_without_a_spill_task_never_holds_a_writer_back(tmp_path) -> None:
    """Only the spill frees memory here: with no task to run it, writes stay in memory as before."""
    log = RetainedLog(1, spill_dir=str(tmp_path), resident_limit=4 * KiB)
    for s in range(1, 65):
        with trio.fail_after(DEADLINE):
            await log.wait_resident()
        log.append(ForwardedWrite(s, "d", 0, b"x" * 4 * KiB))
    assert log.resident == 64 * 4 * KiB


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_primary_vm_write_waits_for_the_spill_of_its_retained_writes(pair, monkeypatch) -> None:
    """Through the VM's forwarding sink, with no secondary to stream to (writes only retained)."""
    limit = 64 * KiB
    monkeypatch.setattr(retained, "RESIDENT_LIMIT", limit)
    slow = SlowSpill(monkeypatch)
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_primary(peer_port=_closed_port())
    await trio.testing.wait_all_tasks_blocked()  # the link's spill task runs
    log = pair.link("vm").tracking.retained
    disk = pair.primary.vm("vm").disk("d0")
    rng = random.Random(7)
    done = 0

    async def writer() -> None:
        nonlocal done
        for i in range(64):  # 1 MiB of 16 KiB writes
            await disk.write(i * 16 * KiB, rng.randbytes(16 * KiB))
            done += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        try:
            await trio.to_thread.run_sync(slow.started.wait, DEADLINE)
            await trio.testing.wait_all_tasks_blocked()
            assert done < 64
            assert log.resident <= log.resident_cap + 16 * KiB
        finally:
            slow.release()
    assert done == 64 and log.nbytes == 64 * 16 * KiB
