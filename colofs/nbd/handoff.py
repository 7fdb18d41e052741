"""NBD with a process per VM: the supervisor negotiates, the VM's worker serves.

One NBD socket serves every VM of a store, but with ``--workers`` each VM's
disks live in the process of its worker. So the supervisor owns the socket
(:func:`start_front`), greets each client and runs the option haggling
itself (:class:`FrontConnection`), up to the option that chooses an export
(``NBD_OPT_GO`` or ``NBD_OPT_EXPORT_NAME``), reading no byte past that
option's request. Then it hands the socket to the VM's worker over their
channel (op ``nbd_connection``, the socket in ``SCM_RIGHTS``), and the worker
answers that option and serves the transmission phase with the one server
there is (:func:`serve_handed_over`, :class:`colofs.nbd.server.Connection`).

Options that need a VM's disks are asked of its worker over the channel:
``nbd_list`` (its exports, for ``NBD_OPT_LIST``, which lists every serving
VM's) and ``nbd_describe`` (one export's size, flags and names, for
``NBD_OPT_INFO``, the meta context options, and to check the export a GO
names before handing anything over). A VM whose worker is not serving is
unknown to the client until it serves again. ``NBD_OPT_STRUCTURED_REPLY``
and the client's flags travel with the socket.

TLS cannot be handed over (its session state lives in the supervisor's
``ssl`` objects), so with ``--workers`` NBD on TCP is served only without
TLS; the configuration refuses ``--nbd-listen`` with certificates.

Bounds: the supervisor's :class:`colofs.nbd.service.Limits` cap the
connections it is negotiating and the time each may take; a worker's own
``Limits`` cap the connections it serves, and the time left to finish a
handshake it resumed (a client may go on negotiating there after an error).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from colofs.fs.inodes import InodeTable
from colofs.fs.pagecache import PageCache
from colofs.nbd import protocol as p
from colofs.nbd.exports import ExportError
from colofs.nbd.fusecache import FuseCacheLink
from colofs.nbd.handshake import (
    Handshake,
    info_replies,
    meta_match,
    meta_replies,
    transmission_flags,
)
from colofs.nbd.server import Resume
from colofs.nbd.service import Limits, Listening, NbdService, Server, connection_ending
from colofs.workers.channel import Channel, ChannelClosed, RemoteError

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0
"""How long the supervisor waits for a worker's answer about its exports (within the handshake's bound)."""
LIST_BYTES = 48 << 10
"""What one worker's ``nbd_list`` answer may hold, to stay within a channel message."""
KNOWN_INFOS = frozenset((p.INFO_EXPORT, p.INFO_NAME, p.INFO_DESCRIPTION, p.INFO_BLOCK_SIZE))

Workers = Callable[[], Mapping[str, Channel]]
"""The supervisor's serving workers now: VM name -> the channel to its worker."""


def vm_of(export: str) -> str:
    """The VM an export name (``VM/DISK...``, a leading ``/`` allowed) belongs to; "" if it names none."""
    path = export[1:] if export.startswith("/") else export
    vm, sep, _ = path.partition("/")
    return vm if sep else ""


# -- the supervisor's half ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Chosen:
    """The export a client chose, and where its handshake stands: what the worker needs to go on."""

    vm: str
    at: Resume

    def fields(self) -> dict[str, Any]:
        """The ``nbd_connection`` message's fields (besides ``peer``)."""
        return {"export": self.at.export, "option": {"code": self.at.option, "infos": list(self.at.infos)},
                "flags": self.at.client_flags, "structured": self.at.structured, "meta": self.at.meta}


def resume_of(msg: Mapping[str, Any]) -> Resume:
    """The :class:`Resume` an ``nbd_connection`` message describes; :class:`ValueError` if it is malformed."""
    option, export, flags, meta = msg.get("option"), msg.get("export"), msg.get("flags"), msg.get("meta")
    if not isinstance(option, dict) or not isinstance(export, str) or not isinstance(flags, int):
        raise ValueError("nbd_connection needs option {code, infos}, export and flags")
    code, infos = option.get("code"), option.get("infos", [])
    if code not in (p.OPT_GO, p.OPT_EXPORT_NAME) or not isinstance(infos, list) or len(infos) > len(KNOWN_INFOS):
        raise ValueError(f"nbd_connection: option {option!r} is not one a handshake resumes at")
    if not all(isinstance(i, int) and i in KNOWN_INFOS for i in infos):
        raise ValueError(f"nbd_connection: information requests {infos!r}")
    if flags & ~p.CLIENT_FLAGS_KNOWN or not flags & p.FLAG_FIXED_NEWSTYLE:
        raise ValueError(f"nbd_connection: client flags {flags:#x}")
    if meta is not None and not isinstance(meta, str):
        raise ValueError("nbd_connection: meta must be an export name or null")
    return Resume(code, export, tuple(infos), flags, bool(msg.get("structured")), meta)


class FrontConnection(Handshake[Chosen]):
    """The supervisor's side of one client's handshake: every option up to the choice of an export."""

    exact = True  # the socket goes to another process after the choice: nothing past it may be read here
    no_tls = "TLS is not offered with a process per VM (--workers): a TLS session cannot be handed to a worker"

    def __init__(self, stream: trio.abc.Stream, workers: Workers, label: str,
                 call_timeout: float = CALL_TIMEOUT) -> None:
        super().__init__(stream, label)
        self.workers = workers
        self.call_timeout = call_timeout

    async def _describe(self, opt: int, name: str) -> dict[str, Any] | None:
        """The worker's description of export ``name``, or None once the option was refused for it."""
        vm = vm_of(name)
        channel = self.workers().get(vm) if vm else None
        if channel is None:
            why = f"export {name!r}: " + (f"no worker serves VM {vm!r} now" if vm else
                                            "name an export VM/DISK or VM/DISK@SNAPSHOT")
            if opt == p.OPT_EXPORT_NAME:
                raise p.ProtocolError(f"NBD_OPT_EXPORT_NAME: {why}")
            await self._reply_error(opt, p.REP_ERR_UNKNOWN, why)
            return None
        try:
            return await channel.call("nbd_describe", timeout=self.call_timeout, export=name)
        except (RemoteError, ChannelClosed, trio.TooSlowError) as e:
            why = (e.message if isinstance(e, RemoteError) else
                   f"export {name!r}: the worker of VM {vm} did not answer ({type(e).__name__})")
            if opt == p.OPT_EXPORT_NAME:
                raise p.ProtocolError(f"NBD_OPT_EXPORT_NAME: {why}") from None
            await self._reply_error(opt, p.REP_ERR_UNKNOWN, why)
            return None

    async def _export_name(self, data: bytes) -> Chosen:
        try:
            name = p.Reader(data).string(len(data))
        except ValueError as e:
            raise p.ProtocolError(f"NBD_OPT_EXPORT_NAME: {e}") from None
        await self._describe(p.OPT_EXPORT_NAME, name)  # an unknown name hangs up here, nothing handed over
        return Chosen(vm_of(name), Resume(p.OPT_EXPORT_NAME, name, (), self.client_flags, self.structured, None))

    async def _option(self, opt: int, data: bytes) -> Chosen | None:
        if opt in (p.OPT_GO, p.OPT_INFO):
            try:
                name, infos = p.parse_go(data)
            except ValueError as e:
                await self._reply_error(opt, p.REP_ERR_INVALID, str(e))
                return None
            described = await self._describe(opt, name)
            if described is None:
                return None
            if opt == p.OPT_GO:
                wanted = tuple(sorted(set(infos) & KNOWN_INFOS))
                return Chosen(vm_of(name), Resume(p.OPT_GO, name, wanted, self.client_flags, self.structured,
                                                  self.meta))
            await self.stream.send_all(b"".join(_info(opt, described, infos)) + p.option_reply(opt, p.REP_ACK))
        elif opt == p.OPT_LIST:
            if data:
                await self._reply_error(opt, p.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            out = [p.option_reply(opt, p.REP_SERVER, p.server_entry(n, d)) for n, d in await self._list()]
            await self.stream.send_all(b"".join(out) + p.option_reply(opt, p.REP_ACK))
        elif opt in (p.OPT_SET_META_CONTEXT, p.OPT_LIST_META_CONTEXT):
            request = await self._meta_request(opt, data)
            if request is None:
                return None
            name, queries = request
            described = await self._describe(opt, name)
            if described is None:
                return None
            match = meta_match(opt, queries)
            if opt == p.OPT_SET_META_CONTEXT:
                self.meta = str(described["name"]) if match else None
            await self.stream.send_all(meta_replies(opt, match))
        else:
            await self._reply_error(opt, p.REP_ERR_UNSUP, f"option {opt} is not supported")
        return None

    async def _list(self) -> list[tuple[str, str]]:
        """Every serving VM's exports, asked of the workers at once; a worker that does not answer is left out."""
        found: dict[str, list[tuple[str, str]]] = {}

        async def one(vm: str, channel: Channel) -> None:
            try:
                reply = await channel.call("nbd_list", timeout=self.call_timeout)
            except (RemoteError, ChannelClosed, trio.TooSlowError) as e:
                log.warning("nbd %s: VM %s left out of the export list: %s", self.label, vm, e)
                return
            entries = reply.get("exports")
            if isinstance(entries, list):
                found[vm] = [(e[0], e[1]) for e in entries
                             if isinstance(e, list) and len(e) == 2 and all(isinstance(s, str) for s in e)]

        async with trio.open_nursery() as nursery:
            for vm, channel in sorted(self.workers().items()):
                nursery.start_soon(one, vm, channel)
        return [entry for vm in sorted(found) for entry in found[vm]]


def _info(opt: int, described: Mapping[str, Any], infos: list[int]) -> list[bytes]:
    return info_replies(opt, name=str(described["name"]), size=int(described["size"]),
                        tflags=int(described["flags"]), block_size=int(described["block_size"]),
                        description=str(described.get("description", "")), infos=infos)


async def negotiate_until_export(stream: trio.abc.Stream, workers: Workers, *, label: str = "nbd",
                                 call_timeout: float = CALL_TIMEOUT) -> Chosen | None:
    """Greet a client and answer its options up to the one that chooses an export (None: it aborted).

    Raises :class:`colofs.nbd.protocol.ProtocolError` for a client that broke the protocol (hang up) and
    :class:`ConnectionClosed` for one that left. Bound it in time (the caller's handshake timeout).
    """
    return await FrontConnection(stream, workers, label, call_timeout).handshake()


async def hand_over(stream: trio.SocketStream, channel: Channel, chosen: Chosen, peer: str) -> None:
    """Pass the client's socket to the VM's worker (op ``nbd_connection``); the caller then closes its copy."""
    await channel.notify("nbd_connection", fds=[stream.socket.fileno()], peer=peer, **chosen.fields())


class FrontServer(Listening):
    """The supervisor's NBD listener: negotiates each connection, then hands it to its VM's worker."""

    def __init__(self, workers: Workers, limits: Limits | None = None, call_timeout: float = CALL_TIMEOUT) -> None:
        super().__init__(limits)
        self.workers = workers
        self.call_timeout = call_timeout
        self.handed = 0  # connections passed on to workers so far

    async def handle(self, stream: trio.abc.Stream, label: str, tls: object = None) -> None:
        """One connection until it is handed over, refused or gone; the supervisor's copy is closed at the end."""
        assert isinstance(stream, trio.SocketStream)
        if stream.socket.family != socket.AF_UNIX:
            try:
                host, port = stream.socket.getpeername()[:2]
                label = f"{label} ({host}:{port})"
            except OSError:
                pass
        conn = FrontConnection(stream, self.workers, label, self.call_timeout)
        try:
            with connection_ending(label, log):
                with trio.move_on_after(self.limits.handshake_timeout) as scope:
                    chosen = await conn.handshake()
                    while chosen is not None and not await self._pass_on(conn, stream, chosen, label):
                        chosen = await conn.options()  # the client may choose again
                if scope.cancelled_caught:
                    log.warning("nbd %s: handshake not done within %.0f s: disconnected", label,
                                self.limits.handshake_timeout)
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _pass_on(self, conn: FrontConnection, stream: trio.SocketStream, chosen: Chosen, label: str) -> bool:
        """Hand ``chosen``'s connection to its worker; False (the option refused) if that worker is gone."""
        channel = self.workers().get(chosen.vm)
        try:
            if channel is None:
                raise ChannelClosed(f"no worker serves VM {chosen.vm} now")
            await hand_over(stream, channel, chosen, label)
        except (ChannelClosed, OSError) as e:
            why = f"export {chosen.at.export!r}: the worker of VM {chosen.vm} is gone ({e})"
            if chosen.at.option == p.OPT_EXPORT_NAME:
                raise p.ProtocolError(why) from None
            await conn._reply_error(chosen.at.option, p.REP_ERR_UNKNOWN, why)
            return False
        self.handed += 1
        log.info("nbd %s: %s handed to the worker of VM %s", label, chosen.at.export, chosen.vm)
        return True


async def start_front(nursery: trio.Nursery, workers: Workers, *, socket_path: str | None,
                      tcp: tuple[str, int] | None, limits: Limits | None = None) -> NbdService:
    """The supervisor's NBD service: binds (a failure is :class:`colofs.nbd.service.NbdStartError`), then serves.

    No TLS: a TLS session cannot be handed to another process.
    """
    return await NbdService.start_serving(nursery, FrontServer(workers, limits), socket_path=socket_path, tcp=tcp)


# -- the worker's half -------------------------------------------------------------------------------


class MountedVM(Protocol):
    """What a worker's mount gives its NBD server: the VM's store and the page cache to keep coherent."""

    store: Any
    inodes: InodeTable
    cache: PageCache
    _next_fh: int


async def start_worker_nbd(nursery: trio.Nursery, ops: MountedVM, enabled: bool) -> NbdService | None:
    """The worker's NBD server (no listener: it serves what the supervisor hands over); None if not ``enabled``."""
    if not enabled:
        return None
    link = FuseCacheLink(ops.inodes, ops.cache, lambda: ops._next_fh)
    return await NbdService.start(nursery, ops.store, link, socket_path=None, tcp=None)


def _server(service: NbdService | None) -> Server:
    if service is None or not isinstance(service.server, Server):
        raise RemoteError("NBD is not served by this worker", errno.EOPNOTSUPP)
    return service.server


def serve_handed_over(service: NbdService | None, fds: list[int], msg: Mapping[str, Any]) -> bool:
    """Serve the connection an ``nbd_connection`` message hands over; False if it was refused (closed)."""
    peer = str(msg.get("peer") or "handed over")
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        log.error("nbd %s: handed over with %d descriptors, not 1: dropped", peer, len(fds))
        return False
    try:
        sock = socket.socket(fileno=fds[0])
    except OSError as e:
        os.close(fds[0])
        log.error("nbd %s: handed over a descriptor that is no socket (%s): dropped", peer, e)
        return False
    try:
        at = resume_of(msg)
        server = _server(service)
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("the descriptor is not a stream socket")
    except (ValueError, RemoteError) as e:
        log.error("nbd %s: handed-over connection dropped: %s", peer, e)
        sock.close()
        return False
    sock.setblocking(False)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    if not server.adopt(stream, peer, at):
        stream.socket.close()
        return False
    return True


def answer_nbd_request(service: NbdService | None, msg: Mapping[str, Any]) -> dict[str, Any]:
    """The worker's reply to ``nbd_list`` or ``nbd_describe``; raises :class:`RemoteError`."""
    exports = _server(service).exports
    op = msg.get("op")
    if op == "nbd_list":
        out: list[list[str]] = []
        size = 0
        for name, description in exports.names():
            size += len(json.dumps([name, description])) + 1
            if size > LIST_BYTES:
                log.warning("nbd: export list cut at %d entries (a channel message's size)", len(out))
                return {"exports": out, "truncated": True}
            out.append([name, description])
        return {"exports": out}
    if op == "nbd_describe":
        name = msg.get("export")
        if not isinstance(name, str):
            raise RemoteError("nbd_describe needs an export name", errno.EINVAL)
        try:
            export = exports.resolve(name)
        except ExportError as e:
            raise RemoteError(str(e), errno.ENOENT) from None
        return {"name": export.name, "size": export.size, "flags": transmission_flags(export.writable),
                "block_size": export.block_size, "description": export.description}
    raise RemoteError(f"not an NBD operation: {op!r}", errno.EINVAL)
