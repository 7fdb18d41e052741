"""Golden bytes: the exact payload of one example of every message type.

The wire format is a contract between two nodes that may run different
builds of colofs; these bytes were taken from the codec as deployed, so any
change to a message's layout (field order, width, length prefix, count
position) fails here, whatever the round-trip tests say.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colofs.wire.checks import Reader
from colofs.wire.messages import (
    ATTACHED_NEEDS_FULL_SYNC,
    Ack,
    Attach,
    Attached,
    Auth,
    AuthOk,
    Batch,
    Checkpoint,
    CheckpointDone,
    DiskAdd,
    DiskInfo,
    Error,
    Hello,
    Message,
    MessageType,
    Ping,
    Pong,
    Receipt,
    ResyncBlock,
    ResyncData,
    ResyncDone,
    ResyncQuery,
    ResyncRequest,
    VerifyDigests,
    VerifyLiveQuery,
    VerifyQuery,
    Write,
    decode_message,
)

from .test_messages import STRATEGIES

NONCE = bytes(range(32))

# (id, message, payload hex); the message decodes back to itself.
GOLDEN: list[tuple[str, Message, str]] = [
    (
        "hello",
        Hello(1, "node-a", 1, NONCE, 0x01020304),
        "010006006e6f64652d6101000102030405060708090a0b0c0d0e0f10111213141516171819"
        "1a1b1c1d1e1f04030201",
    ),
    (
        "auth",
        Auth(bytes(range(100, 132))),
        "6465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f80818283",
    ),
    ("auth_ok", AuthOk(), ""),
    (
        "attach",
        Attach("vm1", 2, 3, (DiskInfo("d0", 1 << 30, 4096), DiskInfo("disk-é", 12345, 512))),
        "0300766d310200000000000000030000000000000002000200643000000040000000000010"
        "000007006469736b2dc3a9393000000000000000020000",
    ),
    ("attach_no_disks", Attach("vm1", 0, 0, ()), "0300766d31000000000000000000000000000000000000"),
    (
        "attached",
        Attached("vm1", 7, 0x0102030405060708, 99, ATTACHED_NEEDS_FULL_SYNC),
        "0300766d3107000000000000000807060504030201630000000000000001000000",
    ),
    (
        "batch",
        Batch(10, (Write(3, 4096, b"abc"), Write(0, 2**64 - 2, b"xy"), Write(65535, 0, b""))),
        "0a000000000000000300000003000010000000000000030000006162630000feffffffffff"
        "ffff020000007879ffff000000000000000000000000",
    ),
    ("ack", Ack(0xFEDCBA9876543210), "1032547698badcfe"),
    ("checkpoint", Checkpoint(seq=5, id=9), "05000000000000000900000000000000"),
    ("checkpoint_done", CheckpointDone(seq=2**64 - 1, id=0), "ffffffffffffffff0000000000000000"),
    ("disk_add", DiskAdd(4, DiskInfo("d1", 2**40, 65536)), "040002006431000000000001000000000100"),
    (
        "resync_request",
        ResyncRequest(2, 100, (0, 1, 2**64 - 1, 0x1122334455667788)),
        "020064000000000000000400000000000000000000000100000000000000ffffffffffffff"
        "ff8877665544332211",
    ),
    ("resync_request_empty", ResyncRequest(1, 0, ()), "0100000000000000000000000000"),
    (
        "resync_data",
        ResyncData(1, 8, (ResyncBlock(0, b"12345678"), ResyncBlock(9, b"abc"))),
        "010008000000020000000000000000000000080000003132333435363738090000000000"
        "000003000000616263",
    ),
    ("resync_done", ResyncDone(123456789), "15cd5b0700000000"),
    ("error", Error(3, "disk 'd0' is busy"), "030011006469736b20276430272069732062757379"),
    ("ping", Ping(0x0102030405060708), "0807060504030201"),
    ("pong", Pong(42), "2a00000000000000"),
    ("resync_query", ResyncQuery(2, 7, 3), "0200070000000000000003000000"),
    (
        "verify_query",
        VerifyQuery(11, 1, 1000, 64),
        "0b000000000000000100e80300000000000040000000",
    ),
    (
        "verify_digests",
        VerifyDigests(11, 1, 1000, 555, (7, 2**63, 0)),
        "0b000000000000000100e8030000000000002b0200000000000003000000"
        "070000000000000000000000000000800000000000000000",
    ),
    (
        "verify_live_query",
        VerifyLiveQuery(12, 0, 5, 10, 777),
        "0c00000000000000000005000000000000000a0000000903000000000000",
    ),
    ("receipt", Receipt(0x0102030405060708), "0807060504030201"),
]


def test_every_message_type_has_golden_bytes() -> None:
    assert {msg.TYPE for _, msg, _ in GOLDEN} == set(MessageType)


@pytest.mark.parametrize(("msg", "hexbytes"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_encode_gives_the_golden_bytes(msg: Message, hexbytes: str) -> None:
    assert msg.encode().hex() == hexbytes


@pytest.mark.parametrize(("msg", "hexbytes"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_golden_bytes_decode_to_the_message(msg: Message, hexbytes: str) -> None:
    assert decode_message(msg.TYPE, bytes.fromhex(hexbytes)) == msg


def test_error_text_is_cut_and_replaced_on_encode() -> None:
    """ERROR text: cut to 254 bytes on a character boundary; unencodable characters become '?'."""
    assert Error(1, "é" * 200).encode().hex() == "0100fe00" + "c3a9" * 127
    assert Error(2, "bad \udcff").encode().hex() == "02000500626164203f"


@settings(max_examples=50)
@given(st.one_of(STRATEGIES[MessageType.BATCH], STRATEGIES[MessageType.RESYNC_DATA]))
def test_hand_tuned_codecs_match_the_declared_layout(msg: Message) -> None:
    """BATCH and RESYNC_DATA encode/decode by hand; the generic layout gives the same bytes."""
    layout = type(msg).LAYOUT
    parts: list = []
    layout.put(msg, parts)
    payload = msg.encode()
    assert b"".join(parts) == payload
    with memoryview(payload) as view:
        assert type(msg)(*layout.read(Reader(view, "test"))) == msg
