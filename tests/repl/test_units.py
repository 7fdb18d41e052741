"""The engine's bookkeeping on its own: dirty map segments, retained log, resume plans, digests."""

from __future__ import annotations

import os

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from colofs.core.forward import ForwardedWrite
from colofs.repl.dirty import DirtyMap
from colofs.repl.dirtyfile import bit_runs, decode_dirty, encode_bitmap, set_bits
from colofs.repl.errors import ReplError, ReplProtocolError
from colofs.repl.resync import chunk_runs, data_ranges, read_and_digest
from colofs.repl.retained import RetainedLog
from colofs.repl.session import plan_resume
from colofs.wire.messages import ATTACHED_NEEDS_FULL_SYNC, Attached


@given(st.lists(st.tuples(st.integers(0, 999), st.integers(1, 64)), max_size=30))
def test_set_bits_and_runs_match_a_set(spans: list[tuple[int, int]]) -> None:
    n = 1000
    bits = bytearray((n + 7) // 8)
    want: set[int] = set()
    for lo, length in spans:
        hi = min(n, lo + length)
        set_bits(bits, lo, hi)
        want.update(range(lo, hi))
    got: set[int] = set()
    prev_stop = -1
    for first, stop in bit_runs(bits, n):
        assert first > prev_stop  # maximal, sorted, disjoint runs
        got.update(range(first, stop))
        prev_stop = stop
    assert got == want


def test_dirty_segments_follow_checkpoints() -> None:
    d = DirtyMap(start_seq=1)
    d.add_disk("a", 64 * 4096, 4096)
    d.mark("a", 0, 100)  # seq 1..5 -> block 0
    d.cut(5)  # checkpoint marker after seq 5
    d.mark("a", 4096 * 3, 4096 * 2)  # blocks 3, 4 after it
    assert list(d.union()["a"].runs()) == [(0, 1), (3, 5)]
    assert list(d.union_since(5)["a"].runs()) == [(3, 5)]
    d.drop_through(4)  # a checkpoint before the cut frees nothing
    assert d.count() == 3
    d.drop_through(5)
    assert d.count() == 2 and d.since == 5
    d.mark_all("a")
    assert d.count() == 64


def test_bitmap_file_round_trip_and_damage() -> None:
    bits = bytearray(16)
    set_bits(bits, 3, 70)
    data = encode_bitmap(128, 4096, 42, bits)
    got = decode_dirty(data, 128, 4096)
    assert got is not None and got[0] == 42 and list(got[1].runs()) == [(3, 70)]
    assert decode_dirty(data, 129, 4096) is None
    assert decode_dirty(data[:-1] + bytes([data[-1] ^ 1]), 128, 4096) is None
    assert decode_dirty(b"junk", 128, 4096) is None


def _fw(seq: int, n: int = 10) -> ForwardedWrite:
    return ForwardedWrite(seq, "d", 0, b"x" * n)


def test_retained_log() -> None:
    r = RetainedLog(5)
    assert r.covers(5) and not r.covers(6) and r.end == 4
    for s in range(5, 2005):
        r.append(_fw(s))
    with pytest.raises(ValueError):
        r.append(_fw(3000))
    assert r.covers(5) and r.covers(2005) and not r.covers(4)
    assert r.get(1000).seq == 1000 and r.bytes_after(2000) == 40
    assert r.drop_through(1500) == 14960
    assert r.start == 1501 and r.get(1501).seq == 1501 and len(r) == 504
    r.drop_through(5000)
    assert len(r) == 0 and r.start == 5001 and r.nbytes == 0
    r.reset(7000)
    r.append(_fw(7000))
    assert r.end == 7000


def _att(la: int, lc: int, flags: int = 0, epoch: int = 1) -> Attached:
    return Attached("vm", epoch, la, lc, flags)


def test_resume_plans() -> None:
    kw = dict(vm="vm", epoch=1, last_applied=100, last_checkpoint=50, resync_needed=False)
    assert plan_resume(_att(80, 60), retained_from=51, **kw).stream_from == 81
    assert plan_resume(_att(100, 60), retained_from=51, **kw).stream_from == 101
    p = plan_resume(_att(80, 60), retained_from=90, **kw)
    assert p.stream_from is None and not p.full
    assert plan_resume(_att(80, 60), retained_from=None, **kw).stream_from is None
    assert plan_resume(_att(80, 60, ATTACHED_NEEDS_FULL_SYNC), retained_from=51, **kw).full
    assert plan_resume(_att(80, 40), retained_from=1, **kw).full  # behind our confirmed checkpoint
    assert plan_resume(_att(120, 60), retained_from=1, **kw).full  # ahead of us
    assert plan_resume(_att(80, 60), retained_from=51, **{**kw, "resync_needed": True}).stream_from is None
    with pytest.raises(ReplProtocolError, match="epoch"):
        plan_resume(_att(80, 60, epoch=2), retained_from=51, **kw)
    with pytest.raises(ReplError, match="cannot resume"):
        plan_resume(_att(150, 120), retained_from=51, **kw)


def test_chunking_and_digests(tmp_path) -> None:
    assert chunk_runs([(0, 3), (5, 6), (100, 1100)], 512, gap=8) == [(0, 6), (100, 512), (612, 488)]
    path = os.path.join(tmp_path, "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 1 << 20)
        os.pwrite(fd, b"data" * 1024, 512 << 10)
        ranges = data_ranges(fd, 0, 1 << 20)
        assert all(lo <= 512 << 10 < hi for lo, hi in ranges) or ranges == [(0, 1 << 20)]
        digests, buf = read_and_digest(fd, (1 << 20) - 512, 4096, 120, 136)
        assert len(digests) == 136 and len(buf) == 136 * 4096 - 512
        zero = xxhash.xxh3_64_intdigest
        assert digests[0] == zero(bytes(4096)) and digests[-1] == zero(bytes(3584))
        assert digests[8] != zero(bytes(4096)) and buf[8 * 4096 : 8 * 4096 + 4] == b"data"
    finally:
        os.close(fd)


def test_retained_log_frees_dropped_writes_at_once() -> None:
    """A dropped write's data must not stay referenced until the list is next compacted."""
    import weakref

    class Data(bytearray):
        pass

    r = RetainedLog(1)
    refs = []
    for s in range(1, 11):
        d = Data(b"y" * 100)
        refs.append(weakref.ref(d))
        r.append(ForwardedWrite(s, "d", 0, d))
        del d
    assert r.drop_through(4) == 400 and r.nbytes == 600
    assert [ref() is None for ref in refs] == [True] * 4 + [False] * 6
    assert r.start == 5 and r.get(5).seq == 5 and r.bytes_after(7) == 300
    r.drop_through(3)  # nothing older left: a no-op
    assert r.start == 5 and r.nbytes == 600
