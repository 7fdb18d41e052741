"""The secondary's listener: one for all VMs of a store, handing each attached VM to a session.

A connection is admitted (bounded per source and in total while it has not
proven the key), authenticated (or, keyless on loopback, introduced), names
its VM with ATTACH, and is then served by a
:class:`~colofs.repl.secondary_session.Session`. A refusal says why, in a
log line and an ERROR frame; the listener and every other session go on. A
newer connection for a VM replaces the old one (a primary that reconnects
after a silent cut), after the old one has stopped applying.

A connection may open with the route preamble (:mod:`colofs.wire.route`),
read here after a peek, or already read by the supervisor that handed the
socket to :meth:`SecondaryServer.serve_handoff`; either way its ATTACH must
name the routed VM.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from colofs.core.errors import ColofsError
from colofs.core.store import Store
from colofs.repl.admission import (
    EVICTED,
    HANDSHAKE_FAILED,
    HANDSHAKE_TIMEOUT,
    SESSION_LIMIT,
    SOURCE_LIMIT,
    Admission,
    Ticket,
)
from colofs.repl.config import ReplConfig, require_key_or_loopback
from colofs.repl.errors import AttachRefused, ReplCode
from colofs.repl.framing import FrameSender
from colofs.repl.handshake import FEATURE_RECEIPTS, handshake, refuse, wrap_transport
from colofs.repl.hooks import SecondaryHooks
from colofs.repl.persist import load_needs_full_sync
from colofs.repl.ratelog import RateLimitedLog
from colofs.repl.secondary_session import Session
from colofs.repl.session import accept_attach
from colofs.wire.auth import NonceRegistry
from colofs.wire.errors import ProtocolError
from colofs.wire.messages import (
    ATTACHED_NEEDS_FULL_SYNC,
    Attach,
    Attached,
    Role,
)
from colofs.wire.route import peek_route, read_route
from colofs.wire.stream import FrameStream

log = logging.getLogger(__name__)


class SecondaryServer:
    """Serves every VM of a secondary store to its primary; returned by :func:`serve_secondary`."""

    def __init__(self, store: Store, key: bytes | None, *, node_id: str, config: ReplConfig,
                 nonces: NonceRegistry | None, hooks: SecondaryHooks | None) -> None:
        self.store = store
        self.key = key
        self.node_id = node_id
        self.cfg = config
        self.nonces = nonces if nonces is not None else NonceRegistry()  # this node's, shared by its peers
        self.hooks = hooks or SecondaryHooks()
        self.port: int | None = None
        self.sessions: dict[str, Session] = {}
        self._vm_locks: dict[str, trio.Lock] = {}
        self.admission = Admission(total=config.max_unauthenticated,
                                   per_source=config.max_unauthenticated_per_source,
                                   sessions=config.max_sessions)
        self.strangers = RateLimitedLog(log)
        """Lines any stranger can cause (refusals before the key is proven): one per kind a second."""
        self.stats = {"connections": 0, "refused": 0, "sessions": 0}
        self.last_errors: dict[str, str] = {}
        self.bad_frames: dict[str, str] = {}
        """Per VM, the last frame refused as malformed or unauthenticated, and why (kept across sessions)."""
        self.last_refusal: str | None = None
        """Why the last connection was turned away before it named a VM (a wrong key, say)."""

    async def serve(self, listen: tuple[str, int], *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        host, port = listen
        await require_key_or_loopback(host, self.key, "--listen")
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        log.info("replication: listening on %s:%d (%s)", host, self.port,
                 "authenticated" if self.key is not None else "no key: loopback only")
        async with trio.open_nursery() as nursery:
            try:
                task_status.started(self)
                await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)
            finally:
                self.close_sessions("the secondary is shutting down")

    def close_sessions(self, why: str) -> None:
        """Tell every attached primary ``why`` and stop applying (a server fed by :meth:`serve_handoff`
        has no listener whose end does it); each session's ``finished`` is set once it has stopped."""
        for s in list(self.sessions.values()):
            s.replace(why)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        try:
            host, port = tcp.socket.getpeername()[:2]
            peer_addr = f"{host}:{port}"
        except OSError:
            host = peer_addr = "?"
        await self._admit(tcp, str(host), peer_addr, None)

    async def serve_handoff(self, stream: trio.SocketStream, peer_addr: str, vm: str) -> None:
        """Serve one connection whose route preamble another process already read: it named ``vm``.

        The connection goes through the same admission, TLS, handshake and
        ATTACH as one this server accepted itself, and its ATTACH must name
        ``vm``. Returns when the connection is done (refused or its session
        over); ``stream`` is closed by then. ``peer_addr`` is ``host:port``.
        """
        host = peer_addr.rsplit(":", 1)[0].strip("[]") if ":" in peer_addr else peer_addr
        await self._admit(stream, host, peer_addr, vm)

    async def _admit(self, tcp: trio.SocketStream, host: str, peer_addr: str, route: str | None) -> None:
        """Count the connection against the admission caps, serve it if it fits, and always close it.

        ``route``: the VM a preamble already read named, or None to look for a preamble here.
        """
        self.stats["connections"] += 1
        ticket = self.admission.admit(host)
        if not isinstance(ticket, Ticket):
            cfg = self.cfg
            text = (f"{cfg.max_unauthenticated_per_source} unauthenticated connections from this address "
                    f"already" if ticket == SOURCE_LIMIT else
                    f"{cfg.max_unauthenticated} unauthenticated connections already")
            self._stranger_refused(ticket, peer_addr, f"closed at accept, unread: {text}")
            await trio.aclose_forcefully(tcp)
            return
        try:
            await self._connection(tcp, peer_addr, ticket, route)
        except Exception:  # never let one connection take the listener down
            log.exception("replication: internal error on the connection from %s", peer_addr)
        finally:
            self.admission.release(ticket)
            await trio.aclose_forcefully(tcp)

    def _stranger_refused(self, kind: str, addr: str, text: str) -> None:
        """Count and log (at most one line per kind a second) a connection turned away before the key."""
        self.stats["refused"] += 1
        self.last_refusal = f"{addr}: {text}"
        self.hooks.event("peer-refused", peer=addr, reason=text, role="secondary")
        self.strangers.warning(kind, "replication: refused connection from %s: %s", addr, text)

    async def _connection(self, tcp: trio.SocketStream, addr: str, ticket: Ticket, route: str | None) -> None:
        cfg = self.cfg
        started = trio.current_time()
        deadline = started + cfg.handshake_timeout  # one budget for the preamble and the handshake
        try:
            with ticket.scope:  # cancelled when an address holding fewer needs the slot
                if route is None and await peek_route(tcp.socket, cfg.handshake_timeout):
                    route = await read_route(tcp, max(deadline - trio.current_time(), 0.0))
                stream = await wrap_transport(tcp, server_side=True, tls=cfg.tls, peer=addr)
                fs = FrameStream(stream, max_wire_len=cfg.max_wire_len, max_raw_len=cfg.max_raw_len)
                sender = FrameSender(fs)
                hello = await handshake(fs, self.key, self.node_id, Role.SECONDARY, initiator=False,
                                        nonces=self.nonces, timeout=max(deadline - trio.current_time(), 0.001),
                                        features=FEATURE_RECEIPTS if cfg.receipts else 0)
        except (ProtocolError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as e:
            kind = HANDSHAKE_TIMEOUT if trio.current_time() - started >= cfg.handshake_timeout else HANDSHAKE_FAILED
            self.admission.count(kind)
            self._stranger_refused(f"{kind}:{type(e).__name__}", addr, _text(e))  # one kind per failure type
            return
        if ticket.evicted:
            self._stranger_refused(EVICTED, addr, f"dropped during its handshake: {cfg.max_unauthenticated} "
                                   f"unauthenticated connections, and an address holding fewer needed the slot")
            return
        if not self.admission.authenticated(ticket):
            text = f"{cfg.max_sessions} sessions open, no room for another"
            self._stranger_refused(SESSION_LIMIT, addr, text)
            await refuse(fs, ReplCode.BAD_REQUEST, text)
            return
        try:
            with trio.fail_after(cfg.handshake_timeout):
                msg = await fs.receive()
        except (ProtocolError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as e:
            self.stats["refused"] += 1
            self.last_refusal = f"{addr}: {_text(e)}"
            log.warning("replication: refused connection from %s: %s", addr, _text(e))
            return
        peer = f"{hello.node_id} ({addr})"
        if not isinstance(msg, Attach):
            text = f"expected ATTACH, got {msg.TYPE.name}"
            log.warning("replication: refused connection from %s: %s", peer, text)
            await refuse(fs, ReplCode.BAD_REQUEST, text)
            return
        if route is not None and msg.vm != route:
            text = f"ATTACH names VM {msg.vm!r}, but the connection was routed to VM {route!r}"
            self.stats["refused"] += 1
            self.last_refusal = f"{peer}: {text}"
            log.warning("replication: refused primary %s: %s", peer, text)
            self.hooks.event("peer-refused", vm=route, peer=peer, reason=text, role="secondary")
            await refuse(fs, ReplCode.BAD_REQUEST, text)
            return
        lock = self._vm_locks.setdefault(msg.vm, trio.Lock())
        async with lock:
            old = self.sessions.get(msg.vm)
            if old is not None:
                old.replace(f"replaced by a new connection from {peer}")
                with trio.move_on_after(cfg.handshake_timeout):
                    await old.finished.wait()
                if not old.finished.is_set():
                    text = f"VM {msg.vm}: the previous session is still applying; try again"
                    log.warning("replication: refused %s: %s", peer, text)
                    await refuse(fs, ReplCode.BAD_REQUEST, text)
                    return
            try:
                if msg.vm in self.store.vms:  # a quarantined VM takes no primary until it is repaired
                    self.store.vms[msg.vm].check_usable()
                res = await accept_attach(self.store, msg, peer, max_disks=cfg.max_disks_per_vm)
            except (AttachRefused, ColofsError, OSError) as e:
                code = e.code if isinstance(e, AttachRefused) else ReplCode.BAD_REQUEST
                self.stats["refused"] += 1
                self.last_errors[msg.vm] = str(e)
                log.warning("replication: refused primary %s for VM %s: %s", peer, msg.vm, e)
                self.hooks.event("peer-refused", vm=msg.vm, peer=peer, reason=str(e), role="secondary")
                await refuse(fs, code, str(e))
                return
            session = Session(res, fs, sender, hello.node_id, announced=max(0, msg.next_seq - 1),
                              config=cfg, hooks=self.hooks, bad_frames=self.bad_frames,
                              receipts=cfg.receipts and bool(hello.features & FEATURE_RECEIPTS))
            self.sessions[msg.vm] = session
            self.last_errors.pop(msg.vm, None)
            st = res.vm.state
            log.info("replication: VM %s attached by primary %s at seq %d (checkpoint %d)%s",
                     msg.vm, peer, st.last_applied, st.last_checkpoint,
                     "; full sync needed" if res.needs_full_sync else "")
            try:
                await sender.send(Attached(msg.vm, st.epoch, st.last_applied, st.last_checkpoint,
                                           ATTACHED_NEEDS_FULL_SYNC if res.needs_full_sync else 0))
            except BaseException as e:
                session.finished.set()
                del self.sessions[msg.vm]
                if isinstance(e, OSError | trio.BrokenResourceError | trio.ClosedResourceError):
                    log.info("replication: connection from %s lost while attaching: %s", peer, _text(e))
                    return
                raise
        self.stats["sessions"] += 1
        self.hooks.event("peer-connected", vm=msg.vm, peer=peer, role="secondary")
        try:
            await session.run()
        finally:
            if self.sessions.get(msg.vm) is session:
                del self.sessions[msg.vm]
            self.hooks.event("peer-lost", vm=msg.vm, peer=peer, role="secondary",
                             reason=self.last_errors.get(msg.vm))

    @asynccontextmanager
    async def exclusive(self, vm_name: str, why: str, code: int = ReplCode.FAILED_OVER) -> AsyncIterator[None]:
        """Close the VM's session (telling its primary ``why``) and take no primary for it until exit.

        A failover runs inside: the session stops applying before the commit
        starts, and no primary can attach in between; afterwards the VM's
        role refuses them on its own.
        """
        lock = self._vm_locks.setdefault(vm_name, trio.Lock())
        async with lock:
            session = self.sessions.get(vm_name)
            if session is not None:
                log.warning("replication: VM %s: closing the session of primary %s: %s",
                            vm_name, session.peer, why)
                session.replace(why, code)
                await session.finished.wait()
            yield

    def status(self, vm_name: str | None = None) -> dict[str, object]:
        """Per VM: role, epoch, seqs, and the session if a primary is connected."""
        def one(name: str) -> dict[str, object]:
            vm = self.store.vms.get(name)
            s = self.sessions.get(name)
            out: dict[str, object] = {"vm": name, "connected": False}
            if vm is not None:
                st = vm.state
                out.update(role=st.role, epoch=st.epoch, last_applied=st.last_applied,
                           last_checkpoint=st.last_checkpoint, full_sync_owed=load_needs_full_sync(vm))
            if s is not None:
                out.update(s.status())
            if name in self.last_errors:
                out["last_error"] = self.last_errors[name]
            if name in self.bad_frames:
                out["last_bad_frame"] = self.bad_frames[name]
            return out

        if vm_name is not None:
            return one(vm_name)
        return {"listen_port": self.port, **self.stats, "open_sessions": len(self.sessions),
                "last_refusal": self.last_refusal, **self.admission.status(),
                "vms": {n: one(n) for n in sorted(set(self.store.vms) | set(self.sessions))}}


def _text(e: BaseException) -> str:
    return str(e) or type(e).__name__


async def serve_secondary(
    store: Store,
    listen: tuple[str, int],
    key: bytes | None,
    *,
    node_id: str | None = None,
    config: ReplConfig | None = None,
    nonces: NonceRegistry | None = None,
    hooks: SecondaryHooks | None = None,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the secondary store on ``listen`` until cancelled.

    Use ``server = await nursery.start(serve_secondary, store, (host, port), key)``:
    the :class:`SecondaryServer` it reports has ``port`` (the bound one, for
    port 0) and ``status()``. Raises :class:`~colofs.repl.errors.ReplConfigError`
    before binding if there is no key and ``host`` is not loopback.
    """
    server = SecondaryServer(store, key, node_id=node_id or store.node_id, config=config or ReplConfig(),
                             nonces=nonces, hooks=hooks)
    await server.serve(listen, task_status=task_status)
