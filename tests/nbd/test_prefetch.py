"""Pipelined reads are hinted to the kernel before they are served: the right file, never the wrong bytes.

A round of several reads first asks the kernel to read ahead what each will
read (``posix_fadvise(WILLNEED)``), so misses overlap on the device. These
tests pin where the hints go (active, hidden, base; none for blocks recorded
as zeros), that a lone read gets none, and that reads pipelined with writes
in the same round still see the writes before them and the SVM's view, not
the primary's newer base.
"""

from __future__ import annotations

import os

import pytest

from colofs.core import layers
from colofs.nbd import protocol as p
from colofs.nbd.inflight import prefetch_reads
from tests.nbd.conftest import SIZE


@pytest.fixture
def hints(monkeypatch) -> list[tuple[int, int, int]]:
    """Every WILLNEED hint the read path gives, as (fd, offset, length); still given for real."""
    seen: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            seen.append((fd, offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(layers.os, "posix_fadvise", record)
    return seen


async def _layered(s) -> tuple[object, int, dict[int, bytes]]:
    """A secondary disk whose blocks sit in every layer; the SVM's view of blocks 0..7."""
    disk = s.store.disk("vm", "d")
    vm = s.store.vm("vm")
    bs = disk.block_size
    await disk.apply([(0, b"o" * (8 * bs))])  # the primary's image, then a checkpoint: base holds it
    await vm.checkpoint()
    await disk.apply([(1 * bs, b"N" * bs), (2 * bs, b"M" * bs)])  # primary writes: hidden keeps "o", base the new
    await disk.write(3 * bs, b"A" * bs)  # the SVM's own write: active
    await disk.apply([(7 * bs, b"Z" * bs)])
    view = {0: b"o", 1: b"o", 2: b"o", 3: b"A", 4: b"o", 5: b"o", 6: b"o", 7: b"o"}
    assert 1 in disk.hidden.map and 3 in disk.active.map and 0 not in disk.hidden.map
    return disk, bs, {b: c * bs for b, c in view.items()}


async def test_pipelined_reads_are_hinted_in_the_layer_that_holds_each_block(serve, hints) -> None:
    s = await serve("secondary")
    disk, bs, view = await _layered(s)
    c = await s.connect()
    burst = b""
    for b in range(8):
        burst += p.pack_request(p.CMD_READ, b + 1, b * bs, bs)
        c.reads[b + 1] = bs
    await c.send(burst)
    got = {r.cookie - 1: r for r in [await c.reply() for _ in range(8)]}
    assert all(r.error == 0 for r in got.values())
    assert {b: r.data for b, r in got.items()} == view  # hidden's old bytes, active's, base's: the SVM's view
    where = {(fd, off) for fd, off, _ in hints}
    assert (disk.hidden.fd, disk.hidden.map[1]) in where  # a block kept in hidden: hidden's copy, not base
    assert (disk.active.fd, disk.active.map[3]) in where
    assert (disk.base_fd, 0) in where and (disk.base_fd, 4 * bs) in where
    assert (disk.base_fd, 1 * bs) not in where  # base holds the primary's newer block 1: not what is read
    assert all(off < SIZE for _, off, _ in hints)


async def test_blocks_recorded_as_zeros_and_lone_reads_get_no_hint(serve, hints) -> None:
    s = await serve("secondary")
    disk = s.store.disk("vm", "d")
    bs = disk.block_size
    await disk.apply([(2 * bs, b"P" * bs)])  # base was a hole: hidden records block 2 as zeros
    assert disk.hidden.map[2] == layers.ZERO_AT
    c = await s.connect()
    assert await c.read(2 * bs, bs) == bytes(bs)
    assert hints == []  # one read in the round: nothing to overlap, no hint
    burst = b""
    for cookie, b in ((1, 2), (2, 3)):
        burst += p.pack_request(p.CMD_READ, cookie, b * bs, bs)
        c.reads[cookie] = bs
    await c.send(burst)
    got = sorted([await c.reply() for _ in range(2)], key=lambda r: r.cookie)
    assert [r.data for r in got] == [bytes(bs), bytes(bs)]
    assert [(fd, off) for fd, off, _ in hints] == [(disk.base_fd, 3 * bs)]  # not block 2: zeros are not read


async def test_a_read_after_a_write_in_the_same_round_sees_the_write(serve, hints) -> None:
    """The hints are given before the round's writes; the reads are still served after them, in order."""
    s = await serve("secondary")
    disk, bs, view = await _layered(s)
    c = await s.connect()
    burst = p.pack_request(p.CMD_READ, 1, 1 * bs, bs)
    burst += p.pack_request(p.CMD_WRITE, 2, 1 * bs, bs) + b"w" * bs
    burst += p.pack_request(p.CMD_READ, 3, 1 * bs, bs)
    burst += p.pack_request(p.CMD_READ, 4, 4 * bs, bs)
    for cookie in (1, 3, 4):
        c.reads[cookie] = bs
    await c.send(burst)
    got = {r.cookie: r for r in [await c.reply() for _ in range(4)]}
    assert all(r.error == 0 for r in got.values())
    assert got[1].data == view[1]  # before the write: hidden's copy
    assert got[3].data == b"w" * bs  # after it: the write, though its hint pointed at hidden
    assert got[4].data == view[4]
    assert (disk.hidden.fd, disk.hidden.map[1]) in {(fd, off) for fd, off, _ in hints}
    assert bytes(await disk.read(bs, bs)) == b"w" * bs


def test_the_round_scan_skips_write_payloads_and_stops_at_a_bad_magic() -> None:
    """Hints come from complete read headers only; a payload that looks like a header is not one."""

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[int, int]] = []

        def prefetch(self, offset: int, length: int) -> int:
            self.calls.append((offset, length))
            return 1

    fake = p.pack_request(p.CMD_READ, 9, 999 * 4096, 4096)  # inside a write's payload
    buf = bytearray(p.pack_request(p.CMD_READ, 1, 0, 4096)
                    + p.pack_request(p.CMD_WRITE, 2, 4096, len(fake)) + fake
                    + p.pack_request(p.CMD_READ, 3, 8192, 4096)
                    + p.pack_request(p.CMD_READ, 4, 12288, 4096)[:20])  # incomplete: not yet a request
    r = Recorder()
    assert prefetch_reads(r, buf) == 2
    assert r.calls == [(0, 4096), (8192, 4096)]
    r2 = Recorder()
    bad = bytearray(p.pack_request(p.CMD_READ, 1, 0, 4096) + b"\0" * 28 + p.pack_request(p.CMD_READ, 3, 0, 4096))
    assert prefetch_reads(r2, bad) == 0 and r2.calls == []  # one read before the bad magic

