"""A connection's requests served as concurrent tasks where that pays, replies sent as they complete.

NBD lets a server complete a connection's requests in any order (each reply
names its request's cookie). Served one after another, a primary in ``sync``
mode would answer at queue depth 1 whatever the client's depth: each write
waits for the secondary's receipt before the next one starts. Here a request
that may wait for the secondary (a write or flush of a primary in ``sync``
mode) runs as a task of its own, so the writes of one connection wait for
their receipts together; any other request is served by the receiving task
in line, which costs less (see :meth:`InFlight._inline`). The replies of
what one receive brought are sent together once it is served, by the
receiving task itself; the replies of tasks that complete while it waits are
sent by a task of their own, those ready during a send with the next one.

What still holds, as when they were served in order:

* requests that overlap, one of them changing the image, run in the order
  they arrived (a request waits for the earlier overlapping ones under way);
* a ``FLUSH`` covers every write received before it (it waits for all of
  them to complete: more than the protocol asks, which is the writes already
  answered); a FUA write is flushed after it is written, as before;
* a stop lets the requests under way finish (the tasks run in one shielded
  scope, the connection's :attr:`~colofs.nbd.server.Connection.shield`, a
  request served in line in its ``inline_shield``), so no write is left half
  applied; once the grace is over those scopes are cancelled;
* what a connection holds is bounded: at most :data:`MAX_IN_FLIGHT` requests
  and :data:`IN_FLIGHT_BYTES` of their payloads and read data (a single
  larger request is admitted alone), counted until its reply is sent.

Large write payloads are received straight into their own buffer (on a
socket, ``recv_into``), not through the connection's receive buffer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import trio

from colofs.nbd import protocol as p
from colofs.nbd.exports import Export, Exports
from colofs.nbd.handshake import ConnectionClosed


class Connection(Protocol):
    """What the requests in flight need of their connection (``colofs.nbd.server.Connection``).

    A protocol rather than an import: the server imports this module.
    """

    buf: bytearray
    stream: trio.abc.Stream
    exports: Exports
    shield: trio.CancelScope | None
    inline_shield: trio.CancelScope | None

    async def _recv(self, limit: int = ...) -> None: ...

    def _check(self, export: Export, req: p.Request) -> bytes | None: ...

    async def _serve(self, export: Export, req: p.Request, payload: bytes) -> tuple[bytes, bytearray | None, bool]: ...

MAX_IN_FLIGHT = 64  # requests of one connection under way or with a reply not yet sent
IN_FLIGHT_BYTES = 32 << 20  # their write payloads and read data
DIRECT_RECV = 64 << 10  # a write payload missing more than this is received into its own buffer
SEND_ALONE = 64 << 10  # read data this large is sent by itself rather than copied into a joined reply
PREFETCH_READS = 256  # reads of one receive hinted to the device at most
REPLY_BATCH = 256  # replies gathered in a round past which they are sent before its end
REPLY_BATCH_BYTES = 4 << 20  # the same in bytes
SEND_NOW = 1 << 20  # read data the receiving task sends at once, before it serves the next request

_ORDERED = (p.CMD_READ, p.CMD_WRITE, p.CMD_WRITE_ZEROES, p.CMD_TRIM, p.CMD_BLOCK_STATUS)
_CHANGES = (p.CMD_WRITE, p.CMD_WRITE_ZEROES, p.CMD_TRIM)
_ENDINGS = (ConnectionClosed, p.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError)


def prefetch_reads(export: Export, buf: bytearray) -> int:
    """Hint the device reads of the reads in ``buf`` when there are several, so that misses overlap; hints given."""
    reads = p.read_requests(buf, PREFETCH_READS)
    if len(reads) < 2:
        return 0
    return sum(export.prefetch(offset, length) for offset, length in reads)


def ending(eg: BaseExceptionGroup) -> BaseException:
    """The one exception a connection's tasks ended with, or the group if it holds more than its ending.

    A client that hangs up may end the receiving and the sending task at
    once; either exception says the same, so the first stands for both.
    """
    if len(eg.exceptions) == 1 and not isinstance(eg.exceptions[0], BaseExceptionGroup):
        return eg.exceptions[0]
    if all(isinstance(e, (*_ENDINGS, trio.Cancelled)) for e in eg.exceptions):
        return next((e for e in eg.exceptions if not isinstance(e, trio.Cancelled)), eg.exceptions[0])
    return eg


@dataclass(eq=False, slots=True)
class _Under:
    """A request under way: the range it touches, whether it changes it, and when it is done."""

    lo: int
    hi: int
    changes: bool
    done: trio.Event = field(default_factory=trio.Event)


class InFlight:
    """The transmission phase of one connection whose requests may run at once (any export but ingest)."""

    def __init__(self, conn: Connection, export: Export) -> None:
        self.conn = conn
        self.export = export
        self.under: list[_Under] = []  # in the order the requests arrived
        self.held = 0  # requests admitted whose reply is not sent yet
        self.held_bytes = 0
        self._room = trio.Event()
        self.out: list[bytes | bytearray] = []  # replies ready, not sent yet
        self._out_held = 0
        self._out_bytes = 0
        self._out_written = False
        self._ready = trio.Event()
        self._in_round = False  # the receiving task is serving what one receive brought: replies wait for its end
        self._sending = False  # a task is in _send_out: only one sends at a time
        self._intake_closed = trio.Event()
        self._finished = False  # every request admitted has its reply in ``out``

    async def run(self) -> None:
        """Serve until the client disconnects (``NBD_CMD_DISC``: every request before it is answered first)."""
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._send)
                requests: trio.Nursery = await outer.start(self._host)
                try:
                    await self._receive(requests)
                finally:
                    self._intake_closed.set()
        except BaseExceptionGroup as eg:
            raise ending(eg) from None

    # -- receiving ---------------------------------------------------------------------

    async def _receive(self, requests: trio.Nursery) -> None:
        conn = self.conn
        export = self.export
        buf = conn.buf
        size = p.REQUEST.size
        while True:
            prefetch_reads(export, buf)
            pos = 0
            self._in_round = True
            writes_inline = self._writes_inline()
            while len(buf) - pos >= size:
                req = p.parse_request(buf, pos)
                start = pos + size
                payload: bytes | bytearray = b""
                if req.type == p.CMD_WRITE:
                    if req.length > p.MAX_PAYLOAD:
                        raise p.ProtocolError(f"write of {req.length} bytes: more than the "
                                              f"{p.MAX_PAYLOAD}-byte maximum payload")
                    have = len(buf) - start
                    if have >= req.length:
                        pos = start + req.length
                        with memoryview(buf) as mv:  # one copy, and the view is gone before buf is resized
                            payload = bytes(mv[start:pos])
                    elif req.length - have < DIRECT_RECV:
                        break  # the rest comes with the next receive
                    else:
                        payload = bytearray(req.length)
                        with memoryview(buf) as mv:
                            payload[:have] = mv[start:]
                        del buf[:]
                        pos = 0
                        await self._round_over()
                        await self._receive_into(payload, have)
                else:
                    pos = start
                if req.type == p.CMD_DISC:
                    del buf[:pos]
                    return
                cost = len(payload) if req.type == p.CMD_WRITE else req.length if req.type == p.CMD_READ else 0
                if self.held >= MAX_IN_FLIGHT or self.held_bytes + cost > IN_FLIGHT_BYTES:
                    await self._admit(cost)
                self.held += 1
                self.held_bytes += cost
                await self._start(requests, req, payload, cost, writes_inline)
            del buf[:pos]
            await self._round_over()
            await conn._recv()

    async def _receive_into(self, payload: bytearray, have: int) -> None:
        """Fill ``payload`` from byte ``have`` on with what the client sends next."""
        stream = self.conn.stream
        sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        with memoryview(payload) as mv:
            while have < len(mv):
                if sock is not None:
                    n = await sock.recv_into(mv[have:])
                else:
                    data = await stream.receive_some(len(mv) - have)
                    n = len(data)
                    mv[have : have + n] = data
                if not n:
                    raise ConnectionClosed
                have += n

    async def _admit(self, cost: int) -> None:
        """Wait until one more request of ``cost`` bytes fits the connection's bounds (the caller counts it)."""
        def full() -> bool:
            return bool(self.held) and (self.held >= MAX_IN_FLIGHT or self.held_bytes + cost > IN_FLIGHT_BYTES)

        if full():
            await self._round_over()  # room comes as replies are sent
        while full():
            self._room = trio.Event()
            await self._room.wait()

    def _writes_inline(self) -> bool:
        """Whether writes are served by the receiving task itself, before it parses the next request.

        Only what may wait for the secondary gains from a task of its own: a
        write (or flush) of a primary whose sink is in ``sync`` mode, or a
        sink that does not say. Anything else runs in line, as a round's
        requests used to: a task of its own made a 4K request cost about 13% more CPU,
        and a read's device misses already overlap through the prefetch hints.
        Asked once per receive (the mode may change meanwhile).
        """
        fwd = self.export.disk_obj.vm.forward
        return fwd is None or getattr(fwd, "mode", None) == "async"

    def _after(self, req: p.Request) -> list[trio.Event]:
        """What ``req`` must wait for: the earlier requests under way it overlaps, one of them changing it."""
        if req.type == p.CMD_FLUSH:  # every write received before it
            return [u.done for u in self.under if u.changes]
        lo, hi = req.offset, req.offset + req.length
        changes = req.type in _CHANGES
        return [u.done for u in self.under if u.lo < hi and lo < u.hi and (changes or u.changes)]

    async def _start(self, requests: trio.Nursery, req: p.Request, payload: bytes | bytearray, cost: int,
                     writes_inline: bool) -> None:
        """Serve a request in line, or start its task; either once what it must follow is done."""
        typ = req.type
        if typ in (p.CMD_READ, p.CMD_BLOCK_STATUS) or writes_inline:
            if self.under:
                for event in self._after(req):
                    await event.wait()
            if typ in (p.CMD_READ, p.CMD_BLOCK_STATUS):  # nothing to leave half done: a stop may cancel it
                reply, data, wrote = await self.conn._serve(self.export, req, payload)
            else:
                with trio.CancelScope(shield=True) as self.conn.inline_shield:  # a stop lets it finish
                    reply, data, wrote = await self.conn._serve(self.export, req, payload)
                self.conn.inline_shield = None
            self._reply(reply, data, wrote, cost)
            if self._out_bytes >= SEND_NOW:  # sent before the next read: its buffer is reused, not faulted in anew
                await self._send_if_idle()
            return
        refused = self.conn._check(self.export, req)
        if refused is not None:
            self._reply(refused, None, False, cost)
            return
        after = self._after(req) if self.under else []
        mine = _Under(req.offset, req.offset + req.length, typ in _CHANGES) if typ in _ORDERED else None
        if mine is not None:
            self.under.append(mine)
        requests.start_soon(self._serve, req, payload, cost, after, mine)

    async def _serve(self, req: p.Request, payload: bytes | bytearray, cost: int, after: list[trio.Event],
                     mine: _Under | None) -> None:
        try:
            for event in after:
                await event.wait()
            reply, data, wrote = await self.conn._serve(self.export, req, payload)
        finally:
            if mine is not None:
                mine.done.set()
                self.under.remove(mine)
        self._reply(reply, data, wrote, cost)

    # -- replying ----------------------------------------------------------------------

    def _reply(self, reply: bytes, data: bytearray | None, wrote: bool, cost: int) -> None:
        self.out.append(reply)
        if data:
            self.out.append(data)
        self._out_held += 1
        self._out_bytes += cost
        self._out_written |= wrote
        if not self._in_round or self._out_held >= REPLY_BATCH or self._out_bytes >= REPLY_BATCH_BYTES:
            self._ready.set()

    async def _round_over(self) -> None:
        """The receiving task is about to wait: it sends the replies gathered meanwhile itself, in one send.

        (A task switch to the sending task would cost about as much again as
        a 4K request.) If that task is sending, it takes them with its next send.
        """
        self._in_round = False
        await self._send_if_idle()

    async def _send_if_idle(self) -> None:
        if self.out and not self._sending:
            self._sending = True
            try:
                await self._send_out()
            finally:
                self._sending = False

    async def _send(self) -> None:
        """Send the replies of tasks that complete while the receiving task waits; end after the last one."""
        while True:
            await self._ready.wait()
            self._ready = trio.Event()
            if not self._sending:
                self._sending = True
                try:
                    await self._send_out()
                finally:
                    self._sending = False
            if self._finished and not self.out:
                return

    async def _send_out(self) -> None:
        """Send every reply ready, those that become ready during a send with the next (the caller is the sender)."""
        cache = self.conn.exports.cache
        while self.out:
            parts, held, nbytes, written = self.out, self._out_held, self._out_bytes, self._out_written
            self.out, self._out_held, self._out_bytes, self._out_written = [], 0, 0, False
            if written:  # the kernel's cached pages must not be seen once a write is acknowledged
                await cache.written(self.export)
            for data in _coalesced(parts):
                await self.conn.stream.send_all(data)
            self.held -= held
            self.held_bytes -= nbytes
            self._room.set()

    # -- the requests' scope -----------------------------------------------------------

    async def _host(self, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery the requests run in, shielded: a stop lets them finish (see ``NbdService.stop``)."""
        with trio.CancelScope(shield=True) as scope:
            self.conn.shield = scope
            try:
                async with trio.open_nursery() as requests:
                    task_status.started(requests)
                    await self._intake_closed.wait()
            finally:
                self.conn.shield = None
        self._finished = True
        self._ready.set()


def _coalesced(parts: list[bytes | bytearray]) -> Iterator[bytes | bytearray]:
    """``parts`` as few sends: small ones joined, each large one (read data) sent as it is, not copied."""
    if len(parts) == 1:
        yield parts[0]
        return
    run: list[bytes | bytearray] = []
    for part in parts:
        if len(part) >= SEND_ALONE and run:
            yield b"".join(run)
            run = []
        if len(part) >= SEND_ALONE:
            yield part
        else:
            run.append(part)
    if run:
        yield b"".join(run)
