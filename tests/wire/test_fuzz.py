"""Fuzzing: whatever bytes arrive, decoding yields messages or a ProtocolError, never anything else."""

from __future__ import annotations

import struct

import lz4.block
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colofs.wire import (
    ConnectionClosed,
    FrameDecoder,
    Message,
    MessageType,
    Ping,
    ProtocolError,
    TruncatedFrame,
    decode_message,
    encode_frame,
)

from .test_messages import any_message

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL_LIMITS = {"max_wire_len": 4096, "max_raw_len": 8192}


def reseal(frame: bytes) -> bytes:
    """Recompute the digest so a mutated frame reaches the payload decoders."""
    return (
        frame[:16]
        + struct.pack("<Q", xxhash.xxh3_64_intdigest(frame[:16] + frame[24:]))
        + frame[24:]
    )


def feed_everything(data: bytes, cuts: list[int]) -> tuple[list[Message], ProtocolError]:
    """Feed ``data`` in pieces, then EOF; the decoder must end in a ProtocolError.

    Any exception other than a ProtocolError propagates and fails the test.
    """
    decoder = FrameDecoder(**SMALL_LIMITS)
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    out: list[Message] = []
    try:
        for a, b in zip(points, points[1:], strict=False):
            decoder.feed(data[a:b])
            while (msg := decoder.next_message()) is not None:
                assert isinstance(msg, Message)
                out.append(msg)
        decoder.feed_eof()
    except ProtocolError as exc:
        return out, exc
    raise AssertionError("feed_eof() returned")  # pragma: no cover


@st.composite
def mutated_frames(draw: st.DrawFn) -> tuple[list[Message], bytes, bool]:
    """Valid frames, then byte flips, truncation, extension, splices; optionally resealed."""
    msgs = draw(st.lists(any_message, min_size=1, max_size=3))
    data = bytearray(
        b"".join(encode_frame(m, draw(st.sampled_from([None, True, False]))) for m in msgs)
    )
    original = bytes(data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "delete"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=40))
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i : i + draw(st.integers(1, 8))]
    resealed = draw(st.booleans())
    if resealed and len(data) >= 24:
        data = bytearray(reseal(bytes(data)))
    return msgs, bytes(data), bytes(data) == original


@FUZZ
@given(case=mutated_frames(), cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_mutated_frames_only_protocol_errors(
    case: tuple[list[Message], bytes, bool], cuts: list[int]
) -> None:
    msgs, data, untouched = case
    out, end = feed_everything(data, cuts)
    if untouched:
        assert out == msgs
        assert isinstance(end, ConnectionClosed) and not isinstance(end, TruncatedFrame)
    else:
        # Whatever decoded is a prefix of what was sent or a valid message in its own right.
        assert all(isinstance(m, Message) for m in out)


@FUZZ
@given(
    prefix=st.sampled_from([b"", b"C", b"COLF", b"COLF\x01"]),
    mtype=st.integers(0, 20),
    rest=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 300), max_size=4),
)
def test_random_bytes_only_protocol_errors(
    prefix: bytes, mtype: int, rest: bytes, cuts: list[int]
) -> None:
    data = prefix + (bytes([mtype]) if len(prefix) == 5 else b"") + rest
    feed_everything(data, cuts)


@st.composite
def sealed_garbage(draw: st.DrawFn) -> bytes:
    """Well-formed headers with a correct digest around arbitrary (maybe lz4) payloads."""
    mtype = draw(st.sampled_from(list(MessageType)))
    payload = draw(st.binary(max_size=300))
    kind = draw(st.sampled_from(["plain", "plain", "lz4", "lz4-bad-size", "fake-lz4"]))
    if kind.startswith("lz4"):  # a genuine lz4 block: garbage reaches the message decoder
        raw = payload + bytes(draw(st.integers(1, 300)))
        packed = lz4.block.compress(raw, store_size=False)
        raw_len = len(raw)
        if kind == "lz4-bad-size":
            raw_len += draw(st.sampled_from([-1, 1, 1000]))
        flags, payload = 1, packed
    elif kind == "fake-lz4":  # random bytes claimed to be lz4
        flags, raw_len = 1, draw(st.integers(0, 9000))
    else:
        flags, raw_len = 0, len(payload)
    prefix = struct.pack("<4sBBHII", b"COLF", 1, mtype, flags, len(payload), raw_len)
    return prefix + struct.pack("<Q", xxhash.xxh3_64_intdigest(prefix + payload)) + payload


@FUZZ
@given(data=sealed_garbage(), cuts=st.lists(st.integers(0, 700), max_size=4))
def test_sealed_garbage_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    feed_everything(data, cuts)


@settings(max_examples=1000, deadline=None)
@given(
    mtype=st.one_of(st.sampled_from(list(MessageType)), st.integers(0, 255)),
    payload=st.binary(max_size=120),
)
def test_decode_message_random_payloads(mtype: int, payload: bytes) -> None:
    try:
        msg = decode_message(mtype, payload)
    except ProtocolError:
        return
    # Anything accepted is canonical: encoding it again gives the very same bytes.
    assert msg.TYPE == mtype
    assert msg.encode() == payload


@settings(max_examples=600, deadline=None)
@given(msg=any_message, data=st.data())
def test_decode_message_mutated_payloads(msg: Message, data: st.DataObject) -> None:
    payload = bytearray(msg.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        if payload and data.draw(st.booleans()):
            payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
        else:
            i = data.draw(st.integers(0, len(payload)))
            payload[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    try:
        decoded = decode_message(msg.TYPE, bytes(payload))
    except ProtocolError:
        return
    assert decoded.encode() == bytes(payload)


def test_fuzz_budget_is_at_least_500_examples() -> None:
    assert FUZZ.max_examples >= 500


@pytest.mark.parametrize("n", range(0, 24))
def test_every_header_prefix_then_eof(n: int) -> None:
    frame = encode_frame(Ping(1))
    out, end = feed_everything(frame[:n], [])
    assert out == []
    assert isinstance(end, ConnectionClosed if n == 0 else TruncatedFrame)
