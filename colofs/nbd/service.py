"""Where the mount daemon serves NBD: a unix socket (0600) and/or a TCP port, bound at startup.

The unix socket is made in a private directory, given mode 0600 and then
renamed into place, so it is never reachable with looser permissions. A
socket file left by a dead daemon (nothing accepts on it) is replaced; any
other file at that path, or a live socket, stops the startup.

NBD has no authentication of its own. On TCP the daemon serves it only when
asked with ``--nbd-listen``, only together with ``--key-file``, and, on a
non-loopback address, only with the node's TLS certificates
(``--tls-cert``/``--tls-key``/``--tls-ca``): then every client must switch
to TLS (``NBD_OPT_STARTTLS``) and present a certificate from that CA before
it can name an export. The handshake is bounded in time and the connections
in number (:class:`Limits`); :class:`Server` runs one task per connection.

With a process per VM the supervisor binds the socket and runs the
handshake up to the export's choice (:mod:`colofs.nbd.handoff`, another
:class:`Listening`); each worker runs a :class:`Server` without listeners
that serves the connections handed to it (:meth:`Server.adopt`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket as stdsocket
import ssl
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from colofs.core.store import Store
from colofs.nbd import protocol as p
from colofs.nbd.exports import CacheLink, Exports
from colofs.nbd.server import Connection, ConnectionClosed, Resume

log = logging.getLogger(__name__)

STOP_GRACE = 10.0  # seconds a stop waits for the requests under way before cancelling them


@contextlib.contextmanager
def connection_ending(label: str, logger: logging.Logger) -> Iterator[None]:
    """How an NBD connection's end is logged: a clean close not at all, a protocol error or a
    lost peer in one line, anything unexpected with its traceback (never raised further)."""
    try:
        yield
    except ConnectionClosed:
        pass
    except p.ProtocolError as e:
        logger.warning("nbd %s: disconnected: %s", label, e)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
        logger.info("nbd %s: connection lost: %s", label, e)
    except Exception:
        logger.exception("nbd %s: connection failed", label)


@dataclass(frozen=True)
class Limits:
    """Bounds of one server: a client cannot hold it with a slow handshake or many connections."""

    handshake_timeout: float = 10.0
    max_connections: int = 32


class Listening:
    """Accepts connections on listeners and handles each in a task of its own, up to a cap."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.active = 0
        self._seq = 0
        self._nursery: trio.Nursery | None = None

    async def serve(self, listeners: list[tuple[trio.abc.Listener[trio.abc.Stream], ssl.SSLContext | None]],
                    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled, each listener with TLS required or not; listeners are closed at the end.

        With no listeners it serves only connections handed in (:meth:`Server.adopt`).
        """
        async with trio.open_nursery() as nursery:
            for listener, tls in listeners:
                nursery.start_soon(self._accept, listener, tls, nursery)
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def _accept(self, listener: trio.abc.Listener[trio.abc.Stream], tls: ssl.SSLContext | None,
                      nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                if self.active >= self.limits.max_connections:
                    log.warning("nbd: connection refused: %d connections already (the cap)", self.active)
                    await trio.aclose_forcefully(stream)
                    continue
                self.active += 1
                self._seq += 1
                nursery.start_soon(self.handle, stream, f"#{self._seq}", tls)

    async def handle(self, stream: trio.abc.Stream, label: str, tls: ssl.SSLContext | None = None) -> None:
        """One connection to its close (counted in :attr:`active` by the caller, uncounted here)."""
        raise NotImplementedError

    def cancel_requests(self) -> None:
        """Cancel the requests still under way (a stop's grace is over)."""


class Server(Listening):
    """Serves the exports of one store to the connections it accepts or is handed."""

    def __init__(self, exports: Exports, limits: Limits | None = None) -> None:
        super().__init__(limits)
        self.exports = exports
        self.connections: set[Connection] = set()

    def adopt(self, stream: trio.abc.Stream, label: str, at: Resume) -> bool:
        """Serve a connection whose handshake another process ran up to ``at``; False if refused (not taken)."""
        if self._nursery is None:
            log.warning("nbd %s: handed-over connection refused: not serving", label)
            return False
        if self.active >= self.limits.max_connections:
            log.warning("nbd %s: handed-over connection refused: %d connections already (the cap)",
                        label, self.active)
            return False
        self.active += 1
        self._nursery.start_soon(self.handle, stream, label, None, at)
        return True

    def cancel_requests(self) -> None:
        for conn in list(self.connections):
            conn.cancel_requests()

    async def handle(self, stream: trio.abc.Stream, label: str, tls: ssl.SSLContext | None = None,
                     at: Resume | None = None) -> None:
        """One connection from handshake (or from ``at``, where another process left it) to close.

        Counted in :attr:`active` by the caller.
        """
        conn = Connection(stream, self.exports, label, tls)
        self.connections.add(conn)
        try:
            with connection_ending(label, log):
                export = None
                with trio.move_on_after(self.limits.handshake_timeout) as scope:
                    export = await (conn.handshake() if at is None else conn.resume(at))
                if scope.cancelled_caught:
                    log.warning("nbd %s: handshake not done within %.0f s: disconnected", label,
                                self.limits.handshake_timeout)
                    return
                if export is None:
                    return
                log.info("nbd %s: serving %s (%s, %s replies)", label, export.name,
                         "read-write" if export.writable else "read-only",
                         "structured" if conn.structured else "simple")
                await conn.transmit(export)
        finally:
            self.connections.discard(conn)
            self.active -= 1
            await trio.aclose_forcefully(stream)


class NbdStartError(Exception):
    """NBD cannot be served as configured; the message says why."""


def _stale_socket(path: str) -> bool:
    """Whether ``path`` is a socket nothing accepts on (left by a dead daemon)."""
    s = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False
    finally:
        s.close()
    return False


def bind_unix(path: str) -> stdsocket.socket:
    """A listening unix socket at ``path``, mode 0600."""
    path = os.path.abspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise NbdStartError(f"--nbd-socket {path}: a file that is not a socket is in the way")
        if not _stale_socket(path):
            raise NbdStartError(f"--nbd-socket {path}: in use by another server")
        os.unlink(path)
        log.warning("nbd: replaced the stale socket %s", path)
    parent = os.path.dirname(path)
    try:
        tmpdir = tempfile.mkdtemp(prefix=".nbd-", dir=parent)
    except OSError as e:
        raise NbdStartError(f"--nbd-socket {path}: cannot create it in {parent}: {e.strerror}") from None
    sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        tmp = os.path.join(tmpdir, "s")
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(64)
        os.rename(tmp, path)
    except OSError as e:
        sock.close()
        raise NbdStartError(f"--nbd-socket {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(tmpdir, "s"))
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)
    return sock


class NbdService:
    """The daemon's NBD server: started before the mount serves, stopped before replication drains."""

    def __init__(self, server: Listening, socket_path: str | None) -> None:
        self.server = server
        self.socket_path = socket_path
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        self.addresses: list[str] = []

    @classmethod
    async def start(cls, nursery: trio.Nursery, store: Store, cache: CacheLink | None, *,
                    socket_path: str | None, tcp: tuple[str, int] | None,
                    tls: ssl.SSLContext | None = None, limits: Limits | None = None) -> NbdService:
        """Bind every listener (a failure is :class:`NbdStartError`), then serve in ``nursery``.

        ``tls``, if given, is required of every TCP client (the unix socket is guarded by its mode).
        With neither ``socket_path`` nor ``tcp`` it serves only connections handed in
        (:meth:`Server.adopt`: a worker's, whose supervisor owns the socket).
        """
        return await cls.start_serving(nursery, Server(Exports(store, cache), limits),
                                       socket_path=socket_path, tcp=tcp, tls=tls)

    @classmethod
    async def start_serving(cls, nursery: trio.Nursery, server: Listening, *, socket_path: str | None,
                            tcp: tuple[str, int] | None, tls: ssl.SSLContext | None = None) -> NbdService:
        """:meth:`start` with any :class:`Listening` behind the listeners."""
        listeners: list[trio.SocketListener] = []
        unix = 0
        try:
            if socket_path is not None:
                sock = bind_unix(socket_path)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                unix = 1
            if tcp is not None:
                host, port = tcp
                try:
                    listeners += await trio.open_tcp_listeners(port, host=host)
                except OSError as e:
                    raise NbdStartError(f"--nbd-listen {host}:{port}: {e.strerror or e}") from None
        except BaseException:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            if socket_path is not None and listeners:
                with contextlib.suppress(OSError):
                    os.unlink(socket_path)
            raise
        svc = cls(server, os.path.abspath(socket_path) if socket_path else None)
        if socket_path is not None:
            svc.addresses.append(f"unix:{svc.socket_path}")
        for listener in listeners[unix:]:
            name = listener.socket.getsockname()
            svc.addresses.append(f"tcp:{name[0]}:{name[1]}" + (" (TLS)" if tls is not None else ""))
        await nursery.start(svc._run, [(lst, tls if i >= unix else None) for i, lst in enumerate(listeners)])
        if svc.addresses:
            log.info("nbd: serving on %s", ", ".join(svc.addresses))
        return svc

    async def _run(self, listeners: list[tuple[trio.SocketListener, ssl.SSLContext | None]],
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._scope:
                await self.server.serve(listeners, task_status=task_status)  # type: ignore[arg-type]
        finally:
            if self.socket_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.socket_path)
            self._stopped.set()

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop accepting and close every connection; a request under way gets ``grace`` seconds to finish."""
        self._scope.cancel()
        with trio.move_on_after(grace):
            await self._stopped.wait()
            return
        # A request still waits (say a primary's write for its secondary's acknowledgement): cancel it.
        log.warning("nbd: requests still under way %.0f s after the stop: cancelled", grace)
        self.server.cancel_requests()
        await self._stopped.wait()
