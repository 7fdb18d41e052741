"""The sparse dirty-block set: same answers as a plain set, memory that follows the marks, files old and new."""

from __future__ import annotations

import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from colofs.repl.blockset import CHUNK, BlockSet
from colofs.repl.dirty import DirtyMap
from colofs.repl.dirtyfile import decode_dirty, encode_bitmap, encode_dirty, set_bits

TiB = 1 << 40

# Spans near chunk edges and the (short) last chunk are where a two-level set can go wrong.
NBLOCKS = 5 * CHUNK + 37
_edge = st.sampled_from([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK - 1, 5 * CHUNK, NBLOCKS - 1])
_start = st.one_of(st.integers(0, NBLOCKS - 1), _edge)
_length = st.one_of(st.integers(1, 8), st.integers(1, 3 * CHUNK), st.just(CHUNK))
_op = st.one_of(
    st.tuples(st.just("add"), _start, _length),
    st.tuples(st.just("all"), st.just(0), st.just(0)),
    st.tuples(st.just("merge"), _start, _length),
)


def _runs_of(model: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for b in sorted(model):
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], b + 1)
        else:
            out.append((b, b + 1))
    return out


def _check(bs: BlockSet, model: set[int], nblocks: int) -> None:
    assert bs.count() == len(model)
    assert bool(bs) == bool(model)
    assert list(bs.runs()) == _runs_of(model)
    for b in (0, CHUNK - 1, CHUNK, nblocks - 1, nblocks):
        assert (b in bs) == (b in model)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=25), st.sampled_from([NBLOCKS, 4 * CHUNK, CHUNK + 1, 3]))
def test_blockset_matches_a_plain_set(ops: list[tuple[str, int, int]], nblocks: int) -> None:
    """Also with a last chunk that is whole, and with disks smaller than a chunk."""
    bs = BlockSet(nblocks)
    model: set[int] = set()
    for kind, first, length in ops:
        stop = first + length
        if kind == "add":
            bs.add(first, stop)
            model.update(range(first, min(stop, nblocks)))
        elif kind == "all":
            bs.add_all()
            model = set(range(nblocks))
        else:  # union with another set, through a copy
            other = BlockSet(nblocks)
            other.add(first, stop)
            before = bs.copy()
            was = list(before.runs())
            bs.update(other)
            model.update(range(first, min(stop, nblocks)))
            assert list(before.runs()) == was  # a copy shares nothing with the original
        _check(bs, model, nblocks)
    # The file round trip gives the same set, and so does a flat bitmap of it (the old format).
    got = decode_dirty(encode_dirty(bs, 4096, 9), nblocks, 4096)
    assert got is not None and got[0] == 9 and got[1] == bs
    flat = bytearray((nblocks + 7) // 8)
    for lo, hi in _runs_of(model):
        set_bits(flat, lo, hi)
    assert BlockSet.from_bitmap(flat, nblocks) == bs


def test_a_whole_chunk_becomes_a_run_and_runs_merge() -> None:
    bs = BlockSet(4 * CHUNK)
    for b in range(CHUNK):  # block by block, as 4 KiB writes would
        bs.add(CHUNK + b, CHUNK + b + 1)
    bs.add(2 * CHUNK, 3 * CHUNK)
    assert bs.chunk_runs() == [(1, 3)] and bs.parts() == []
    bs.add(CHUNK - 1, CHUNK)
    assert list(bs.runs()) == [(CHUNK - 1, 3 * CHUNK)]


def test_old_flat_bitmap_files_are_read_and_damage_is_refused() -> None:
    n = 3 * CHUNK + 5
    flat = bytearray((n + 7) // 8)
    set_bits(flat, 3, 70)
    set_bits(flat, CHUNK, 3 * CHUNK + 5)
    old = encode_bitmap(n, 4096, 42, flat)
    got = decode_dirty(old, n, 4096)
    assert got is not None and got[0] == 42
    assert list(got[1].runs()) == [(3, 70), (CHUNK, n)]
    new = encode_dirty(got[1], 4096, 42)
    assert decode_dirty(new, n, 4096) == got
    for bad in (new[:-1] + bytes([new[-1] ^ 1]), new.replace(b"DIRTY 2", b"DIRTY 7"), new[:40]):
        assert decode_dirty(bad, n, 4096) is None
    assert decode_dirty(new, n + 1, 4096) is None and decode_dirty(new, n, 512) is None


def test_a_full_sync_of_a_1tib_disk_is_a_small_set_and_a_small_file() -> None:
    nblocks = TiB // 4096
    bs = BlockSet(nblocks)
    bs.add_all()
    assert bs.count() == nblocks and list(bs.runs()) == [(0, nblocks)]
    assert len(encode_dirty(bs, 4096, 0)) < 200


def _traced(fn) -> int:
    """Peak bytes Python allocated while ``fn`` ran (what it keeps and what it used on the way)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        keep = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
        del keep
    finally:
        tracemalloc.stop()
    return peak


def test_dirty_map_of_1tib_disks_costs_what_was_written_not_the_disk_size() -> None:
    """Eight 1 TiB disks: a full sync, 8 MiB of scattered writes, the union and the file, all in little memory."""

    def work() -> DirtyMap:
        d = DirtyMap(start_seq=1)
        for i in range(8):
            d.add_disk(f"d{i}", TiB, 4096)
        d.mark_all("d0")  # a full sync of one disk
        for i in range(8):  # 8 MiB per disk in 64 KiB writes, 1 GiB apart
            for k in range(128):
                d.mark(f"d{i}", (k << 30) + 4096 * i, 64 << 10)
        d.cut(100)
        d.mark("d1", 12345 * 4096, 4096)
        union = d.union()
        assert union["d0"].count() == TiB // 4096
        assert d.count() == TiB // 4096 + 7 * 128 * 16 + 1
        for blocks in union.values():
            encode_dirty(blocks, 4096, 100)
        del union
        return d

    peak = _traced(work)
    # A flat bitmap is 32 MiB per TiB; this is ~1000 touched chunks.
    assert peak < 4 << 20, f"{peak} bytes at the peak"
