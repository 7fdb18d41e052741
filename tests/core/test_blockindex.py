"""The compact block map: the same answers as a dict, through merges, removals and a log reopen."""

from __future__ import annotations

import random
import tracemalloc
from array import array

import pytest

from colofs.core.blockindex import BlockIndex
from colofs.core.blocklog import BlockLog
from colofs.core.logformat import ZERO_AT

BS = 4096


def check_same(ix: BlockIndex, ref: dict[int, int], sums: dict[int, int] | None = None) -> None:
    assert len(ix) == len(ref)
    assert bool(ix) == bool(ref)
    assert list(ix) == sorted(ref)
    assert dict(ix.items()) == ref
    for b in list(ref)[:500]:
        assert b in ix
        assert ix.get(b) == ref[b]
        assert ix[b] == ref[b]
    if sums is not None:
        assert ix.digests is not None
        assert set(ix.digests) == set(sums)
        for b in list(ref)[:500]:
            assert ix.digests.get(b) == sums.get(b)


def test_insert_overwrite_drop_match_a_dict() -> None:
    rng = random.Random(5)
    ix = BlockIndex(keep_digests=True, unit=BS)
    ref: dict[int, int] = {}
    sums: dict[int, int] = {}
    for step in range(20000):
        b = rng.randrange(5000)
        op = rng.random()
        if op < 0.6:
            off = rng.randrange(1, 1 << 40) * BS
            s = rng.getrandbits(64)
            ix.put(b, off, s)
            ref[b], sums[b] = off, s
        elif op < 0.7:
            ix.put(b, ZERO_AT)
            ref[b] = ZERO_AT
            sums.pop(b, None)
        else:
            assert ix.pop(b) == ref.pop(b, None)
            sums.pop(b, None)
        assert (b in ix) == (b in ref)
        if step % 2500 == 0:
            check_same(ix, ref, sums)
    check_same(ix, ref, sums)
    for b in range(0, 5000, 7):
        assert ix.get(b, 17) == ref.get(b, 17)
        assert ix.digests.get(b) == sums.get(b)
    assert 99999 not in ix and ix.get(99999) is None


@pytest.mark.parametrize("unit", [BS, 1])  # the logs' layout (relative offsets repeat), and any other
def test_batches_and_ranges(unit: int) -> None:
    ix = BlockIndex(keep_digests=True, unit=unit)
    # A sequential ingest: contiguous runs appended at contiguous offsets.
    off = BS
    for first in range(0, 200192, 256):
        blocks = range(first, first + 256)
        ix.put_many(blocks, range(off, off + 256 * BS, BS), list(blocks))
        off += 256 * BS
    assert len(ix) == 200192
    assert ix.run_at(1000, 256, BS) == BS + 1000 * BS
    assert ix.run_at(200182, 10, BS) == BS + 200182 * BS
    assert ix.run_at(200182, 11, BS) is None  # runs past the end
    assert ix.digests.run(500, 4) == [500, 501, 502, 503]
    assert ix.keys().isdisjoint(range(200192, 300000))
    assert not ix.keys().isdisjoint(range(200191, 300000))
    # A hole and a block moved elsewhere break the run; a fresh block beyond is found in the recent part.
    ix.pop(1100)
    assert ix.run_at(1000, 256, BS) is None
    assert ix.run_at(1000, 100, BS) == BS + 1000 * BS
    assert ix.digests.run(1099, 3) == [1099, None, 1101]
    ix.put(1050, 7 * BS, 1)
    assert ix.run_at(1000, 100, BS) is None
    ix.put_many(range(300000, 300004), range(BS, 5 * BS, BS), [9, 9, 9, 9])
    assert ix.run_at(300000, 4, BS) == BS
    assert not ix.keys().isdisjoint(range(299000, 300001))
    ix.pop(300000)
    assert ix.keys().isdisjoint(range(299000, 300001))
    assert ix.keys().isdisjoint(range(1100, 1101))
    # A list of consecutive blocks goes in as a run, also between blocks already here, and over some of them.
    ix.put_many(list(range(200500, 200900)), range(BS, 401 * BS, BS), list(range(400)))
    assert ix.run_at(200500, 400, BS) == BS and ix.digests.run(200898, 2) == [398, 399]
    ix.put_many(list(range(200400, 200600)), range(BS, 201 * BS, BS))
    assert ix.run_at(200400, 200, BS) == BS and ix.get(200600) == 101 * BS
    assert ix.digests.get(200450) is None and ix.digests.get(200600) == 100
    # Everything removed: empty, and iteration after the compaction shows it.
    for b in list(ix):
        ix.pop(b)
    assert not ix and len(ix) == 0 and list(ix) == []
    assert ix.keys().isdisjoint(range(0, 1 << 20))


def _traced(build):  # the bytes a structure holds once built (tracemalloc: memory, not time)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        return kept, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_many_entries_are_compact() -> None:
    n = 262144  # 1 GiB of 4 KiB blocks in hidden
    rng = random.Random(2)
    blocks = rng.sample(range(1 << 28), n)  # spread over a 1 TiB disk: nothing to share between neighbours
    digests = [rng.getrandbits(64) for _ in range(n)]

    def build_index() -> BlockIndex:
        ix = BlockIndex(keep_digests=True)
        for i in range(0, n, 1024):
            ix.put_many(blocks[i : i + 1024], range(BS * (i + 1), BS * (i + 1025), BS), digests[i : i + 1024])
        return ix

    def build_dicts() -> tuple[dict[int, int], dict[int, int]]:
        # What a log held before: block -> offset and block -> digest, with fresh int objects (as decoded).
        keys = [b + 0 for b in array("Q", blocks)]
        return dict(zip(keys, range(BS << 20, (BS << 20) + n * BS, BS), strict=True)), dict(
            zip(keys, array("Q", digests), strict=True))

    ix, ix_bytes = _traced(build_index)
    _, dict_bytes = _traced(build_dicts)
    assert len(ix) == n
    assert ix.nbytes() / n <= 28  # block, offset and digest: 24 bytes, plus the arrays' spare room
    assert ix_bytes / n <= 32  # and the chunks' own objects
    assert ix_bytes * 4 < dict_bytes


def test_a_log_reopened_has_the_same_map(tmp_path) -> None:
    path = str(tmp_path / "hidden.log")
    log = BlockLog.create(path, BS, 1, mutable=False, label="t")
    rng = random.Random(3)
    ref: dict[int, bytes] = {}
    for _ in range(40):
        blocks = sorted(rng.sample(range(3000), 60))
        data = [rng.randbytes(BS) for _ in blocks]
        zeros = [b for b in rng.sample(range(3000), 5) if b not in blocks]
        log.append(blocks, data, zeros)
        ref.update(zip(blocks, data, strict=True))
        ref.update(dict.fromkeys(zeros, bytes(BS)))
        gone = rng.sample(sorted(ref), 10)
        log.drop(gone)
        for b in gone:
            del ref[b]
    expect = dict(log.map.items())
    expect_sums = {b: log.sums.get(b) for b in log.sums}
    end = log.end
    log.close()
    again = BlockLog.open(path, BS, 1, mutable=False, label="t", expected_len=end, verify_data=True, headed=True)
    try:
        assert dict(again.map.items()) == expect
        assert {b: again.sums.get(b) for b in again.sums} == expect_sums
        assert list(again.map) == sorted(ref)
        for b, want in ref.items():
            off = again.map[b]
            if off == ZERO_AT:
                assert want == bytes(BS)
                continue
            got = memoryview(bytearray(BS))
            import os

            assert os.preadv(again.fd, [got], off) == BS
            assert bytes(got) == want
            again.verify(b, got)
    finally:
        again.close()


def test_absent_blocks_of_a_run_and_of_a_scatter() -> None:
    ix = BlockIndex(keep_digests=True, unit=BS)
    ix.put_many(range(100, 400), range(BS, 301 * BS, BS), list(range(300)))
    ix.pop(250)
    assert ix.absent(list(range(400, 600))) == list(range(400, 600))  # a run beyond: no look per block
    assert ix.absent(range(50, 150)) == list(range(50, 100))
    assert ix.absent([249, 250, 251]) == [250]
    assert ix.absent([399, 5, 100, 7]) == [5, 7]
    assert ix.absent([]) == []
