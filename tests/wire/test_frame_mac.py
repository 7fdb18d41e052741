"""Frames after the handshake: session keys, and a MAC that refuses altered, replayed,
reordered, dropped, spliced and stripped frames."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import pytest
import trio
import trio.testing
import xxhash

from colofs.repl.framing import FrameSender
from colofs.wire import (
    Ack,
    BadMac,
    Batch,
    FrameDecoder,
    FrameMac,
    FrameWriter,
    Message,
    Ping,
    Write,
    decode_message,
    derive_session_keys,
    encode_frame,
)
from colofs.wire.frames import FLAG_MAC, HEADER_LEN
from colofs.wire.mac import TAG_LEN, hkdf_sha256

from .test_auth import KEY, run_pair

NONCE_I = bytes(range(32))
NONCE_R = bytes(range(32, 64))


def keys(initiator: bool, nonce_r: bytes = NONCE_R):
    return derive_session_keys(KEY, NONCE_I, nonce_r, "pvm", "svm", initiator=initiator)


class Capture(trio.abc.SendStream):
    """A send stream that keeps each send_all as one piece (one frame for small frames)."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.pieces.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def sealed(msgs: list[Message], send_key: bytes | None = None) -> list[bytes]:
    """The frames an authenticated initiator sends for ``msgs``, one bytes object each."""
    capture = Capture()
    writer = FrameWriter(capture, max_wire_len=1 << 20, max_raw_len=1 << 20)
    writer.require_mac(FrameMac(send_key or keys(True).send))

    async def run() -> None:
        for m in msgs:
            await writer.write(writer.encode(m))

    trio.run(run)
    assert len(capture.pieces) == len(msgs)
    return capture.pieces


def receiver() -> FrameDecoder:
    decoder = FrameDecoder()
    decoder.require_mac(FrameMac(keys(False).receive))
    return decoder


def feed_all(decoder: FrameDecoder, frames: list[bytes]) -> list[Message]:
    out = []
    for f in frames:
        decoder.feed(f)
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    return out


MSGS = [Batch(1, (Write(0, 0, b"A" * 4096),)), Batch(2, (Write(0, 4096, b"B" * 4096),)), Ping(7)]


# ----------------------------------------------------------------- keys


def test_hkdf_matches_rfc5869_test_case_1() -> None:
    ikm = bytes([0x0B] * 22)
    salt = bytes(range(13))
    info = bytes(range(0xF0, 0xFA))
    okm = hkdf_sha256(ikm, salt, info, 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_both_sides_agree_and_directions_differ() -> None:
    i, r = keys(True), keys(False)
    assert (i.send, i.receive) == (r.receive, r.send)
    assert i.send != i.receive
    assert keys(True, nonce_r=bytes(32)).send != i.send  # a fresh nonce, fresh keys
    other = derive_session_keys(KEY, NONCE_I, NONCE_R, "pvm", "svm2", initiator=True)
    assert other.send != i.send  # bound to the node ids


def test_tag_is_hmac_sha256_over_payload_header_counter() -> None:
    """The layout as documented, computed independently of the encoder."""
    frames = sealed([Ping(1), Ping(2)])
    for counter, frame in enumerate(frames):
        header, payload, tag = frame[:HEADER_LEN], frame[HEADER_LEN:-TAG_LEN], frame[-TAG_LEN:]
        assert struct.unpack_from("<H", header, 6)[0] & FLAG_MAC
        expected = hmac.new(keys(True).send, payload + header + struct.pack("<Q", counter),
                            hashlib.sha256).digest()[:TAG_LEN]
        assert tag == expected


# ----------------------------------------------------------------- refusals


def test_in_order_frames_are_accepted() -> None:
    assert feed_all(receiver(), sealed(MSGS)) == MSGS


def recompute_digest(frame: bytearray) -> None:
    """What anyone on the path can do: the xxh3 digest has no key."""
    wire_len = struct.unpack_from("<I", frame, 8)[0]
    digest = xxhash.xxh3_64_intdigest(bytes(frame[:16]) + bytes(frame[HEADER_LEN : HEADER_LEN + wire_len]))
    struct.pack_into("<Q", frame, 16, digest)


@pytest.mark.parametrize("where", ["payload", "header", "tag"])
def test_tampered_frame_refused(where: str) -> None:
    """An attacker rewrites a BATCH's data (or its header, or the tag) and fixes the xxh3 digest."""
    msgs = [Ping(1), Batch(2, (Write(0, 4096, os.urandom(4096)),)), Ping(3)]
    frames = sealed(msgs)
    evil = bytearray(frames[1])
    if where == "payload":
        evil[-TAG_LEN - 100] ^= 0xFF  # one byte of the write's data
    elif where == "header":
        evil[5] = Ack.TYPE  # same length: retype the frame
    else:
        evil[-1] ^= 0x01
    recompute_digest(evil)
    if where == "payload":  # the frame still decodes to a (different) valid BATCH without its tag
        forged = decode_message(Batch.TYPE, bytes(evil[HEADER_LEN:-TAG_LEN]))
        assert forged != msgs[1]
    decoder = receiver()
    assert feed_all(decoder, frames[:1]) == msgs[:1]
    with pytest.raises(BadMac, match="#1 .* fails authentication: its xxh3 digest matches"):
        feed_all(decoder, [bytes(evil)])
    with pytest.raises(BadMac):  # and the connection stays refused
        feed_all(decoder, frames[2:])


def test_replayed_frame_refused() -> None:
    frames = sealed(MSGS)
    decoder = receiver()
    assert feed_all(decoder, frames[:2]) == MSGS[:2]
    with pytest.raises(BadMac, match="BATCH frame #2 .*fails authentication"):
        feed_all(decoder, [frames[0]])


def test_reordered_frames_refused() -> None:
    frames = sealed(MSGS)
    with pytest.raises(BadMac, match="BATCH frame #0 .*fails authentication"):
        feed_all(receiver(), [frames[1], frames[0]])


def test_dropped_frame_refused() -> None:
    frames = sealed(MSGS)
    decoder = receiver()
    assert feed_all(decoder, frames[:1]) == MSGS[:1]
    with pytest.raises(BadMac, match="PING frame #1 .*fails authentication"):
        feed_all(decoder, [frames[2]])


def test_frame_spliced_from_another_connection_refused() -> None:
    """A valid frame of another session (other nonces, so other keys), at the right position."""
    other_session = sealed(MSGS, send_key=keys(True, nonce_r=os.urandom(32)).send)
    frames = sealed(MSGS)
    decoder = receiver()
    assert feed_all(decoder, frames[:1]) == MSGS[:1]
    with pytest.raises(BadMac, match="#1 .*fails authentication"):
        feed_all(decoder, [other_session[1]])


def test_frame_reflected_back_to_its_sender_refused() -> None:
    """The initiator's own frame #0 handed back to it: the other direction has its own key."""
    frames = sealed(MSGS)
    decoder = FrameDecoder()
    decoder.require_mac(FrameMac(keys(True).receive))
    with pytest.raises(BadMac):
        feed_all(decoder, frames[:1])


def test_frame_without_mac_refused_after_the_handshake() -> None:
    """Stripping the tag and the flag does not downgrade the session."""
    decoder = receiver()
    with pytest.raises(BadMac, match="BATCH frame #0 after the handshake carries no MAC"):
        feed_all(decoder, [encode_frame(MSGS[0])])


def test_frame_with_mac_refused_without_session_keys() -> None:
    with pytest.raises(BadMac, match="carries a MAC but no session key"):
        feed_all(FrameDecoder(), sealed(MSGS[:1]))


def test_truncated_tag_waits_for_the_rest() -> None:
    frame = sealed(MSGS[:1])[0]
    decoder = receiver()
    assert feed_all(decoder, [frame[:-1]]) == []
    assert feed_all(decoder, [frame[-1:]]) == MSGS[:1]


# ----------------------------------------------------------------- on real streams


@pytest.mark.parametrize("pair", [trio.testing.memory_stream_pair, trio.testing.lockstep_stream_pair],
                         ids=["buffered", "lockstep"])
async def test_both_senders_share_one_counter_after_the_handshake(pair) -> None:
    """Bulk frames encoded in a worker thread and small ones sent on the loop, concurrently:
    every frame verifies, in the order it was sent."""
    _, _, fi, fr = await run_pair(KEY, KEY, pair=pair)
    assert fi.authenticated and fr.authenticated
    bulk = FrameSender(fi)
    batches = [Batch(1 + n, (Write(0, 0, os.urandom(300 << 10)),)) for n in range(6)]
    got: list[Message] = []

    async def pings() -> None:
        for n in range(40):
            await fi.send(Ping(n))
            await trio.sleep(0)

    async def bulk_sends() -> None:
        for b in batches:
            await bulk.send(b)

    async def receive() -> None:
        while len(got) < len(batches) + 40:
            got.append(await fr.receive())

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(pings)
            nursery.start_soon(bulk_sends)
    assert [m for m in got if isinstance(m, Batch)] == batches
    assert [m for m in got if isinstance(m, Ping)] == [Ping(n) for n in range(40)]
    # And the other direction works too.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fr.send, Ack(6))
        assert await fi.receive() == Ack(6)
