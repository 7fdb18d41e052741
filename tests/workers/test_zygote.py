"""The zygote forks workers on request, hands each its channel end, and reports every exit."""

from __future__ import annotations

import os
import select
import signal
import socket

import trio

from colofs.workers.channel import WorkerArgs
from colofs.workers.zygote import EXIT_CRASHED, Zygote, ZygoteError
from mountctl.mounting import alive
from tests.waiting import wait_until_sync


def _entry(args: WorkerArgs) -> int:
    """What a test's worker does, by its first argument."""
    what = args.argv[0]
    if what == "exit":
        return int(args.argv[1])
    if what == "raise":
        raise RuntimeError("a worker that fails")
    if what == "echo":  # says its name and restart count on its channel, then waits for EOF
        sock = socket.socket(fileno=args.channel_fd)
        sock.send(f"{args.vm} {args.restarts} {args.create_vm}".encode())
        sock.recv(16)
        return 0
    signal.pause()  # "wait": until killed
    return 0


async def _collect(zygote: Zygote, out: dict[int, int], n: int, done: trio.Event) -> None:
    async for pid, code in zygote.exits():
        out[pid] = code
        if len(out) >= n:
            done.set()
            return


def _run(test) -> None:  # type: ignore[no-untyped-def]
    zygote = Zygote.fork(_entry)
    try:
        trio.run(test, zygote)
    finally:
        zygote.close()
        assert zygote.wait() == 0


async def _spawn(zygote: Zygote, *argv: str, vm: str = "vm0") -> tuple[int, socket.socket]:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = await zygote.spawn(WorkerArgs(vm=vm, argv=list(argv), restarts=2, create_vm="primary"), theirs)
    assert theirs.fileno() == -1  # handed over and closed here
    return pid, mine


def test_exit_codes_are_reported_per_pid() -> None:
    async def test(zygote: Zygote) -> None:
        exits: dict[int, int] = {}
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect, zygote, exits, 3, done)
            a, ca = await _spawn(zygote, "exit", "0")
            b, cb = await _spawn(zygote, "exit", "3")
            c, cc = await _spawn(zygote, "raise")
            with trio.fail_after(60):
                await done.wait()
            for s in (ca, cb, cc):
                s.close()
        assert len({a, b, c}) == 3 and os.getpid() not in (a, b, c)
        assert exits == {a: 0, b: 3, c: EXIT_CRASHED}

    _run(test)


def test_kill_9_is_reported_as_minus_9() -> None:
    async def test(zygote: Zygote) -> None:
        exits: dict[int, int] = {}
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect, zygote, exits, 1, done)
            pid, chan = await _spawn(zygote, "wait")
            assert alive(pid)
            os.kill(pid, signal.SIGKILL)
            with trio.fail_after(60):
                await done.wait()
            chan.close()
        assert exits == {pid: -9}
        assert not alive(pid)

    _run(test)


def test_worker_gets_its_args_and_channel() -> None:
    async def test(zygote: Zygote) -> None:
        exits: dict[int, int] = {}
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect, zygote, exits, 1, done)
            pid, chan = await _spawn(zygote, "echo", vm="vm7")
            tchan = trio.socket.from_stdlib_socket(chan)
            with trio.fail_after(60):
                said = await tchan.recv(100)
            assert said == b"vm7 2 primary"
            tchan.close()  # EOF: the worker returns 0
            with trio.fail_after(60):
                await done.wait()
        assert exits == {pid: 0}

    _run(test)


def test_workers_outlive_the_zygote_and_spawn_fails_after() -> None:
    zygote = Zygote.fork(_entry)
    pids: list[int] = []

    async def start() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect, zygote, {}, 1, trio.Event())  # the reader spawn's reply needs
            with trio.fail_after(60):
                pid, chan = await _spawn(zygote, "wait")
            chan.close()
            pids.append(pid)
            nursery.cancel_scope.cancel()

    try:
        trio.run(start)
        zygote.close()
        assert zygote.wait() == 0
        assert alive(pids[0])  # closing the zygote does not take its workers down

        async def spawn_again() -> None:
            try:
                await _spawn(zygote, "exit", "0")
            except ZygoteError:
                return
            raise AssertionError("spawn through a closed zygote succeeded")

        trio.run(spawn_again)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for pid in pids:
            wait_until_sync(lambda pid=pid: not alive(pid), what=f"worker {pid} gone")


def test_zygote_keeps_no_descriptor_of_the_parent() -> None:
    r, w = os.pipe()  # stands for the ready pipe and the lock: the zygote must not hold them
    zygote = Zygote.fork(_entry)
    try:
        os.close(w)
        pipe = os.readlink(f"/proc/self/fd/{r}")

        def held() -> list[str]:
            fd_dir = f"/proc/{zygote.pid}/fd"
            out = []
            for fd in os.listdir(fd_dir):
                try:
                    out.append(os.readlink(f"{fd_dir}/{fd}"))
                except FileNotFoundError:
                    pass  # closed while listed: the zygote is closing what it inherited
            return out

        # stdio, its socket, and the pipe its SIGCHLD handler writes to: never the parent's pipe
        wait_until_sync(lambda: pipe not in held() and len(held()) <= 6, what="zygote closed its fds")
        ready, _, _ = select.select([r], [], [], 60)
        assert ready and os.read(r, 1) == b""  # every write end is closed: the zygote kept none
        os.close(r)
    finally:
        zygote.close()
        zygote.wait()
