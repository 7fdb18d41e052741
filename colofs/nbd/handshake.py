"""The fixed newstyle handshake up to the option that chooses an export, for both sides that run it.

A single-process server (:class:`colofs.nbd.server.Connection`) runs the
whole handshake and then serves the export it chose. With a process per VM
the supervisor (:class:`colofs.nbd.handoff.FrontConnection`) runs it only up
to the option that chooses an export, reading no byte past that option's
request, and hands the socket to the VM's worker, whose ``Connection``
resumes at that very option. What both share is here: the greeting, the
client's flags, the option loop and its bounds, ``NBD_OPT_ABORT``,
``NBD_OPT_STARTTLS`` and ``NBD_OPT_STRUCTURED_REPLY``, and the packing of
the answers both give (export information, meta contexts).
"""

from __future__ import annotations

import logging
import ssl
import struct
from typing import Generic, TypeVar

import trio

from colofs.nbd import protocol as p

log = logging.getLogger(__name__)

T = TypeVar("T")

RECV_SIZE = 1 << 20
MAX_OPTIONS = 64  # options one handshake may send
META_CONTEXT_ID = 1


class ConnectionClosed(Exception):
    """The client went away (between requests: a normal end)."""


def transmission_flags(writable: bool) -> int:
    """The transmission flags an export is announced with."""
    flags = p.TF_HAS_FLAGS | p.TF_SEND_FLUSH | p.TF_SEND_FUA | p.TF_CAN_MULTI_CONN
    if writable:
        return flags | p.TF_SEND_TRIM | p.TF_SEND_WRITE_ZEROES
    return flags | p.TF_READ_ONLY


def info_replies(opt: int, *, name: str, size: int, tflags: int, block_size: int, description: str,
                 infos: list[int]) -> list[bytes]:
    """The ``NBD_REP_INFO`` replies of ``NBD_OPT_GO``/``INFO`` (the ACK is the caller's)."""
    out = [p.option_reply(opt, p.REP_INFO, p.info_export(size, tflags)),
           p.option_reply(opt, p.REP_INFO, p.info_block_size(1, block_size, p.MAX_PAYLOAD))]
    if p.INFO_NAME in infos:
        out.append(p.option_reply(opt, p.REP_INFO, p.info_name(name)))
    if p.INFO_DESCRIPTION in infos:
        out.append(p.option_reply(opt, p.REP_INFO, p.info_description(description)))
    return out


def meta_match(opt: int, queries: list[str]) -> bool:
    """Whether ``base:allocation`` (the one context served) answers these queries."""
    if opt == p.OPT_LIST_META_CONTEXT:
        return not queries or any(q in ("base:", p.META_BASE_ALLOCATION) for q in queries)
    return p.META_BASE_ALLOCATION in queries


def meta_replies(opt: int, match: bool) -> bytes:
    """The replies to a meta context option, its ACK included."""
    out = p.option_reply(opt, p.REP_META_CONTEXT, p.meta_context(META_CONTEXT_ID, p.META_BASE_ALLOCATION)
                         ) if match else b""
    return out + p.option_reply(opt, p.REP_ACK)


class Handshake(Generic[T]):
    """Option haggling; a subclass says what choosing an export yields (``T``) and answers the options that name one."""

    exact = False
    """Read no byte past the option being handled (a process that hands the socket on must)."""
    no_tls = "TLS is offered on the TCP port of a node with certificates only"
    """Why ``NBD_OPT_STARTTLS`` is refused where no TLS is configured."""

    def __init__(self, stream: trio.abc.Stream, label: str, tls: ssl.SSLContext | None = None) -> None:
        self.stream = stream
        self.tls = tls  # TLS required first (the TCP listener of a node with certificates)
        self.secure = False
        self.label = label
        self.buf = bytearray()
        self.structured = False
        self.meta: str | None = None  # the export base:allocation was set for
        self.no_zeroes = False
        self.client_flags = 0

    # -- bytes in and out ------------------------------------------------------------

    async def _recv(self, limit: int = RECV_SIZE) -> None:
        data = await self.stream.receive_some(limit)
        if not data:
            raise ConnectionClosed
        self.buf += data

    async def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._recv(n - len(self.buf) if self.exact else RECV_SIZE)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def _send_quietly(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _reply_error(self, opt: int, code: int, message: str) -> None:
        log.info("nbd %s: option %d refused: %s", self.label, opt, message)
        await self.stream.send_all(p.option_reply(opt, code, message.encode()[:1024]))

    # -- the haggling ----------------------------------------------------------------

    async def handshake(self) -> T | None:
        """Greet and negotiate; what the chosen export yields, or None when the client aborted."""
        await self.stream.send_all(p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT,
                                                   p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", await self._read_exact(4))
        if cflags & ~p.CLIENT_FLAGS_KNOWN or not cflags & p.FLAG_FIXED_NEWSTYLE:
            raise p.ProtocolError(f"client flags {cflags:#x}: only the fixed newstyle handshake is served")
        self.client_flags = cflags
        self.no_zeroes = bool(cflags & p.FLAG_NO_ZEROES)
        return await self.options()

    async def options(self) -> T | None:
        """Read and answer options until one chooses an export (its result) or the client aborts (None)."""
        for _ in range(MAX_OPTIONS):
            magic, opt, length = p.OPTION_HEADER.unpack(await self._read_exact(p.OPTION_HEADER.size))
            if magic != p.IHAVEOPT:
                raise p.ProtocolError(f"bad option magic {magic:#x}")
            if length > p.MAX_OPTION_LEN:
                raise p.ProtocolError(f"option {opt} with {length} bytes of data")
            data = await self._read_exact(length)
            if opt == p.OPT_STARTTLS:
                await self._starttls(data)
                continue
            if self.tls is not None and not self.secure and opt != p.OPT_ABORT:
                if opt == p.OPT_EXPORT_NAME:
                    raise p.ProtocolError("NBD_OPT_EXPORT_NAME before TLS: this port requires TLS")
                await self._reply_error(opt, p.REP_ERR_TLS_REQD, "this port requires TLS (NBD_OPT_STARTTLS) first")
                continue
            if opt == p.OPT_ABORT:
                await self._send_quietly(p.option_reply(opt, p.REP_ACK))
                return None
            if opt == p.OPT_EXPORT_NAME:
                return await self._export_name(data)
            if opt == p.OPT_STRUCTURED_REPLY:
                await self._structured_reply(data)
                continue
            chosen = await self._option(opt, data)
            if chosen is not None:
                return chosen
        raise p.ProtocolError(f"more than {MAX_OPTIONS} options")

    async def _starttls(self, data: bytes) -> None:
        opt = p.OPT_STARTTLS
        if self.tls is None:
            await self._reply_error(opt, p.REP_ERR_POLICY, self.no_tls)
        elif self.secure or data:
            await self._reply_error(opt, p.REP_ERR_INVALID, "TLS is on already" if self.secure
                                    else "NBD_OPT_STARTTLS takes no data")
        else:
            if self.buf:
                raise p.ProtocolError("bytes sent after NBD_OPT_STARTTLS before the TLS handshake")
            await self.stream.send_all(p.option_reply(opt, p.REP_ACK))
            tls = trio.SSLStream(self.stream, self.tls, server_side=True, https_compatible=False)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as e:
                raise p.ProtocolError(f"TLS handshake failed: {e.__cause__ or e}") from None
            self.stream = tls
            self.secure = True
            log.info("nbd %s: TLS on, client certificate verified", self.label)

    async def _structured_reply(self, data: bytes) -> None:
        opt = p.OPT_STRUCTURED_REPLY
        if data:
            await self._reply_error(opt, p.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            return
        self.structured = True
        await self.stream.send_all(p.option_reply(opt, p.REP_ACK))

    async def _meta_request(self, opt: int, data: bytes) -> tuple[str, list[str]] | None:
        """A meta context option's export name and queries, or None once it was refused."""
        if not self.structured:
            await self._reply_error(opt, p.REP_ERR_INVALID, "meta contexts need structured replies first")
            return None
        try:
            return p.parse_meta_context(data)
        except ValueError as e:
            await self._reply_error(opt, p.REP_ERR_INVALID, str(e))
            return None

    async def _export_name(self, data: bytes) -> T:
        """``NBD_OPT_EXPORT_NAME``: it chooses or hangs up (the old option has no error reply)."""
        raise NotImplementedError

    async def _option(self, opt: int, data: bytes) -> T | None:
        """Any other option: answer it; what it chose, or None to go on negotiating."""
        raise NotImplementedError
