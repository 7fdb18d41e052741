"""A secondary supervisor's replication port: accept, read which VM, hand the socket to its worker.

The supervisor binds ``--listen`` (without a key only on loopback, as the
single-process listener does), admits each connection under the same caps as
any unauthenticated one (:mod:`colofs.repl.admission`), and reads the route
preamble (:mod:`colofs.wire.route`), exactly its bytes, within the handshake
timeout, and looks (without consuming them) at the bytes that follow: a
peer whose transport cannot work here (it starts TLS and this node has none,
or the reverse) is refused before any worker is started for it. Then the
socket goes to the VM's worker (``connection`` with the fd),
which runs TLS, the key's challenge and ATTACH itself. A VM this host does
not hold yet gets a worker started with ``create_vm="secondary"``; a VM whose
worker is restarting is waited for up to the handshake timeout. The preamble
grants nothing: the worker authenticates the peer as usual, and creates the
new VM only when an authenticated primary attaches it (:mod:`colofs.workers.attach`);
if none does, the worker ends and the VM is forgotten.
"""

from __future__ import annotations

import logging

import trio

from colofs.repl.admission import (
    HANDSHAKE_FAILED,
    HANDSHAKE_TIMEOUT,
    SOURCE_LIMIT,
    Admission,
    Ticket,
)
from colofs.repl.config import ReplConfig, require_key_or_loopback
from colofs.repl.handshake import refuse
from colofs.repl.ratelog import RateLimitedLog
from colofs.repl.tls import HEAD_LEN, transport_refusal
from colofs.wire.codes import ErrorCode
from colofs.wire.route import RouteError, peek_head, read_route
from colofs.wire.stream import FrameStream
from colofs.workers.fleet import Fleet
from colofs.workers.table import FAILED
from colofs.workers.zygote import ZygoteError

log = logging.getLogger(__name__)

DRAIN_SECONDS = 1.0
DRAIN_BYTES = 64 * 1024
"""What a refused connection may still send before it is closed (then a reset is its own doing)."""

MAX_PROVISIONAL = 8
"""New VMs started for unauthenticated preambles that may await their first session at once."""


class Router:
    """Routes a secondary's incoming connections to the VMs' workers."""

    def __init__(self, fleet: Fleet, settings: ReplConfig, *, keyed: bool) -> None:
        self.fleet = fleet
        self.cfg = settings
        self.keyed = keyed
        self.port: int | None = None
        self.admission = Admission(total=settings.max_unauthenticated,
                                   per_source=settings.max_unauthenticated_per_source,
                                   sessions=settings.max_sessions)
        self.strangers = RateLimitedLog(log)
        self.stats = {"connections": 0, "routed": 0, "refused": 0}
        self.last_refusal: str | None = None
        self.provisional: set[str] = set()
        """VMs started for a preamble whose worker has not had an authenticated session yet."""

    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind and accept until cancelled; raises ``ReplConfigError``/``OSError`` before starting."""
        await require_key_or_loopback(host, b"x" if self.keyed else None, "--listen")
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        log.info("replication: listening on %s:%d, routing each connection to its VM's worker (%s)",
                 host, self.port, "authenticated" if self.keyed else "no key: loopback only")
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    def _refused(self, kind: str, addr: str, text: str) -> None:
        self.stats["refused"] += 1
        self.last_refusal = f"{addr}: {text}"
        self.fleet.bus.emit("peer-refused", peer=addr, reason=text, role="secondary")
        self.strangers.warning(kind, "replication: refused connection from %s: %s", addr, text)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        try:
            host, port = tcp.socket.getpeername()[:2]
            addr = f"{host}:{port}"
        except OSError:
            host = addr = "?"
        self.stats["connections"] += 1
        ticket = self.admission.admit(str(host))
        if not isinstance(ticket, Ticket):
            limit = (f"{self.cfg.max_unauthenticated_per_source} unauthenticated connections from this address"
                     if ticket == SOURCE_LIMIT else f"{self.cfg.max_unauthenticated} unauthenticated connections")
            self._refused(ticket, addr, f"closed at accept, unread: {limit} already")
            await trio.aclose_forcefully(tcp)
            return
        try:
            await self._route(tcp, addr, ticket)
        except Exception:  # one connection never takes the port down
            log.exception("replication: internal error routing the connection from %s", addr)
        finally:
            self.admission.release(ticket)
            await trio.aclose_forcefully(tcp)  # our copy; the worker holds its own

    async def _route(self, tcp: trio.SocketStream, addr: str, ticket: Ticket) -> None:
        timeout = self.cfg.handshake_timeout
        deadline = trio.current_time() + timeout
        with ticket.scope:  # cancelled when another address needs the slot
            try:
                vm = await read_route(tcp, timeout)
            except RouteError as e:
                kind = HANDSHAKE_TIMEOUT if trio.current_time() >= deadline else HANDSHAKE_FAILED
                self.admission.count(kind)
                self._refused(kind, addr, str(e))
                await _end_gently(tcp)
                return
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self.admission.count(HANDSHAKE_FAILED)
                self._refused(HANDSHAKE_FAILED, addr, f"{type(e).__name__}: {e}")
                return
            if not await self._transport_fits(tcp, addr, deadline):
                return
            if not await self._worker_for(vm, deadline):
                w = self.fleet.table.get(vm)
                state = w.state if w is not None else "missing"
                self._refused("no-worker", addr, f"VM {vm}: its worker is {state}, not taking connections")
                await _end_gently(tcp)
                return
        if ticket.evicted:
            return
        try:
            await self.fleet.hand_over(vm, tcp.socket.fileno(), addr)
        except Exception as e:  # the worker went away meanwhile: the primary reconnects
            log.warning("replication: could not hand the connection from %s to VM %s's worker: %s", addr, vm, e)
            return
        self.stats["routed"] += 1
        log.debug("replication: connection from %s handed to VM %s's worker", addr, vm)

    async def _transport_fits(self, tcp: trio.SocketStream, addr: str, deadline: float) -> bool:
        """Whether what the peer sends after the preamble can work with this node's TLS setting; refuse it if not.

        Looked at (never consumed) before a worker is started or handed the
        socket: a plain primary reconnecting to a TLS secondary would otherwise
        fork a worker for each attempt only to fail its TLS handshake there.
        The refusal is counted and reported as that handshake's failure would
        be, and a colofs peer is told why in a plain ERROR frame, as a worker
        refusing a frame it cannot read tells it.
        """
        try:
            head = await peek_head(tcp.socket, HEAD_LEN, deadline - trio.current_time())
        except RouteError as e:
            self.admission.count(HANDSHAKE_TIMEOUT)
            self._refused(HANDSHAKE_TIMEOUT, addr, str(e))
            await _end_gently(tcp)
            return False
        except OSError as e:
            self.admission.count(HANDSHAKE_FAILED)
            self._refused(HANDSHAKE_FAILED, addr, f"{type(e).__name__}: {e}")
            return False
        why = transport_refusal(head, self.cfg.tls is not None)
        if why is None:
            return True
        self.admission.count(HANDSHAKE_FAILED)
        self._refused(f"{HANDSHAKE_FAILED}:transport", addr, why)
        if head:
            await refuse(FrameStream(tcp), ErrorCode.HANDSHAKE_REFUSED, f"this secondary refused the connection: {why}")
        await _end_gently(tcp)
        return False

    async def _worker_for(self, vm: str, deadline: float) -> bool:
        """Wait (until ``deadline``) for ``vm``'s worker to have opened its VM; start one for a new VM."""
        fleet = self.fleet
        if vm not in fleet.table:
            if not self._room_for_new_vm():
                return False
            self.provisional.add(vm)
            try:
                await fleet.start(vm, create_vm="secondary", on_attach=True)  # created only by an authenticated ATTACH
            except ZygoteError:
                return False

        def ready() -> bool:
            w = fleet.table.get(vm)
            return w is None or w.state == FAILED or (w.opened and w.pid is not None)

        left = deadline - trio.current_time()
        if left <= 0 or not await fleet.wait_for(ready, left):
            return False
        w = fleet.table.get(vm)
        return w is not None and w.opened and w.pid is not None and vm in fleet.channels

    def _room_for_new_vm(self) -> bool:
        """Whether one more VM may be started for a stranger's preamble.

        The preamble is unauthenticated, so a VM named by one is provisional
        until its worker reports its link connected (the peer proved the key);
        at most :data:`MAX_PROVISIONAL` such VMs exist at once, so strangers
        cannot make the supervisor start workers without bound.
        """
        for vm in list(self.provisional):
            w = self.fleet.table.get(vm)
            if w is None or w.link == "connected":
                self.provisional.discard(vm)
        if len(self.provisional) >= MAX_PROVISIONAL:
            log.warning("replication: %d new VMs still wait for their first authenticated session; "
                        "not starting another for an unauthenticated preamble", len(self.provisional))
            return False
        return True

    def status(self) -> dict[str, object]:
        return {"port": self.port, **self.stats, "last_refusal": self.last_refusal, **self.admission.status()}


async def _end_gently(tcp: trio.SocketStream) -> None:
    """Close a refused connection with a FIN, not a reset: read (and drop) what it already sent, briefly.

    Closing a socket with unread data makes the kernel answer with a reset,
    which a peer reading our end of the stream sees as an error, not an end.
    """
    with trio.move_on_after(DRAIN_SECONDS):
        try:
            await tcp.send_eof()
            left = DRAIN_BYTES
            while left > 0:
                data = await tcp.receive_some(min(left, 16384))
                if not data:
                    break
                left -= len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
