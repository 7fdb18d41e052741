"""The zygote: a small process the supervisor forks early, which forks one worker per VM.

Forking a worker straight from the supervisor would copy a process that runs
trio, holds a FUSE session, the store lock and the ready pipe. So the
supervisor forks the zygote first, after every module is imported (workers
then share those pages with it) and before any of that exists. The zygote is
a plain blocking loop that never runs trio: it closes every fd but its
socket and stdio, then serves ``spawn`` requests on a ``SOCK_SEQPACKET``
socket (one JSON datagram each, the worker's channel end as ``SCM_RIGHTS``),
and reaps its children on ``SIGCHLD``, reporting each exit as an unsolicited
``{"op": "exited", "pid", "returncode"}`` (``-9``: killed by ``SIGKILL``, as
:mod:`subprocess` says it).

The zygote puts itself in a process group of its own, so a terminal's
``Ctrl-C`` reaches the supervisor only, which then stops the workers in
order. It exits when its socket is closed; the workers live on (the
supervisor stops them first).
"""

from __future__ import annotations

import array
import gc
import json
import logging
import os
import select
import signal
import socket
import sys
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from colofs.workers.channel import WorkerArgs
from colofs.workers.malloc import limit_arenas

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 << 10
EXIT_CRASHED = 70
"""A worker whose entry raised exits with this (EX_SOFTWARE)."""

Entry = Callable[[WorkerArgs], int]


class ZygoteError(Exception):
    """The zygote refused a request or is gone."""


def _send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


# -- the zygote process ------------------------------------------------------------------------


def _close_all_but(keep: set[int]) -> None:
    """Close every fd of the process except ``keep`` (the supervisor's pipes, sockets, lock)."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _log_to_stderr() -> None:
    """The supervisor's log handlers' files were closed: the zygote and its workers log to stderr."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.addHandler(h)


def _start_worker(sock: socket.socket, wake_r: int, wake_w: int, entry: Entry,
                  args: WorkerArgs) -> None:
    """In the forked worker: shed the zygote's state, run ``entry``, exit with its status."""
    status = EXIT_CRASHED
    try:
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        status = entry(args)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        try:
            log.error("worker %s failed:\n%s", args.vm, traceback.format_exc())
        except BaseException:
            pass
        status = EXIT_CRASHED
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"op": "exited", "pid": pid, "returncode": os.waitstatus_to_exitcode(wstatus)})


def _spawn(sock: socket.socket, wake: tuple[int, int], entry: Entry, msg: dict[str, Any],
           fds: list[int]) -> None:
    if msg.get("op") != "spawn" or not isinstance(msg.get("args"), dict) or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        _send(sock, {"error": f"bad request: op {msg.get('op')!r} with {len(fds)} fds"})
        return
    try:
        args = WorkerArgs.from_json({**msg["args"], "channel_fd": fds[0]})
        pid = os.fork()
    except (TypeError, KeyError, ValueError, OSError) as e:
        os.close(fds[0])
        _send(sock, {"error": f"cannot start the worker: {e}"})
        return
    if pid == 0:
        _start_worker(sock, wake[0], wake[1], entry, args)
    os.close(fds[0])
    _send(sock, {"pid": pid})  # before any waitpid: a reply always comes before its worker's exit


def _serve(sock: socket.socket, entry: Entry) -> None:
    """The zygote's loop: spawn requests and child exits, until the supervisor closes the socket."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written
    sock.setblocking(True)
    while True:
        ready, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in ready:
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass
            _reap(sock)
        if sock in ready:
            data, anc, _flags, _addr = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(16 * 4))
            fds = _fds_of(anc)
            if not data:
                for fd in fds:
                    os.close(fd)
                return
            try:
                msg = json.loads(data)
            except ValueError:
                msg = {}
            _spawn(sock, (wake_r, wake_w), entry, msg if isinstance(msg, dict) else {}, fds)
            _reap(sock)  # a worker that exited at once is reported without waiting for a signal


def _zygote_main(sock: socket.socket, entry: Entry) -> None:
    status = 0
    try:
        os.setpgid(0, 0)
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN if sig != signal.SIGTERM else signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        _close_all_but({0, 1, 2, sock.fileno()})
        _log_to_stderr()
        limit_arenas()  # inherited by every worker: its threads share an arena instead of one each
        _serve(sock, entry)
    except BrokenPipeError:
        pass  # the supervisor is gone
    except BaseException:
        status = 1
        try:
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        os._exit(status)


# -- the supervisor's side -----------------------------------------------------------------------


class Zygote:
    """The supervisor's handle on its zygote.

    :meth:`exits` is the only reader of the socket: it must be iterated (in a
    task of its own) for :meth:`spawn` to get its replies.
    """

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.pid = pid
        self._raw = sock
        self._sock: trio.socket.SocketType | None = None
        self._send_lock: trio.Lock | None = None
        self._waiting: deque[trio.MemorySendChannel[dict[str, Any]]] = deque()
        self.closed = False
        self.returncode: int | None = None

    @classmethod
    def fork(cls, entry: Entry) -> Zygote:
        """Fork the zygote; call it before ``trio.run`` and before taking the store lock."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The only modules a worker was seen importing after the fork (a primary's connect resolves
        # its peer's name through the idna codec): imported here, their pages are shared too.
        import encodings.idna  # noqa: F401
        import stringprep  # noqa: F401

        # Every object allocated so far goes to the permanent generation: the collector never
        # writes to them again, so their pages stay shared with the zygote and every worker.
        gc.collect()
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            parent.close()
            _zygote_main(child, entry)
        child.close()
        parent.set_inheritable(False)
        return cls(parent, pid)

    def _trio(self) -> trio.socket.SocketType:
        if self._sock is None:
            self._sock = trio.socket.from_stdlib_socket(self._raw)
            self._send_lock = trio.Lock()
        return self._sock

    async def spawn(self, args: WorkerArgs, channel: socket.socket) -> int:
        """Start a worker for ``args`` handing it ``channel`` (closed here); its pid.

        Raises :class:`ZygoteError` if the zygote refused or is gone.
        """
        sock = self._trio()
        assert self._send_lock is not None
        body = {k: v for k, v in args.to_json().items() if k != "channel_fd"}
        data = json.dumps({"op": "spawn", "args": body}).encode()
        if len(data) > MAX_MESSAGE:
            raise ZygoteError(f"spawn request for {args.vm} is too large")
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        try:
            async with self._send_lock:
                if self.closed:
                    raise ZygoteError("the zygote is gone")
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [channel.fileno()]).tobytes())]
                # Queued before the send: the reader may take the reply before sendmsg returns here.
                self._waiting.append(send)  # replies come in request order
                try:
                    await sock.sendmsg([data], anc)
                except OSError as e:
                    self._waiting.remove(send)
                    raise ZygoteError(f"the zygote is gone: {e}") from None
        finally:
            channel.close()
        with receive:
            try:
                reply = await receive.receive()
            except trio.EndOfChannel:
                raise ZygoteError("the zygote is gone") from None
        if "pid" not in reply:
            raise ZygoteError(str(reply.get("error", reply)))
        return int(reply["pid"])

    async def exits(self) -> AsyncIterator[tuple[int, int]]:
        """``(pid, returncode)`` of each worker as it exits; ends when the zygote is gone."""
        sock = self._trio()
        try:
            while True:
                try:
                    data, anc, _flags, _addr = await sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(16 * 4))
                except OSError:
                    return
                for fd in _fds_of(anc):
                    os.close(fd)
                if not data:
                    return
                try:
                    msg = json.loads(data)
                except ValueError:
                    log.warning("zygote: unreadable message %r", data[:80])
                    continue
                if msg.get("op") == "exited":
                    yield int(msg["pid"]), int(msg["returncode"])
                elif self._waiting:
                    self._waiting.popleft().send_nowait(msg)
        finally:
            self.closed = True
            while self._waiting:
                self._waiting.popleft().close()

    def close(self) -> None:
        """Close the socket: the zygote exits (its workers do not); it is reaped here if already gone."""
        self.closed = True
        try:
            if self._sock is not None:
                self._sock.close()  # wakes a task still reading it
        except RuntimeError:
            pass  # outside trio.run: nothing waits on it
        self._raw.close()
        self._reap(os.WNOHANG)

    def _reap(self, flags: int) -> None:
        if self.returncode is not None:
            return
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:
            return
        if pid == self.pid:
            self.returncode = os.waitstatus_to_exitcode(status)

    def wait(self) -> int | None:
        """Reap the zygote after :meth:`close` (blocking; for shutdown and tests); its exit status."""
        self._reap(0)
        return self.returncode
