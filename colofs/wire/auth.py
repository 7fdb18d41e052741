"""Shared-key mutual authentication (DRBD style) and key-file loading.

Both nodes hold the same secret key.  Each sends a fresh 32-byte nonce in
HELLO and proves it knows the key by answering the *peer's* nonce with::

    mac = HMAC-SHA256(key, b"colofs-auth-v1\\0" + peer_nonce + own_node_id + bytes([own_role]))

Binding the answerer's node id and role into the MAC means a MAC can never be
replayed under another identity, and a fresh nonce per connection means an
old transcript is useless.

The exchange is strictly alternating, initiator first::

    initiator                      responder
    HELLO(nonce_i)        ->
                          <-       HELLO(nonce_r)
    AUTH(mac over nonce_r) ->
                          <-       AUTH(mac over nonce_i)
    AUTH_OK               ->
                          <-       AUTH_OK

After both AUTH_OKs every frame, both ways, carries a MAC under per-direction
session keys derived from the key and both nonces (:mod:`~colofs.wire.mac`):
the handshake alone would prove who opened the connection, not who sends
what follows.  Frames of the handshake itself are limited to
:data:`HANDSHAKE_MAX_FRAME` bytes, so a stranger cannot make this node buffer
a full-size frame.

The handshake never depends on transport buffering (it completes over a
zero-buffer stream) and the responder, which accepts unknown connections,
reveals no MAC before the initiator has proved the key.  A reflection attack
(handing our own challenge back to us, on this or a parallel connection) is
refused outright: the peer's nonce must be neither ours nor any nonce this
node has outstanding (:class:`NonceRegistry`), and the peer must not claim our
node id.

Refusals are sent to the peer as ERROR before raising, so both logs say why;
an ERROR received in place of the expected message ends the handshake too
(``AUTH_FAILED`` as :class:`WrongKey`).  The handshake does not enforce
complementary roles: :func:`authenticate` returns the peer's verified HELLO and
the replication layer, which knows about epochs and failover, decides.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import trio

from colofs.wire.errors import (
    AuthError,
    BadVersion,
    ConnectionClosed,
    ProtocolError,
    ReflectedChallenge,
    TruncatedFrame,
    UnexpectedMessage,
    WrongKey,
)
from colofs.wire.mac import derive_session_keys
from colofs.wire.messages import (
    NONCE_LEN,
    Auth,
    AuthOk,
    Error,
    ErrorCode,
    Hello,
    Message,
)
from colofs.wire.stream import FrameStream

PROTO_VERSION = 2
"""Protocol version announced in HELLO; peers must speak the same one.

2: with a shared key, every frame after the handshake carries a MAC.
"""

HANDSHAKE_MAX_FRAME = 4096
"""Largest frame payload accepted before the peer is authenticated (HELLO, AUTH
and ERROR need a few hundred bytes)."""

AUTH_CONTEXT = b"colofs-auth-v1\0"
KEY_MIN_LEN = 16
KEY_MAX_LEN = 4096
"""Bigger files are refused: they are almost certainly not the key file."""

DEFAULT_AUTH_TIMEOUT = 10.0
_NOTIFY_TIMEOUT = 1.0

PeerHello = Hello
"""The peer's HELLO, returned by :func:`authenticate` only after its MAC verified."""

_M = TypeVar("_M", bound=Message)


class NonceRegistry:
    """The challenge nonces one node has issued for handshakes still in progress.

    A peer presenting one of them as *its* challenge is reflecting ours (from
    this or a parallel connection) and is refused.  One registry per node,
    built where the node's parts are built (the mount daemon) and handed to
    every handshake it runs.  A process that hosts several simulated nodes (an
    in-process test of primary and secondary) gives each its own registry,
    or the handshake between them is -- correctly -- seen as reflection.
    """

    __slots__ = ("_outstanding",)

    def __init__(self) -> None:
        self._outstanding: set[bytes] = set()

    @contextmanager
    def issue(self) -> Iterator[bytes]:
        """Yield a fresh nonce, outstanding until the block exits (however it exits)."""
        nonce = secrets.token_bytes(NONCE_LEN)
        self._outstanding.add(nonce)
        try:
            yield nonce
        finally:
            self._outstanding.discard(nonce)

    def __contains__(self, nonce: object) -> bool:
        return nonce in self._outstanding

    def __len__(self) -> int:
        return len(self._outstanding)


class KeyFileError(ValueError):
    """The key file is missing, unreadable, too permissive, or not a usable key."""


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read the shared key: the file's bytes, exactly (no newline stripping).

    Both nodes must hold byte-identical copies; copy the file rather than
    retyping it.  Refused with :class:`KeyFileError` (naming the path and the
    mode) if it is missing, not a regular file, owned by another user than
    this process's (whoever owns it can read it or loosen its mode), accessible
    by group or others, empty, shorter than 16 bytes or longer than 4096.  The checks run on the
    opened descriptor, so the file cannot be swapped between check and read.
    """
    where = os.fspath(path)
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(where, flags)
    except FileNotFoundError:
        raise KeyFileError(f"key file {where} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot open key file {where}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {where} is not a regular file (mode {st.st_mode:#o})")
        if st.st_uid != os.geteuid():
            raise KeyFileError(
                f"key file {where} is owned by uid {st.st_uid}, not by this daemon's uid "
                f"{os.geteuid()}: another user could read or replace it "
                f"(chown {os.geteuid()} {where})"
            )
        if mode & 0o077:
            raise KeyFileError(
                f"key file {where} has mode {mode:04o}: it must not be accessible by "
                f"group or others (chmod 600 {where})"
            )
        chunks = []
        size = 0
        while size <= KEY_MAX_LEN:
            chunk = os.read(fd, KEY_MAX_LEN + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {where}: {exc.strerror}") from None
    finally:
        os.close(fd)
    key = b"".join(chunks)
    if not key:
        raise KeyFileError(f"key file {where} (mode {mode:04o}) is empty")
    if len(key) < KEY_MIN_LEN:
        raise KeyFileError(
            f"key file {where} (mode {mode:04o}) holds {len(key)} bytes; "
            f"a key needs at least {KEY_MIN_LEN}"
        )
    if len(key) > KEY_MAX_LEN:
        raise KeyFileError(
            f"key file {where} (mode {mode:04o}) is larger than {KEY_MAX_LEN} bytes; "
            f"is it really the key?"
        )
    return key


def auth_mac(key: bytes, peer_nonce: bytes, node_id: str, role: int) -> bytes:
    """The MAC a node with identity ``(node_id, role)`` sends to answer ``peer_nonce``."""
    msg = AUTH_CONTEXT + peer_nonce + node_id.encode("utf-8") + bytes([role])
    return hmac.new(key, msg, hashlib.sha256).digest()


async def authenticate(
    fs: FrameStream,
    key: bytes,
    node_id: str,
    role: int,
    *,
    initiator: bool,
    features: int = 0,
    nonces: NonceRegistry,
    timeout: float = DEFAULT_AUTH_TIMEOUT,
) -> PeerHello:
    """Run the mutual handshake on a fresh connection and return the peer's HELLO.

    ``initiator`` is the side that opened the connection.  Raises
    :class:`WrongKey`, :class:`ReflectedChallenge`, :class:`UnexpectedMessage`,
    :class:`BadVersion`, :class:`AuthError` (timeout, or the peer refused), or
    any other :class:`ProtocolError` from decoding.  Nothing the peer sends is
    acted upon before this returns; messages the peer sends right after its
    AUTH_OK stay buffered in ``fs``.  On success ``fs`` MACs every later frame
    both ways with this connection's session keys.  ``nonces`` is the node's
    registry of outstanding challenges (see :class:`NonceRegistry`).
    """
    if not isinstance(key, bytes | bytearray) or len(key) < KEY_MIN_LEN:
        raise ValueError(f"the shared key must be at least {KEY_MIN_LEN} bytes")
    registry = nonces
    Hello(PROTO_VERSION, node_id, role, bytes(NONCE_LEN), features)  # validate before I/O
    with registry.issue() as nonce:
        own = Hello(PROTO_VERSION, node_id, role, nonce, features)
        try:
            with trio.fail_after(timeout), fs.limited(HANDSHAKE_MAX_FRAME, "handshake"):
                if initiator:
                    peer = await _initiate(fs, bytes(key), own, registry)
                else:
                    peer = await _respond(fs, bytes(key), own, registry)
        except trio.TooSlowError:
            raise AuthError(f"authentication handshake timed out after {timeout:g} s") from None
    if initiator:
        keys = derive_session_keys(key, own.nonce, peer.nonce, own.node_id, peer.node_id,
                                   initiator=True)
    else:
        keys = derive_session_keys(key, peer.nonce, own.nonce, peer.node_id, own.node_id,
                                   initiator=False)
    fs.require_mac(keys)
    return peer


async def _initiate(fs: FrameStream, key: bytes, own: Hello, nonces: NonceRegistry) -> Hello:
    await fs.send(own)
    peer = await _expect(fs, Hello)
    await _check_hello(fs, own, peer, nonces)
    await fs.send(Auth(auth_mac(key, peer.nonce, own.node_id, own.role)))
    answer = await _expect(fs, Auth)
    await _verify(fs, key, own, peer, answer)
    await fs.send(AuthOk())
    await _expect(fs, AuthOk)
    return peer


async def _respond(fs: FrameStream, key: bytes, own: Hello, nonces: NonceRegistry) -> Hello:
    peer = await _expect(fs, Hello)
    await _check_hello(fs, own, peer, nonces)
    await fs.send(own)
    answer = await _expect(fs, Auth)
    await _verify(fs, key, own, peer, answer)
    await fs.send(Auth(auth_mac(key, peer.nonce, own.node_id, own.role)))
    await _expect(fs, AuthOk)
    await fs.send(AuthOk())
    return peer


async def _expect(fs: FrameStream, cls: type[_M]) -> _M:
    """Receive the next message and insist it is a ``cls``."""
    want = cls.TYPE.name
    try:
        msg = await fs.receive()
    except (ConnectionClosed, TruncatedFrame) as exc:
        raise type(exc)(f"{exc} during authentication (waiting for {want})") from None
    except ProtocolError as exc:
        await _refuse(fs, ErrorCode.PROTOCOL_ERROR, str(exc), exc)
    if isinstance(msg, cls):
        return msg
    if isinstance(msg, Error):
        if msg.code == ErrorCode.AUTH_FAILED:
            raise WrongKey(f"peer rejected our key (error {msg.code}: {msg.message})")
        raise AuthError(f"peer refused the handshake (error {msg.code}: {msg.message})")
    exc = UnexpectedMessage(
        f"expected {want} during authentication, got {msg.TYPE.name}; "
        f"nothing is accepted before the handshake completes"
    )
    await _refuse(fs, ErrorCode.HANDSHAKE_REFUSED, str(exc), exc)


async def _check_hello(fs: FrameStream, own: Hello, peer: Hello, nonces: NonceRegistry) -> None:
    exc: ProtocolError | None = None
    if peer.proto != PROTO_VERSION:
        exc = BadVersion(
            f"peer {peer.node_id!r} speaks colofs protocol {peer.proto}, "
            f"this node speaks {PROTO_VERSION}"
        )
    elif peer.nonce == own.nonce:
        exc = ReflectedChallenge(f"peer {peer.node_id!r} echoed our own challenge nonce")
    elif peer.nonce in nonces:
        exc = ReflectedChallenge(
            f"peer {peer.node_id!r} sent a nonce this node issued on another connection "
            f"(several nodes in one process need one NonceRegistry each)"
        )
    elif peer.node_id == own.node_id:
        exc = ReflectedChallenge(f"peer claims our own node id {own.node_id!r}")
    if exc is not None:
        await _refuse(fs, ErrorCode.HANDSHAKE_REFUSED, str(exc), exc)


async def _verify(fs: FrameStream, key: bytes, own: Hello, peer: Hello, answer: Auth) -> None:
    expected = auth_mac(key, own.nonce, peer.node_id, peer.role)
    if not hmac.compare_digest(expected, answer.mac):
        exc = WrongKey(f"MAC from peer {peer.node_id!r} does not verify: the shared keys differ")
        await _refuse(fs, ErrorCode.AUTH_FAILED, "authentication failed", exc)


async def _refuse(fs: FrameStream, code: int, text: str, exc: ProtocolError) -> NoReturn:
    """Tell the peer why (best effort, briefly), then raise ``exc``."""
    with trio.move_on_after(_NOTIFY_TIMEOUT):
        try:
            await fs.send(Error(code, text))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    raise exc


__all__ = [
    "AUTH_CONTEXT",
    "DEFAULT_AUTH_TIMEOUT",
    "HANDSHAKE_MAX_FRAME",
    "KEY_MAX_LEN",
    "KEY_MIN_LEN",
    "PROTO_VERSION",
    "KeyFileError",
    "NonceRegistry",
    "PeerHello",
    "auth_mac",
    "authenticate",
    "load_key",
]
