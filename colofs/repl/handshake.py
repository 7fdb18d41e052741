"""Opening a replication connection: transport, then identity (and proof of the key).

With a shared key both sides run :func:`colofs.wire.authenticate` (mutual
HMAC challenge, reflection refused, then a MAC on every later frame) and
announce :data:`FEATURE_KEYED` in HELLO. Without a key they only exchange HELLOs; a keyless node meeting a
keyed one refuses it with ``AUTH_FAILED``, so a configuration mismatch is
reported on both sides instead of silently running unauthenticated.

The byte stream is whatever :func:`wrap_transport` returns: the TCP stream,
or TLS around it (:mod:`colofs.repl.tls`) when both nodes are given
certificates; framing, handshake and sessions only need a
``trio.abc.Stream``, and the MAC stays on inside TLS.
"""

from __future__ import annotations

import secrets

import trio

from colofs.repl.tls import TlsConfig, wrap_tls
from colofs.wire.auth import HANDSHAKE_MAX_FRAME, PROTO_VERSION, NonceRegistry, authenticate
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
from colofs.wire.messages import NONCE_LEN, Error, ErrorCode, Hello, Role
from colofs.wire.stream import FrameStream

FEATURE_KEYED = 0x1
FEATURE_RECEIPTS = 0x2
"""In a primary's HELLO: send RECEIPTs. In a secondary's: it can. A secondary sends them only
to a primary whose HELLO asked, and a primary takes them only from a secondary that announced
them; a peer that knows neither bit ignores it and gets none (docs/design.md, the wire)."""


async def wrap_transport(stream: trio.abc.Stream, *, server_side: bool, tls: TlsConfig | None = None,
                         peer: str = "the peer") -> trio.abc.Stream:
    """The stream frames travel on: ``stream`` itself, or TLS over it with ``tls``.

    The TLS handshake runs on the first read or write, that is inside
    :func:`handshake` and its timeout; its failures are
    raised as :class:`~colofs.repl.tls.TlsError`, naming ``peer`` and the reason.
    """
    if tls is None:
        return stream
    return wrap_tls(stream, tls, server_side=server_side, peer=peer)


async def refuse(fs: FrameStream, code: int, text: str) -> None:
    """Tell the peer why we close (best effort, briefly)."""
    with trio.move_on_after(1.0):
        try:
            await fs.send(Error(code, text))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ProtocolError):
            pass


async def handshake(
    fs: FrameStream,
    key: bytes | None,
    node_id: str,
    role: Role,
    *,
    initiator: bool,
    nonces: NonceRegistry,
    timeout: float,
    features: int = 0,
) -> Hello:
    """Run the opening exchange and check that the peer has the other role; returns its HELLO.

    ``features``: the optional bits this side announces (``FEATURE_RECEIPTS``);
    ``FEATURE_KEYED`` is added with a key.
    """
    if key is not None:
        peer = await authenticate(
            fs, key, node_id, role, initiator=initiator, features=features | FEATURE_KEYED,
            timeout=timeout, nonces=nonces,
        )
    else:
        try:
            with trio.fail_after(timeout), fs.limited(HANDSHAKE_MAX_FRAME, "handshake"):
                peer = await _plain_hello(fs, node_id, role, initiator=initiator, features=features)
        except trio.TooSlowError:
            raise AuthError(f"handshake timed out after {timeout:g} s") from None
    want = Role.SECONDARY if role == Role.PRIMARY else Role.PRIMARY
    if peer.role != want:
        text = (f"peer {peer.node_id!r} announces role {Role(peer.role).name.lower()}, "
                f"a {role.name.lower()} only talks to a {want.name.lower()}")
        await refuse(fs, ErrorCode.HANDSHAKE_REFUSED, text)
        raise AuthError(text)
    return peer


async def _plain_hello(fs: FrameStream, node_id: str, role: Role, *, initiator: bool, features: int) -> Hello:
    own = Hello(PROTO_VERSION, node_id, role, secrets.token_bytes(NONCE_LEN), features)
    if initiator:
        await fs.send(own)
    peer = await _expect_hello(fs)
    exc: ProtocolError | None = None
    code = ErrorCode.HANDSHAKE_REFUSED
    if peer.proto != PROTO_VERSION:
        exc = BadVersion(f"peer {peer.node_id!r} speaks colofs protocol {peer.proto}, this node {PROTO_VERSION}")
    elif peer.features & FEATURE_KEYED:
        code = ErrorCode.AUTH_FAILED
        exc = WrongKey(
            f"peer {peer.node_id!r} authenticates with a shared key but this node has none "
            f"(give both nodes the same --key-file)"
        )
    elif peer.node_id == node_id:
        exc = ReflectedChallenge(f"peer claims our own node id {node_id!r}")
    if exc is not None:
        await refuse(fs, code, str(exc))
        raise exc
    if not initiator:
        await fs.send(own)
    return peer


async def _expect_hello(fs: FrameStream) -> Hello:
    try:
        msg = await fs.receive()
    except (ConnectionClosed, TruncatedFrame) as exc:
        raise type(exc)(f"{exc} during the handshake (waiting for HELLO)") from None
    except ProtocolError as exc:
        await refuse(fs, ErrorCode.PROTOCOL_ERROR, str(exc))
        raise
    if isinstance(msg, Hello):
        return msg
    if isinstance(msg, Error):
        if msg.code == ErrorCode.AUTH_FAILED:
            raise WrongKey(f"peer refused the handshake: {msg.message}")
        raise AuthError(f"peer refused the handshake (error {msg.code}: {msg.message})")
    exc = UnexpectedMessage(
        f"expected HELLO, got {msg.TYPE.name}; nothing is accepted before the handshake completes"
    )
    await refuse(fs, ErrorCode.HANDSHAKE_REFUSED, str(exc))
    raise exc
