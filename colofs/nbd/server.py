"""One NBD connection: the handshake, then the transmission phase on the export it chose.

A connection first negotiates (fixed newstyle only) within a time limit, then
serves one export. On a disk, snapshot or clone export the requests that may
wait for the secondary run as concurrent tasks and every reply goes out as
soon as it is ready, several per send (:mod:`colofs.nbd.inflight` says what
ordering and bounds still hold): a primary in ``sync`` mode keeps the
client's queue depth while its writes wait for the secondary's receipts. An ingest export serves in rounds instead: each
takes whatever the client has sent and serves every complete request in it
in order, the writes queued, in order, for a task of the connection that
applies what has accumulated as one group of forwarded primary writes with
one hidden ``fdatasync``; a write is answered once it is queued, a FUA write,
a flush or a read only once every write before it is applied
(:class:`colofs.nbd.ingest.WriteGroup` says why that is enough), and the
round's replies are sent with one ``send_all``.

On TCP with TLS configured, every option but ``NBD_OPT_STARTTLS`` and
``NBD_OPT_ABORT`` is refused until the client has switched to TLS and shown
a certificate from the configured CA (the server's context requires one):
that is the client's authentication.

Bad input never reaches the core: a request with an unknown command or flag,
a range past the end, or a zero or oversized length gets an error reply and
is not applied; a write whose payload exceeds the maximum, a wrong magic or a
malformed handshake closes the connection (its framing can no longer be
trusted).

The handshake's option loop is :mod:`colofs.nbd.handshake`'s, shared with a
supervisor that negotiates for the VMs' workers: :meth:`Connection.resume`
takes over at the option where the supervisor handed the socket on.
"""

from __future__ import annotations

import errno
import logging
import ssl
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from colofs.core.errors import BadRange, ColofsError, DiskIOError, RoleError
from colofs.core.fileio import Buffer
from colofs.nbd import protocol as p
from colofs.nbd.exports import Export, ExportError, Exports
from colofs.nbd.handshake import (
    META_CONTEXT_ID,
    ConnectionClosed,
    Handshake,
    info_replies,
    meta_match,
    meta_replies,
    transmission_flags,
)
from colofs.nbd.inflight import InFlight, ending, prefetch_reads
from colofs.nbd.ingest import WriteGroup

log = logging.getLogger(__name__)

__all__ = ["Connection", "ConnectionClosed", "Resume", "nbd_errno"]

REPLY_BATCH_BYTES = 4 << 20  # replies gathered past this are sent before serving more
MAX_BATCH_REQUESTS = 256


_KNOWN_FLAGS = {
    p.CMD_READ: 0,
    p.CMD_WRITE: p.CMD_FLAG_FUA,
    p.CMD_DISC: 0,
    p.CMD_FLUSH: 0,
    p.CMD_TRIM: p.CMD_FLAG_FUA,
    p.CMD_WRITE_ZEROES: p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE,
    p.CMD_BLOCK_STATUS: p.CMD_FLAG_REQ_ONE,
}


def nbd_errno(exc: BaseException) -> int:
    """The NBD error a failed core call is answered with."""
    if isinstance(exc, BadRange):
        return p.EINVAL
    if isinstance(exc, RoleError):
        return p.EPERM
    if isinstance(exc, DiskIOError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return p.ENOSPC
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return p.ENOSPC
    return p.EIO


@dataclass(frozen=True)
class Resume:
    """Where another process left a handshake: at the option that chose an export, not yet answered."""

    option: int  # NBD_OPT_GO or NBD_OPT_EXPORT_NAME
    export: str
    infos: tuple[int, ...] = ()
    client_flags: int = p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
    structured: bool = False
    meta: str | None = None  # the export base:allocation was set for


class _Replies:
    """The replies of one round, sent together."""

    __slots__ = ("count", "parts", "size", "written")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.parts: list[bytes | bytearray] = []
        self.size = 0
        self.count = 0
        self.written = False  # some reply answers a write: the kernel's cached pages are stale

    def add(self, reply: bytes, data: bytearray | None, wrote: bool) -> None:
        self.parts.append(reply)
        self.size += len(reply)
        if data:
            self.parts.append(data)
            self.size += len(data)
        self.written |= wrote
        self.count += 1

    @property
    def full(self) -> bool:
        return self.size >= REPLY_BATCH_BYTES or self.count >= MAX_BATCH_REQUESTS


class Connection(Handshake[Export]):
    """One client: the handshake, then the transmission phase on the export it chose."""

    def __init__(self, stream: trio.abc.Stream, exports: Exports, label: str,
                 tls: ssl.SSLContext | None = None) -> None:
        super().__init__(stream, label, tls)
        self.exports = exports
        self.shield: trio.CancelScope | None = None  # around the requests being served, if any
        self.inline_shield: trio.CancelScope | None = None  # around the one the receiving task serves, if any

    def cancel_requests(self) -> None:
        """Cancel the requests under way (a stop's grace is over)."""
        for scope in (self.shield, self.inline_shield):
            if scope is not None:
                scope.cancel()

    async def resume(self, at: Resume) -> Export | None:
        """Take over a handshake another process ran up to ``at``: answer that option, then go on as usual."""
        self.client_flags = at.client_flags
        self.no_zeroes = bool(at.client_flags & p.FLAG_NO_ZEROES)
        self.structured = at.structured
        self.meta = at.meta
        if at.option == p.OPT_EXPORT_NAME:
            return await self._export_name(at.export.encode())
        if at.option != p.OPT_GO:
            raise p.ProtocolError(f"a handshake cannot be resumed at option {at.option}")
        export = await self._option(at.option, p.pack_go(at.export, at.infos))
        return export if export is not None else await self.options()

    # -- handshake ---------------------------------------------------------------------

    async def _export_name(self, data: bytes) -> Export:
        try:
            export = self.exports.resolve(p.Reader(data).string(len(data)))
        except (ValueError, ExportError) as e:
            raise p.ProtocolError(f"NBD_OPT_EXPORT_NAME: {e}") from None  # the old option can only hang up
        await self.exports.cache.opened(export)
        tail = b"" if self.no_zeroes else bytes(124)
        await self.stream.send_all(struct.pack(">QH", export.size, transmission_flags(export.writable)) + tail)
        self.meta = None  # meta contexts need NBD_OPT_GO
        return export

    async def _option(self, opt: int, data: bytes) -> Export | None:
        if opt in (p.OPT_GO, p.OPT_INFO):
            return await self._go(opt, data)
        if opt == p.OPT_LIST:
            if data:
                await self._reply_error(opt, p.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            out = [p.option_reply(opt, p.REP_SERVER, p.server_entry(n, d)) for n, d in self.exports.names()]
            await self.stream.send_all(b"".join(out) + p.option_reply(opt, p.REP_ACK))
        elif opt in (p.OPT_SET_META_CONTEXT, p.OPT_LIST_META_CONTEXT):
            await self._meta_context(opt, data)
        else:
            await self._reply_error(opt, p.REP_ERR_UNSUP, f"option {opt} is not supported")
        return None

    async def _go(self, opt: int, data: bytes) -> Export | None:
        try:
            name, infos = p.parse_go(data)
        except ValueError as e:
            await self._reply_error(opt, p.REP_ERR_INVALID, str(e))
            return None
        try:
            export = self.exports.resolve(name)
        except ExportError as e:
            await self._reply_error(opt, p.REP_ERR_UNKNOWN, str(e))
            return None
        out = info_replies(opt, name=export.name, size=export.size, tflags=transmission_flags(export.writable),
                           block_size=export.block_size, description=export.description, infos=infos)
        if opt == p.OPT_INFO:
            await self.stream.send_all(b"".join(out) + p.option_reply(opt, p.REP_ACK))
            return None
        await self.exports.cache.opened(export)
        await self.stream.send_all(b"".join(out) + p.option_reply(opt, p.REP_ACK))
        if self.meta is not None and self.meta != export.name:
            self.meta = None  # contexts were chosen for another export
        return export

    async def _meta_context(self, opt: int, data: bytes) -> None:
        request = await self._meta_request(opt, data)
        if request is None:
            return
        name, queries = request
        try:
            export = self.exports.resolve(name)
        except ExportError as e:
            await self._reply_error(opt, p.REP_ERR_UNKNOWN, str(e))
            return
        match = meta_match(opt, queries)
        if opt == p.OPT_SET_META_CONTEXT:
            self.meta = export.name if match else None
        await self.stream.send_all(meta_replies(opt, match))

    # -- transmission ------------------------------------------------------------------

    async def transmit(self, export: Export) -> None:
        """Serve requests until the client disconnects.

        On an ingest export the writes among them are gathered into a
        :class:`WriteGroup` and answered once it is queued (see :meth:`_gather`);
        its applier runs beside the connection and finishes the queue when it ends.
        Any other export serves its requests as concurrent tasks (:class:`InFlight`).
        """
        group = export.write_group()
        if group is None:
            try:
                return await InFlight(self, export).run()
            finally:
                self.exports.cache.closed(export)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(group.run)
                try:
                    await self._transmit(export, group)
                finally:
                    group.close()
        except BaseExceptionGroup as eg:  # the connection's own ending (closed, bad input, a stop), as without
            raise ending(eg) from None

    async def _transmit(self, export: Export, group: WriteGroup) -> None:
        """An ingest export's rounds (see the module's docstring)."""
        cache = self.exports.cache
        held: list[p.Request] = []  # the requests in ``group``, answered once it is applied
        out = _Replies()
        try:
            while True:
                pos = 0
                buf = self.buf
                done = False
                arriving = 0  # the length of a write whose payload has not all been received yet
                prefetch_reads(export, buf)
                while len(buf) - pos >= p.REQUEST.size:
                    req = p.parse_request(buf, pos)
                    need = p.REQUEST.size
                    if req.type == p.CMD_WRITE:
                        if req.length > p.MAX_PAYLOAD:
                            raise p.ProtocolError(f"write of {req.length} bytes: more than the "
                                                  f"{p.MAX_PAYLOAD}-byte maximum payload")
                        need += req.length
                    if len(buf) - pos < need:
                        arriving = req.length if req.type == p.CMD_WRITE else 0
                        break
                    payload = b""
                    if need > p.REQUEST.size:
                        with memoryview(buf) as mv:  # one copy, and the view is gone before buf is resized
                            payload = bytes(mv[pos + p.REQUEST.size : pos + need])
                    pos += need
                    if req.type == p.CMD_DISC:
                        done = True
                        break
                    if req.type in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) \
                            and self._check(export, req) is None:
                        await self._gather(export, group, held, req, payload, out)
                    else:
                        # Every write before it applied: a read sees them, a flush covers them.
                        failed = await self._settle(export, group, held, out, drain=True)
                        if failed is not None:
                            reply, data, wrote = self._error(req, nbd_errno(failed), str(failed)), None, False
                        elif req.type == p.CMD_READ:  # nothing to leave half done: a stop may cancel it
                            reply, data, wrote = await self._serve(export, req, payload)
                        else:  # a stop lets the request under way finish (no write half applied); see NbdService.stop
                            with trio.CancelScope(shield=True) as self.shield:
                                reply, data, wrote = await self._serve(export, req, payload)
                            self.shield = None
                        out.add(reply, data, wrote)
                    if out.full:
                        await self._settle(export, group, held, out)
                        await self._send_replies(export, out)
                del buf[:pos]
                if not group.waits(arriving):
                    await self._settle(export, group, held, out)
                if out.parts:
                    await self._send_replies(export, out)
                if done:
                    return
                try:
                    await self._recv()
                except ConnectionClosed:  # half a request will never come: what was gathered is applied still
                    await self._settle(export, group, held, out)
                    raise
        finally:
            cache.closed(export)

    async def _gather(self, export: Export, group: WriteGroup, held: list[p.Request], req: p.Request,
                      payload: bytes, out: _Replies) -> None:
        """Add one checked write to ``group``; a full group is applied first, so it stays bounded.

        ``WRITE_ZEROES`` joins as pieces of zeros; a long one fills several
        groups and is answered with the group holding its last piece (or
        with the error of the first that failed, its remaining pieces left out).
        """
        if req.type == p.CMD_WRITE:
            pieces: Iterable[tuple[int, Buffer]] = ((req.offset, payload),)
        else:
            pieces = group.zero_pieces(req.offset, req.length)
        started = False
        for offset, data in pieces:
            if not group.fits(len(data)):
                failed = await self._settle(export, group, held, out)
                if failed is not None and started:
                    out.add(self._error(req, nbd_errno(failed), str(failed)), None, True)
                    return
            group.add(offset, data)
            started = True
        held.append(req)
        if req.flags & p.CMD_FLAG_FUA:
            group.sync_base = True

    async def _settle(self, export: Export, group: WriteGroup, held: list[p.Request],
                      out: _Replies, drain: bool = False) -> BaseException | None:
        """Queue the gathered writes (with ``drain``: wait until all are applied), then answer each.

        Returns the error they failed with, if any: an earlier apply's failure fails every later request.
        """
        if not (group or held or drain):
            return None
        reqs = held[:]
        held.clear()
        failed: BaseException | None = None
        try:
            with trio.CancelScope(shield=True) as self.shield:  # a stop lets the group finish, as a request
                await group.commit(drain=drain)
        except (ColofsError, OSError) as e:
            failed = e
            log.warning("nbd %s: %s: refused after a failed apply (%d writes): %s", self.label, export.name,
                        len(reqs), e)
        finally:
            self.shield = None
        for req in reqs:
            out.add(self._ok(req) if failed is None else self._error(req, nbd_errno(failed), str(failed)), None, True)
        return failed

    async def _send_replies(self, export: Export, out: _Replies) -> None:
        if out.written:  # the kernel's cached pages must not be seen once a write is acknowledged
            await self.exports.cache.written(export)
        data = b"".join(out.parts)
        out.clear()
        await self.stream.send_all(data)

    def _error(self, req: p.Request, code: int, message: str) -> bytes:
        log.debug("nbd %s: request %d at %d+%d: error %d: %s", self.label, req.type, req.offset,
                  req.length, code, message)
        if self.structured:
            return p.error_chunk(req.cookie, code, message)
        return p.simple_reply(req.cookie, code)

    def _ok(self, req: p.Request) -> bytes:
        if self.structured:
            return p.chunk(req.cookie, p.REPLY_TYPE_NONE, 0)
        return p.simple_reply(req.cookie)

    def _check(self, export: Export, req: p.Request) -> bytes | None:
        """The error reply for a request that must not reach the core, or None."""
        known = _KNOWN_FLAGS.get(req.type)
        if known is None:
            return self._error(req, p.EINVAL, f"unknown command {req.type}")
        if req.flags & ~known:
            return self._error(req, p.EINVAL, f"unknown flags {req.flags:#x} for command {req.type}")
        if req.type == p.CMD_FLUSH:
            return self._error(req, p.EINVAL, "flush with an offset or length") if req.offset or req.length else None
        writes = req.type in (p.CMD_WRITE, p.CMD_WRITE_ZEROES, p.CMD_TRIM)
        if writes and not export.writable:
            return self._error(req, p.EPERM, f"{export.name} is read-only")
        if req.length == 0:
            return self._error(req, p.EINVAL, "zero length")
        if req.type == p.CMD_READ and req.length > p.MAX_PAYLOAD:
            code = p.EOVERFLOW if self.structured else p.EINVAL
            return self._error(req, code, f"read of {req.length} bytes: more than {p.MAX_PAYLOAD}")
        if req.offset + req.length > export.size:
            code = p.ENOSPC if req.type in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.EINVAL
            return self._error(req, code, f"{req.length} bytes at {req.offset} end past the size of {export.size}")
        if req.type == p.CMD_BLOCK_STATUS and self.meta != export.name:
            return self._error(req, p.EINVAL, "no base:allocation context was negotiated")
        return None

    async def _serve(self, export: Export, req: p.Request, payload: bytes) -> tuple[bytes, bytearray | None, bool]:
        """One request's reply header, the data read (kept apart: no copy), and whether it changed the image."""
        refused = self._check(export, req)
        if refused is not None:
            return refused, None, False
        typ = req.type
        try:
            if typ == p.CMD_READ:
                data = await export.read(req.offset, req.length)
                if self.structured:
                    head = p.chunk(req.cookie, p.REPLY_TYPE_OFFSET_DATA, 8 + len(data)) + struct.pack(">Q", req.offset)
                    return head, data, False
                return p.simple_reply(req.cookie), data, False
            if typ == p.CMD_WRITE:
                await export.write(req.offset, payload)
            elif typ == p.CMD_WRITE_ZEROES:
                await export.write_zeroes(req.offset, req.length)
            elif typ == p.CMD_BLOCK_STATUS:
                extents = export.allocation(req.offset, req.length, one=bool(req.flags & p.CMD_FLAG_REQ_ONE))
                return p.block_status_chunk(req.cookie, META_CONTEXT_ID, extents), None, False
            # TRIM: advisory, and the core keeps no holes in its layers; the data stays as it is.
            if typ == p.CMD_FLUSH or req.flags & p.CMD_FLAG_FUA:
                await export.flush()
        except (ColofsError, OSError) as e:
            log.warning("nbd %s: %s: request %d of %d bytes at %d failed: %s", self.label, export.name,
                        typ, req.length, req.offset, e)
            return self._error(req, nbd_errno(e), str(e)), None, typ in (p.CMD_WRITE, p.CMD_WRITE_ZEROES)
        return self._ok(req), None, typ in (p.CMD_WRITE, p.CMD_WRITE_ZEROES)
