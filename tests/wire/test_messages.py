"""Message payload codec: round trips, validation, and refusal of malformed payloads."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colofs.wire import (
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
    MalformedMessage,
    Message,
    MessageType,
    Ping,
    Pong,
    ResyncBlock,
    ResyncData,
    ResyncDone,
    ResyncRequest,
    UnknownType,
    Write,
    decode_message,
)
from colofs.wire.messages import (
    Receipt,
    ResyncQuery,
    VerifyDigests,
    VerifyLiveQuery,
    VerifyQuery,
    truncate_utf8,
)

U16 = 2**16 - 1
U32 = 2**32 - 1
U64 = 2**64 - 1

u16 = st.integers(0, U16)
u32 = st.integers(0, U32)
u64 = st.integers(0, U64)
names = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"),
    min_size=1,
    max_size=70,
).filter(lambda s: s not in (".", "..") and len(s.encode()) <= 255)
block_sizes = st.integers(0, 31).map(lambda e: 1 << e)
disk_infos = st.builds(DiskInfo, names, u64, block_sizes)
writes = st.builds(Write, u16, st.integers(0, U64 - 300), st.binary(max_size=300))


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    ws = draw(st.lists(writes, min_size=1, max_size=8))
    return Batch(draw(st.integers(0, U64 - len(ws) + 1)), tuple(ws))


@st.composite
def resync_requests(draw: st.DrawFn) -> ResyncRequest:
    digests = draw(st.lists(u64, max_size=20))
    first_block = draw(st.integers(0, min(U64, 2**64 - len(digests))))
    return ResyncRequest(draw(u16), first_block, tuple(digests))


@st.composite
def resync_datas(draw: st.DrawFn) -> ResyncData:
    block_size = 1 << draw(st.integers(0, 9))
    blocks = draw(st.lists(st.builds(ResyncBlock, u64, st.binary(max_size=block_size)), max_size=6))
    return ResyncData(draw(u16), block_size, tuple(blocks))


STRATEGIES: dict[MessageType, st.SearchStrategy[Message]] = {
    MessageType.HELLO: st.builds(
        Hello, u16, names, st.sampled_from([1, 2]), st.binary(min_size=32, max_size=32), u32
    ),
    MessageType.AUTH: st.builds(Auth, st.binary(min_size=32, max_size=32)),
    MessageType.AUTH_OK: st.just(AuthOk()),
    MessageType.ATTACH: st.builds(
        Attach,
        names,
        u64,
        u64,
        st.lists(disk_infos, max_size=5, unique_by=lambda d: d.name).map(tuple),
    ),
    MessageType.ATTACHED: st.builds(Attached, names, u64, u64, u64, st.sampled_from([0, 1])),
    MessageType.BATCH: batches(),
    MessageType.ACK: st.builds(Ack, u64),
    MessageType.CHECKPOINT: st.builds(Checkpoint, u64, u64),
    MessageType.CHECKPOINT_DONE: st.builds(CheckpointDone, u64, u64),
    MessageType.DISK_ADD: st.builds(DiskAdd, u16, disk_infos),
    MessageType.RESYNC_REQUEST: resync_requests(),
    MessageType.RESYNC_DATA: resync_datas(),
    MessageType.RESYNC_DONE: st.builds(ResyncDone, u64),
    # At most 60 characters (<= 240 bytes), so nothing is truncated on encode.
    MessageType.ERROR: st.builds(Error, u16, st.text(max_size=60)),
    MessageType.PING: st.builds(Ping, u64),
    MessageType.PONG: st.builds(Pong, u64),
    MessageType.RESYNC_QUERY: st.integers(1, U32).flatmap(
        lambda n: st.builds(ResyncQuery, u16, st.integers(0, 2**64 - n), st.just(n))
    ),
    MessageType.VERIFY_QUERY: st.integers(1, U32).flatmap(
        lambda n: st.builds(VerifyQuery, u64, u16, st.integers(0, 2**64 - n), st.just(n))
    ),
    MessageType.VERIFY_DIGESTS: st.lists(u64, max_size=20).flatmap(
        lambda ds: st.builds(VerifyDigests, u64, u16, st.integers(0, min(U64, 2**64 - len(ds))), u64,
                             st.just(tuple(ds)))
    ),
    MessageType.VERIFY_LIVE_QUERY: st.integers(1, U32).flatmap(
        lambda n: st.builds(VerifyLiveQuery, u64, u16, st.integers(0, 2**64 - n), st.just(n), u64)
    ),
    MessageType.RECEIPT: st.builds(Receipt, u64),
}
any_message: st.SearchStrategy[Message] = st.one_of(*STRATEGIES.values())


def test_every_message_type_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(MessageType)


@pytest.mark.parametrize("mtype", list(MessageType), ids=lambda t: t.name)
@given(data=st.data())
def test_payload_roundtrip(mtype: MessageType, data: st.DataObject) -> None:
    msg = data.draw(STRATEGIES[mtype])
    assert msg.TYPE == mtype
    decoded = decode_message(mtype, msg.encode())
    assert decoded == msg
    assert type(decoded) is type(msg)


def test_fixed_layouts() -> None:
    """Spot-check byte layouts against the spec, independently of the decoder."""
    assert Ping(0x0102030405060708).encode() == bytes.fromhex("0807060504030201")
    assert Ack(1).encode() == struct.pack("<Q", 1)
    assert Checkpoint(seq=5, id=9).encode() == struct.pack("<QQ", 5, 9)
    assert AuthOk().encode() == b""
    nonce = bytes(range(32))
    assert Hello(1, "pa", 2, nonce, 7).encode() == (
        struct.pack("<HH", 1, 2) + b"pa" + b"\x02" + nonce + struct.pack("<I", 7)
    )
    batch = Batch(10, (Write(3, 4096, b"abc"),))
    assert batch.encode() == struct.pack("<QIHQI", 10, 1, 3, 4096, 3) + b"abc"
    assert Error(1, "authentication failed").encode() == (
        struct.pack("<HH", 1, 21) + b"authentication failed"
    )
    attach = Attach("vm1", 2, 3, (DiskInfo("d0", 1 << 30, 4096),))
    assert attach.encode() == (
        struct.pack("<H", 3)
        + b"vm1"
        + struct.pack("<QQH", 2, 3, 1)
        + struct.pack("<H", 2)
        + b"d0"
        + struct.pack("<QI", 1 << 30, 4096)
    )


def test_batch_sequence_helpers_and_compact_repr() -> None:
    b = Batch(100, [Write(0, 0, bytes(4096)), Write(0, 4096, b"x")])
    assert isinstance(b.writes, tuple)
    assert b.last_seq == 101
    assert b.data_bytes == 4097
    assert repr(b) == "Batch(first_seq=100, writes=2, data_bytes=4097)"
    assert repr(b.writes[0]) == "Write(disk=0, offset=0, len=4096)"


def test_decoded_write_data_is_an_independent_copy() -> None:
    """Data comes out as bytes, copied from the payload; the payload buffer is released."""
    payload = bytearray(Batch(1, (Write(0, 0, b"hello"), Write(1, 8, b"world"))).encode())
    msg = decode_message(MessageType.BATCH, payload)
    assert all(type(w.data) is bytes for w in msg.writes)
    payload[-5:] = b"XXXXX"  # mutating the source does not change the decoded message
    del payload[:4]  # resizing works: no view of the buffer outlived the decode
    assert [w.data for w in msg.writes] == [b"hello", b"world"]


# ----------------------------------------------------------------- malformed payloads


@pytest.mark.parametrize("mtype", list(MessageType), ids=lambda t: t.name)
@settings(max_examples=30)
@given(data=st.data())
def test_trailing_bytes_refused(mtype: MessageType, data: st.DataObject) -> None:
    msg = data.draw(STRATEGIES[mtype])
    extra = data.draw(st.binary(min_size=1, max_size=10))
    with pytest.raises(MalformedMessage, match="trailing bytes"):
        decode_message(mtype, msg.encode() + extra)


@pytest.mark.parametrize("mtype", list(MessageType), ids=lambda t: t.name)
@settings(max_examples=30)
@given(data=st.data())
def test_every_truncation_refused(mtype: MessageType, data: st.DataObject) -> None:
    payload = data.draw(STRATEGIES[mtype]).encode()
    for cut in range(len(payload)):
        with pytest.raises(MalformedMessage):
            decode_message(mtype, payload[:cut])


@pytest.mark.parametrize("code", [0, 14, 19, 255, 1000])
def test_unknown_type_refused(code: int) -> None:
    with pytest.raises(UnknownType, match=str(code)):
        decode_message(code, b"")


def test_string_longer_than_255_refused() -> None:
    payload = struct.pack("<HH", 1, 256) + b"a" * 256
    with pytest.raises(MalformedMessage, match="256 bytes long, at most 255"):
        decode_message(MessageType.ERROR, payload)


def test_invalid_utf8_refused() -> None:
    payload = struct.pack("<HH", 1, 2) + b"\xc3\x28"
    with pytest.raises(MalformedMessage, match="UTF-8"):
        decode_message(MessageType.ERROR, payload)


def test_bad_role_refused() -> None:
    payload = struct.pack("<HH", 1, 1) + b"a" + b"\x03" + bytes(32) + bytes(4)
    with pytest.raises(MalformedMessage, match="role = 3"):
        decode_message(MessageType.HELLO, payload)


def test_path_in_disk_name_refused() -> None:
    payload = struct.pack("<HH", 0, 5) + b"../x0" + struct.pack("<QI", 1, 4096)
    with pytest.raises(MalformedMessage, match="not a valid name"):
        decode_message(MessageType.DISK_ADD, payload)


def test_impossible_count_refused_before_looping() -> None:
    payload = struct.pack("<QI", 1, U32) + bytes(14)
    with pytest.raises(MalformedMessage, match=f"claims {U32} writes"):
        decode_message(MessageType.BATCH, payload)


def test_write_past_end_of_u64_refused() -> None:
    payload = struct.pack("<QIHQI", 1, 1, 0, U64, 2) + b"ab"
    with pytest.raises(MalformedMessage, match="ends past 2\\*\\*64"):
        decode_message(MessageType.BATCH, payload)


def test_empty_batch_refused_on_decode() -> None:
    with pytest.raises(MalformedMessage, match="at least one write"):
        decode_message(MessageType.BATCH, struct.pack("<QI", 1, 0))


def test_resync_block_longer_than_block_size_refused() -> None:
    payload = struct.pack("<HII", 0, 4, 1) + struct.pack("<QI", 0, 5) + b"12345"
    with pytest.raises(MalformedMessage, match="more than the block size 4"):
        decode_message(MessageType.RESYNC_DATA, payload)


def test_unknown_attached_flags_refused() -> None:
    payload = struct.pack("<H", 2) + b"vm" + struct.pack("<QQQI", 1, 2, 3, 2)
    with pytest.raises(MalformedMessage, match="undefined bits"):
        decode_message(MessageType.ATTACHED, payload)


# ----------------------------------------------------------------- construction checks


@pytest.mark.parametrize(
    "make",
    [
        lambda: Hello(1, "a", 3, bytes(32)),
        lambda: Hello(1, "a", 1, bytes(31)),
        lambda: Hello(1, "", 1, bytes(32)),
        lambda: Hello(1, "a/b", 1, bytes(32)),
        lambda: Hello(1, "..", 1, bytes(32)),
        lambda: Hello(1, "a\nb", 1, bytes(32)),
        lambda: Hello(1, "x" * 256, 1, bytes(32)),
        lambda: Hello(2**16, "a", 1, bytes(32)),
        lambda: Auth(bytes(33)),
        lambda: Ack(-1),
        lambda: Ack(2**64),
        lambda: Batch(0, ()),
        lambda: Batch(U64, (Write(0, 0, b""), Write(0, 0, b""))),
        lambda: Write(0, U64, b"ab"),
        lambda: Write(2**16, 0, b""),
        lambda: DiskInfo("d", 10, 3000),
        lambda: DiskInfo("d", 10, 0),
        lambda: Attach("vm", 0, 0, (DiskInfo("d", 1, 512), DiskInfo("d", 2, 512))),
        lambda: Attached("vm", 0, 0, 0, flags=4),
        lambda: ResyncRequest(0, U64, (1, 2)),
        lambda: ResyncData(0, 4, (ResyncBlock(0, b"12345"),)),
        lambda: Error(2**16, "x"),
    ],
)
def test_invalid_fields_refused_on_construction(make) -> None:
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Ack(True),
        lambda: Ack(1.0),
        lambda: Hello(1, b"a", 1, bytes(32)),
        lambda: Batch(0, (b"not a write",)),
        lambda: Error(1, b"bytes"),
    ],
)
def test_wrong_field_types_refused(make) -> None:
    with pytest.raises(TypeError):
        make()


def test_attached_full_sync_flag() -> None:
    assert Attached("vm", 1, 2, 3, 1).needs_full_sync
    assert not Attached("vm", 1, 2, 3, 0).needs_full_sync


# ----------------------------------------------------------------- ERROR truncation


def test_error_message_truncated_to_255_bytes_on_a_character_boundary() -> None:
    msg = Error(7, "é" * 200)  # 400 bytes of UTF-8, 2 bytes per character
    decoded = decode_message(MessageType.ERROR, msg.encode())
    assert decoded.message == "é" * 127  # 254 bytes: the 128th character would split
    assert len(decoded.message.encode()) == 254


@given(st.text(min_size=0, max_size=300))
def test_error_truncation_is_a_valid_prefix(text: str) -> None:
    decoded = decode_message(MessageType.ERROR, Error(3, text).encode())
    raw = decoded.message.encode()
    assert len(raw) <= 255
    assert text.encode().startswith(raw)
    if len(text.encode()) <= 255:
        assert decoded.message == text
    else:
        assert len(raw) > 255 - 4  # never cut more than one character short


def test_error_with_unencodable_characters_still_encodes() -> None:
    decoded = decode_message(MessageType.ERROR, Error(3, "bad name \udcff").encode())
    assert decoded.message == "bad name ?"
    assert truncate_utf8("abc", 2) == b"ab"


def test_write_accepts_byte_views_but_not_wide_ones() -> None:
    import array

    data = memoryview(b"0123456789")[2:6]
    assert (
        decode_message(MessageType.BATCH, Batch(1, (Write(0, 0, data),)).encode()).writes[0].data
        == b"2345"
    )
    with pytest.raises(TypeError, match="flat byte view"):
        Write(0, 0, memoryview(array.array("I", [1, 2])))


def test_resync_query_layout_and_limits() -> None:
    assert ResyncQuery(2, 7, 3).encode() == struct.pack("<HQI", 2, 7, 3)
    with pytest.raises(ValueError, match="at least one block"):
        ResyncQuery(0, 0, 0)
    with pytest.raises(ValueError, match="overflow u64"):
        ResyncQuery(0, U64, 2)
    with pytest.raises(MalformedMessage, match="at least one block"):
        decode_message(MessageType.RESYNC_QUERY, struct.pack("<HQI", 0, 0, 0))
