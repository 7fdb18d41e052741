"""A decoded BATCH's writes share one buffer per frame instead of a copy each, and survive the next frame."""

from __future__ import annotations

import os

import pytest

from colofs.wire.frames import FrameDecoder, encode_frame
from colofs.wire.messages import Batch, Write


def batch(seq: int, n: int) -> Batch:
    """Writes half random, half zeros: compressible, as guest data is."""
    return Batch(seq, tuple(Write(0, i * 4096, os.urandom(2048) + bytes(2048)) for i in range(n)))


@pytest.mark.parametrize("compress", [True, False])
def test_writes_share_one_buffer_and_outlive_the_receive_buffer(compress: bool) -> None:
    first, second = batch(1, 64), batch(65, 64)
    decoder = FrameDecoder()
    decoder.feed(encode_frame(first, compress=compress))
    got = decoder.next_message()
    # The next frame reuses and overwrites the decoder's buffer: the first batch's writes must not change.
    decoder.feed(encode_frame(second, compress=compress))
    got2 = decoder.next_message()
    assert got == first and got2 == second
    assert isinstance(got, Batch)
    owners = {id(memoryview(w.data).obj) for w in got.writes}
    assert len(owners) == 1  # one buffer for the frame, not 64 copies
    assert all(isinstance(memoryview(w.data).obj, bytes) for w in got.writes)  # immutable: nothing can change it
