"""Mutual challenge-response handshake and key-file loading."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable

import pytest
import trio
import trio.testing
import xxhash

from colofs.wire import (
    DEFAULT_MAX_WIRE_LEN,
    Auth,
    AuthError,
    AuthOk,
    BadVersion,
    Batch,
    ConnectionClosed,
    Error,
    FrameStream,
    FrameTooLarge,
    Hello,
    KeyFileError,
    MessageType,
    NonceRegistry,
    Ping,
    ProtocolError,
    ReflectedChallenge,
    UnexpectedMessage,
    Write,
    WrongKey,
    authenticate,
    load_key,
)
from colofs.wire.auth import PROTO_VERSION

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
PAIRS = [trio.testing.memory_stream_pair, trio.testing.lockstep_stream_pair]


def craft_header(mtype: int, wire_len: int) -> bytes:
    """A version-1 frame header announcing ``wire_len`` payload bytes, digest over the header only."""
    prefix = struct.pack("<4sBBHII", b"COLF", 1, mtype, 0, wire_len, wire_len)
    return prefix + struct.pack("<Q", xxhash.xxh3_64_intdigest(prefix))


def spec_mac(key: bytes, peer_nonce: bytes, node_id: str, role: int) -> bytes:
    """The MAC exactly as the spec words it, computed independently of colofs."""
    data = b"colofs-auth-v1\0" + peer_nonce + node_id.encode() + bytes([role])
    return hmac.new(key, data, hashlib.sha256).digest()


async def run_pair(
    key_i: bytes,
    key_r: bytes,
    *,
    pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] = trio.testing.memory_stream_pair,
    id_i: str = "pvm-host",
    id_r: str = "svm-host",
    shared_registry: bool = False,
) -> tuple[object, object, FrameStream, FrameStream]:
    """Run a real initiator against a real responder; return each side's result or error.

    The two nodes live in one test process, so each gets its own NonceRegistry,
    as two separate colofs processes would have.
    """
    a, b = pair()
    fi, fr = FrameStream(a), FrameStream(b)
    results: dict[str, object] = {}
    registries = {"i": NonceRegistry(), "r": NonceRegistry()}
    if shared_registry:
        registries["r"] = registries["i"]

    async def side(name: str, fs: FrameStream, key: bytes, node: str, role: int) -> None:
        try:
            results[name] = await authenticate(
                fs,
                key,
                node,
                role,
                initiator=name == "i",
                features=0x10 if name == "r" else 0,
                nonces=registries[name],
            )
        except ProtocolError as exc:
            results[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "i", fi, key_i, id_i, 1)
        nursery.start_soon(side, "r", fr, key_r, id_r, 2)
    return results["i"], results["r"], fi, fr


# ----------------------------------------------------------------- success


@pytest.mark.parametrize("pair", PAIRS, ids=["buffered", "lockstep"])
async def test_right_key_both_sides_succeed(pair) -> None:
    peer_of_i, peer_of_r, fi, fr = await run_pair(KEY, KEY, pair=pair)
    assert isinstance(peer_of_i, Hello) and isinstance(peer_of_r, Hello)
    assert (peer_of_i.node_id, peer_of_i.role, peer_of_i.features) == ("svm-host", 2, 0x10)
    assert (peer_of_r.node_id, peer_of_r.role, peer_of_r.features) == ("pvm-host", 1, 0)
    async with trio.open_nursery() as nursery:  # the connection is usable afterwards
        nursery.start_soon(fi.send, Ping(5))
        assert await fr.receive() == Ping(5)


async def test_initiator_follows_the_spec_exactly() -> None:
    """A hand-written responder checks the initiator's MAC with the spec formula."""
    a, b = trio.testing.memory_stream_pair()
    peer = FrameStream(b)
    nonces: list[bytes] = []
    for _ in range(2):
        async with trio.open_nursery() as nursery:
            result: list[Hello] = []

            async def initiator(sink: list[Hello] = result) -> None:
                sink.append(await authenticate(FrameStream(a), KEY, "pvm", 1, initiator=True, nonces=NonceRegistry()))

            nursery.start_soon(initiator)
            hello_i = await peer.receive()
            assert isinstance(hello_i, Hello) and hello_i.node_id == "pvm" and hello_i.proto == 2
            my_nonce = os.urandom(32)
            await peer.send(Hello(2, "fake-svm", 2, my_nonce, 3))
            auth = await peer.receive()
            assert auth == Auth(spec_mac(KEY, my_nonce, "pvm", 1))
            await peer.send(Auth(spec_mac(KEY, hello_i.nonce, "fake-svm", 2)))
            assert await peer.receive() == AuthOk()
            await peer.send(AuthOk())
        assert result[0] == Hello(2, "fake-svm", 2, my_nonce, 3)
        nonces.append(hello_i.nonce)
    assert nonces[0] != nonces[1]  # a fresh challenge per handshake


# ----------------------------------------------------------------- wrong key


@pytest.mark.parametrize("pair", PAIRS, ids=["buffered", "lockstep"])
async def test_wrong_key_fails_on_both_sides(pair) -> None:
    err_i, err_r, _, _ = await run_pair(KEY, OTHER_KEY, pair=pair)
    assert isinstance(err_r, WrongKey) and "does not verify" in str(err_r)
    # The initiator learns it from the responder's ERROR (code 1).
    assert isinstance(err_i, WrongKey)
    assert "error 1: authentication failed" in str(err_i)


async def test_responder_sends_error_on_wrong_key() -> None:
    a, b = trio.testing.memory_stream_pair()
    fake = FrameStream(a)
    errors: list[Exception] = []

    async def responder() -> None:
        try:
            await authenticate(FrameStream(b), KEY, "svm", 2, initiator=False, nonces=NonceRegistry())
        except WrongKey as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder)
        await fake.send(Hello(PROTO_VERSION, "pvm", 1, os.urandom(32)))
        hello_r = await fake.receive()
        await fake.send(Auth(spec_mac(OTHER_KEY, hello_r.nonce, "pvm", 1)))
        assert await fake.receive() == Error(1, "authentication failed")
    assert len(errors) == 1


async def test_impostor_responder_refused_by_initiator() -> None:
    """A responder that cannot answer our challenge gets ERROR 1 and no trust."""
    a, b = trio.testing.memory_stream_pair()
    fake = FrameStream(b)
    errors: list[Exception] = []

    async def initiator() -> None:
        try:
            await authenticate(FrameStream(a), KEY, "pvm", 1, initiator=True, nonces=NonceRegistry())
        except WrongKey as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(initiator)
        await fake.receive()
        await fake.send(Hello(PROTO_VERSION, "svm", 2, os.urandom(32)))
        await fake.receive()  # the initiator's AUTH
        await fake.send(Auth(bytes(32)))
        assert await fake.receive() == Error(1, "authentication failed")
    assert len(errors) == 1


# ----------------------------------------------------------------- reflection


async def test_echoed_nonce_refused_before_any_mac_is_sent() -> None:
    a, b = trio.testing.memory_stream_pair()
    fake = FrameStream(b)
    errors: list[Exception] = []

    async def initiator() -> None:
        try:
            await authenticate(FrameStream(a), KEY, "pvm", 1, initiator=True, nonces=NonceRegistry())
        except ReflectedChallenge as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(initiator)
        hello_i = await fake.receive()
        await fake.send(Hello(PROTO_VERSION, "svm", 2, hello_i.nonce))  # hand our challenge back
        reply = await fake.receive()
    assert isinstance(reply, Error) and reply.code == 2  # a refusal, not an AUTH
    assert "echoed our own challenge nonce" in str(errors[0])


async def test_nonce_outstanding_on_another_connection_refused() -> None:
    """The classic reflection: reuse the responder's challenge on a parallel connection."""
    registry = NonceRegistry()  # the responding node's: shared by all its connections

    async def responder(fs: FrameStream, sink: list[object]) -> None:
        try:
            sink.append(await authenticate(fs, KEY, "svm", 2, initiator=False, nonces=registry))
        except ProtocolError as exc:
            sink.append(exc)

    a1, b1 = trio.testing.memory_stream_pair()
    a2, b2 = trio.testing.memory_stream_pair()
    a3, b3 = trio.testing.memory_stream_pair()
    att1, att2, att3 = FrameStream(a1), FrameStream(a2), FrameStream(a3)
    r1: list[object] = []
    r2: list[object] = []
    r3: list[object] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder, FrameStream(b1), r1)
        await att1.send(Hello(PROTO_VERSION, "evil", 1, os.urandom(32)))
        challenge = (await att1.receive()).nonce  # now outstanding on connection 1
        nursery.start_soon(responder, FrameStream(b2), r2)
        await att2.send(Hello(PROTO_VERSION, "evil", 1, challenge))
        reply = await att2.receive()
        assert isinstance(reply, Error) and reply.code == 2
        await att1.aclose()  # connection 1 ends; its nonce is no longer outstanding
    assert isinstance(r2[0], ReflectedChallenge)
    assert "issued on another connection" in str(r2[0])
    assert isinstance(r1[0], ConnectionClosed)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder, FrameStream(b3), r3)
        await att3.send(Hello(PROTO_VERSION, "evil", 1, challenge))
        assert isinstance(await att3.receive(), Hello)  # accepted as a challenge now
        await att3.aclose()


async def test_loopback_within_one_node_is_seen_as_reflection() -> None:
    """Within one node (one registry) a nonce coming back is indistinguishable from reflection."""
    err_i, err_r, _, _ = await run_pair(KEY, KEY, shared_registry=True)
    assert isinstance(err_r, ReflectedChallenge)
    assert "issued on another connection" in str(err_r)
    assert isinstance(err_i, AuthError)


async def test_registry_forgets_nonces_when_handshakes_end() -> None:
    registry = NonceRegistry()
    a, b = trio.testing.memory_stream_pair()
    await a.aclose()
    with pytest.raises(ConnectionClosed):
        await authenticate(FrameStream(b), KEY, "svm", 2, initiator=False, nonces=registry)
    assert len(registry) == 0
    with registry.issue() as nonce:
        assert nonce in registry and len(nonce) == 32
    assert nonce not in registry


async def test_same_node_id_refused() -> None:
    err_i, err_r, _, _ = await run_pair(KEY, KEY, id_i="node-a", id_r="node-a")
    assert isinstance(err_r, ReflectedChallenge)
    assert "claims our own node id 'node-a'" in str(err_r)
    assert isinstance(err_i, AuthError) and not isinstance(err_i, WrongKey)
    assert "peer refused the handshake (error 2" in str(err_i)


# ----------------------------------------------------------------- protocol discipline


async def test_batch_before_authentication_refused() -> None:
    a, b = trio.testing.memory_stream_pair()
    fake = FrameStream(a)
    errors: list[Exception] = []

    async def responder() -> None:
        try:
            await authenticate(FrameStream(b), KEY, "svm", 2, initiator=False, nonces=NonceRegistry())
        except UnexpectedMessage as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder)
        await fake.send(Batch(1, (Write(0, 0, b"evil"),)))
        reply = await fake.receive()
    assert isinstance(reply, Error) and reply.code == 2
    assert "expected HELLO during authentication, got BATCH" in str(errors[0])


async def test_batch_instead_of_auth_refused() -> None:
    a, b = trio.testing.memory_stream_pair()
    fake = FrameStream(a)
    errors: list[Exception] = []

    async def responder() -> None:
        try:
            await authenticate(FrameStream(b), KEY, "svm", 2, initiator=False, nonces=NonceRegistry())
        except UnexpectedMessage as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder)
        await fake.send(Hello(PROTO_VERSION, "pvm", 1, os.urandom(32)))
        await fake.receive()
        await fake.send(Batch(1, (Write(0, 0, b"evil"),)))
    assert "expected AUTH during authentication, got BATCH" in str(errors[0])


async def test_initiator_refuses_unexpected_message() -> None:
    a, b = trio.testing.memory_stream_pair()
    fake = FrameStream(b)
    errors: list[Exception] = []

    async def initiator() -> None:
        try:
            await authenticate(FrameStream(a), KEY, "pvm", 1, initiator=True, nonces=NonceRegistry())
        except UnexpectedMessage as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(initiator)
        await fake.receive()
        await fake.send(AuthOk())  # skip the whole exchange
    assert "expected HELLO during authentication, got AUTH_OK" in str(errors[0])


async def test_peer_of_the_unauthenticated_frames_protocol_refused() -> None:
    """A peer that speaks protocol 1 (no MAC after the handshake) is refused, and told why."""
    a, b = trio.testing.memory_stream_pair()
    fake = FrameStream(a)
    errors: list[Exception] = []

    async def responder() -> None:
        try:
            await authenticate(FrameStream(b), KEY, "svm", 2, initiator=False, nonces=NonceRegistry())
        except BadVersion as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder)
        await fake.send(Hello(1, "pvm", 1, os.urandom(32)))
        refusal = await fake.receive()
        assert refusal.code == 2 and "protocol 1, this node speaks 2" in refusal.message
    assert "speaks colofs protocol 1, this node speaks 2" in str(errors[0])


async def test_peer_closing_during_handshake() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.aclose()
    with pytest.raises(ConnectionClosed, match="during authentication \\(waiting for HELLO\\)"):
        await authenticate(FrameStream(b), KEY, "svm", 2, initiator=False, nonces=NonceRegistry())


@pytest.mark.parametrize("initiator", [True, False])
async def test_timeout(initiator: bool, autojump_clock: trio.testing.MockClock) -> None:
    a, b = trio.testing.memory_stream_pair()  # the peer (a) never answers
    start = trio.current_time()
    with pytest.raises(AuthError, match="timed out after 3 s"):
        await authenticate(FrameStream(b), KEY, "svm", 2, initiator=initiator, timeout=3, nonces=NonceRegistry())
    assert trio.current_time() - start == pytest.approx(3)


async def test_default_timeout_is_ten_seconds(autojump_clock: trio.testing.MockClock) -> None:
    a, b = trio.testing.memory_stream_pair()
    with pytest.raises(AuthError, match="timed out after 10 s"):
        await authenticate(FrameStream(b), KEY, "svm", 2, initiator=False, nonces=NonceRegistry())


async def test_short_key_refused_before_any_io() -> None:
    a, b = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="at least 16 bytes"):
        await authenticate(FrameStream(b), b"x" * 15, "svm", 2, initiator=True, nonces=NonceRegistry())


async def test_invalid_own_identity_refused() -> None:
    a, b = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError):
        await authenticate(FrameStream(b), KEY, "svm", 3, initiator=True, nonces=NonceRegistry())


# ----------------------------------------------------------------- load_key


def write_key(path, data: bytes, mode: int) -> str:
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_key_returns_the_exact_bytes(tmp_path, mode: int) -> None:
    data = os.urandom(32) + b"\n"  # not stripped: both sides copy the same file
    assert load_key(write_key(tmp_path / "key", data, mode)) == data
    assert load_key(tmp_path / "key") == data  # PathLike works too


def test_load_key_accepts_exactly_16_bytes(tmp_path) -> None:
    assert load_key(write_key(tmp_path / "key", b"k" * 16, 0o600)) == b"k" * 16


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610, 0o601])
def test_load_key_refuses_group_or_world_access(tmp_path, mode: int) -> None:
    path = write_key(tmp_path / "key", os.urandom(32), mode)
    with pytest.raises(KeyFileError) as info:
        load_key(path)
    assert path in str(info.value) and f"mode {mode:04o}" in str(info.value)


def test_load_key_refuses_empty(tmp_path) -> None:
    path = write_key(tmp_path / "key", b"", 0o600)
    with pytest.raises(KeyFileError, match="is empty") as info:
        load_key(path)
    assert path in str(info.value) and "0600" in str(info.value)


def test_load_key_refuses_short(tmp_path) -> None:
    path = write_key(tmp_path / "key", b"k" * 15, 0o600)
    with pytest.raises(KeyFileError, match="holds 15 bytes; a key needs at least 16") as info:
        load_key(path)
    assert path in str(info.value) and "0600" in str(info.value)


def test_load_key_refuses_missing(tmp_path) -> None:
    path = str(tmp_path / "nope")
    with pytest.raises(KeyFileError, match="does not exist") as info:
        load_key(path)
    assert path in str(info.value)


def test_load_key_refuses_directory(tmp_path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_key(d)


def test_load_key_refuses_huge_file(tmp_path) -> None:
    path = write_key(tmp_path / "key", b"k" * 4097, 0o600)
    with pytest.raises(KeyFileError, match="larger than 4096 bytes"):
        load_key(path)


def test_key_file_error_is_a_value_error() -> None:
    assert issubclass(KeyFileError, ValueError)


def test_load_key_refuses_a_file_owned_by_another_user(tmp_path) -> None:
    """Whoever owns the key file can read it or loosen its mode at will, even at 0600."""
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    path = write_key(tmp_path / "key", os.urandom(32), 0o600)
    os.chown(path, 65534, -1)
    with pytest.raises(KeyFileError, match="owned by uid 65534, not by this daemon's uid 0") as info:
        load_key(path)
    assert path in str(info.value)
    os.chown(path, 0, -1)
    assert len(load_key(path)) == 32


# ----------------------------------------------------------------- frames before authentication


@pytest.mark.parametrize("initiator", [False, True])
async def test_big_frame_before_authentication_refused_from_its_header(initiator: bool) -> None:
    """A peer that proved nothing cannot make this node buffer a full-size (32 MiB) frame."""
    a, b = trio.testing.memory_stream_pair()
    errors: list[Exception] = []

    async def victim() -> None:
        try:
            await authenticate(FrameStream(b), KEY, "svm", 2, initiator=initiator, nonces=NonceRegistry())
        except FrameTooLarge as exc:
            errors.append(exc)

    big = craft_header(MessageType.HELLO, 32 << 20)
    with trio.fail_after(30):  # bounds a victim that waits for the payload instead
        async with trio.open_nursery() as nursery:
            nursery.start_soon(victim)
            if initiator:
                await a.receive_some(65536)  # the victim's HELLO
            await a.send_all(big)  # the header alone: the payload never comes
    assert "frame payload 33554432 bytes exceeds the limit of 4096" in str(errors[0])
    assert "handshake frames are limited to 4096 bytes" in str(errors[0])


async def test_limits_are_restored_after_the_handshake() -> None:
    _, _, fi, fr = await run_pair(KEY, KEY)
    big = Batch(1, (Write(0, 0, os.urandom(1 << 20)),))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fi.send, big)
        assert await fr.receive() == big
    assert fr.max_wire_len == DEFAULT_MAX_WIRE_LEN
