"""Optional TLS under the replication frames: confidentiality, and certificates both ways.

The shared key already authenticates every frame (:mod:`colofs.wire.mac`);
TLS adds what the MAC cannot: nobody on the path reads the guest's data. Both
nodes present a certificate and verify the other's against the same CA
(``--tls-ca``), so a node without a certificate from that CA is refused at
the TLS handshake, before it can send a single colofs frame. The MAC stays on
inside TLS: a mistake in the certificate setup never turns authentication
off.

Any certificate the CA signed is accepted (host names are not checked): use
a CA dedicated to the replication pair.

A TLS failure surfaces as :class:`TlsError` (a
:class:`~colofs.wire.errors.AuthError`) with the reason in words: the peer's
certificate expired or comes from another CA, the peer refused ours, or the
peer does not speak TLS at all.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import trio

from colofs.repl.errors import ReplConfigError
from colofs.wire.errors import AuthError
from colofs.wire.frames import MAGIC as FRAME_MAGIC

_NOT_TLS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG",
            "RECORD_LAYER_FAILURE", "UNEXPECTED_RECORD", "WRONG_SSL_VERSION")
_OPTIONS = "--tls-cert, --tls-key and --tls-ca"


TLS_HANDSHAKE_RECORD = b"\x16\x03"
"""How a TLS client's first bytes start: a handshake record (type 22) of protocol major version 3."""
HEAD_LEN = max(len(TLS_HANDSHAKE_RECORD), len(FRAME_MAGIC))
"""How many bytes after the route preamble :func:`transport_refusal` looks at."""


def transport_refusal(head: bytes, tls: bool) -> str | None:
    """Why a connection whose first bytes after the route preamble are ``head`` cannot work here; None if it may.

    A primary with ``--tls-*`` starts TLS (a handshake record) and one
    without starts its first frame (:data:`colofs.wire.frames.MAGIC`), right
    after the preamble, before waiting for anything; so a secondary can tell
    from these bytes that the two nodes' TLS settings differ, and refuse at
    once instead of handing the connection to a process whose handshake
    can only fail. ``tls``: this node has TLS configured.
    """
    if not head:
        return "the connection closed right after the route preamble"
    starts_tls = TLS_HANDSHAKE_RECORD.startswith(head[:len(TLS_HANDSHAKE_RECORD)])
    if tls and not starts_tls:
        what = "a colofs frame" if FRAME_MAGIC.startswith(head[:len(FRAME_MAGIC)]) else repr(head)
        return (f"the peer does not speak TLS (it sent {what} where a TLS handshake starts); "
                f"give both nodes {_OPTIONS}")
    if not tls and starts_tls:
        return f"the peer starts TLS: it has {_OPTIONS} and this node has none"
    if not tls and not FRAME_MAGIC.startswith(head[:len(FRAME_MAGIC)]):
        return f"bad frame magic {head!r}, expected {FRAME_MAGIC!r}"
    return None


class TlsError(AuthError):
    """The TLS handshake failed, or TLS broke: the peer is not who the CA vouches for."""


@dataclass(frozen=True)
class TlsConfig:
    """The node's certificate, its private key and the CA both nodes' certificates come from."""

    cert: str
    key: str
    ca: str
    server: ssl.SSLContext
    client: ssl.SSLContext

    @classmethod
    def load(cls, cert: str, key: str, ca: str) -> TlsConfig:
        """Read the files now, so a bad one stops the start instead of every connection."""
        return cls(cert, key, ca, _context(ssl.PROTOCOL_TLS_SERVER, cert, key, ca),
                   _context(ssl.PROTOCOL_TLS_CLIENT, cert, key, ca))


def _context(protocol: int, cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # any certificate of the pair's CA; see the module docstring
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ReplConfigError(f"--tls-cert {cert} / --tls-key {key}: {_reason(e)}") from None
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise ReplConfigError(f"--tls-ca {ca}: {_reason(e)}") from None
    return ctx


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"the peer's certificate does not verify against --tls-ca: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        reason = e.reason or ""
        if any(r in reason for r in _NOT_TLS):
            return f"the peer does not speak TLS ({reason}); give both nodes {_OPTIONS}"
        if "ALERT" in reason:
            what = reason.lower().replace("_", " ").replace("sslv3 ", "").replace("tlsv1 ", "")
            return f"the peer refused our certificate ({what}); is it from the peer's --tls-ca?"
        return reason.lower().replace("_", " ") or str(e)
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e) or type(e).__name__


class TlsStream(trio.abc.Stream):
    """A ``trio.SSLStream`` whose failures say why: :class:`TlsError` for anything TLS refused.

    A node that refuses the other's certificate closes at once, often before
    its alert arrives; so a connection that breaks during the TLS handshake,
    or right after it before any data came, is reported as most likely a
    refused certificate.  Once data has flowed, a break is a lost connection
    (``trio.BrokenResourceError``) like on plain TCP.
    """

    def __init__(self, ssl_stream: trio.SSLStream[trio.abc.Stream], peer: str) -> None:
        self.ssl_stream = ssl_stream
        self.peer = peer
        self._handshook = False
        self._received = False
        self._failed: BaseException | None = None

    def _error(self, e: trio.BrokenResourceError, phase: str) -> BaseException:
        cause = e.__cause__
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, ssl.SSLEOFError):
            err: BaseException = TlsError(f"TLS with {self.peer} failed {phase}: {_reason(cause)}")
        elif not self._received:
            err = TlsError(
                f"TLS with {self.peer}: the connection broke {phase} ({_reason(cause or e)}): the peer "
                f"most likely refused our certificate (expired, or not from its --tls-ca); its log says why"
            )
        else:
            err = e
        self._failed = err
        return err

    def _check(self) -> None:
        """After a failure, only a plain broken-stream error: the first one said why."""
        if self._failed is not None:
            raise trio.BrokenResourceError(f"TLS with {self.peer} already failed: {self._failed}")

    async def _handshake(self) -> None:
        try:
            await self.ssl_stream.do_handshake()
        except trio.BrokenResourceError as e:
            raise self._error(e, "during the handshake") from None
        self._handshook = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        if not self._handshook:
            await self._handshake()
        try:
            await self.ssl_stream.send_all(data)
        except trio.BrokenResourceError as e:
            raise self._error(e, "after the handshake") from None

    async def wait_send_all_might_not_block(self) -> None:
        await self.ssl_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self._check()
        if not self._handshook:
            await self._handshake()
        try:
            data = await self.ssl_stream.receive_some(max_bytes)
        except trio.BrokenResourceError as e:
            raise self._error(e, "after the handshake") from None
        self._received = True
        return data

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.ssl_stream)


def wrap_tls(stream: trio.abc.Stream, tls: TlsConfig, *, server_side: bool, peer: str) -> TlsStream:
    """TLS over ``stream``; the handshake runs on first use (inside the colofs handshake's timeout)."""
    ctx = tls.server if server_side else tls.client
    return TlsStream(trio.SSLStream(stream, ctx, server_side=server_side,
                                    https_compatible=False), peer)


__all__ = ["HEAD_LEN", "TLS_HANDSHAKE_RECORD", "TlsConfig", "TlsError", "TlsStream", "transport_refusal", "wrap_tls"]
