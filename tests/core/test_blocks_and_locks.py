"""The shared block arithmetic and the ``async with`` forms of the range lock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from colofs.core.blocks import block_count, block_size_ok, block_span, check_block_size, check_range
from colofs.core.errors import BadArgument, BadRange
from colofs.core.rangelock import RangeLock, holding


def test_block_span_covers_first_to_last_touched_block():
    assert block_span(0, 1, 12) == (0, 1)
    assert block_span(4095, 2, 12) == (0, 2)
    assert block_span(4096, 4096, 12) == (1, 2)
    assert block_span(4096, 4097, 12) == (1, 3)
    assert block_count(0, 12) == 0
    assert block_count(4097, 12) == 2


def test_range_and_block_size_rules():
    check_range("d", 100, 0, 100)
    with pytest.raises(BadRange, match="d: 2 bytes at 99 end past the disk's size of 100"):
        check_range("d", 100, 99, 2, "the disk's size")
    with pytest.raises(BadRange, match="negative"):
        check_range("d", 100, -1, 1)
    assert [bs for bs in (0, 256, 512, 1000, 4096, 1 << 20, 1 << 21) if block_size_ok(bs)] == [512, 4096, 1 << 20]
    with pytest.raises(BadArgument, match="power of two from 512 to 1048576, not 3000"):
        check_block_size("vm/d", 3000)


async def test_range_is_released_when_the_body_raises():
    lock = RangeLock()
    with pytest.raises(KeyError):
        async with lock.range(0, 4, exclusive=True):
            assert lock.held() == 1
            raise KeyError
    assert lock.held() == 0
    async with lock.spans([(0, 1), (5, 6)], exclusive=False):
        assert lock.try_acquire(2, 5, True) is not None  # between the spans: free
        assert lock.try_acquire(5, 6, True) is None


async def test_holding_takes_all_and_a_conflicting_request_waits_for_the_release():
    a, b = RangeLock(), RangeLock()
    got = trio.Event()

    async def contender() -> None:
        async with b.range(3, 4, exclusive=False):
            got.set()

    async with trio.open_nursery() as nursery:
        async with holding([(a, 0, 10), (b, 0, 10)]):
            assert a.held() == b.held() == 1
            nursery.start_soon(contender)
            await trio.testing.wait_all_tasks_blocked()
            assert not got.is_set()
        await got.wait()
    assert a.held() == b.held() == 0
