"""A secondary supervisor's router: the preamble read exactly, bad or slow peers turned away, new VMs started."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from colofs.events import EventBus
from colofs.repl.config import ReplConfig
from colofs.repl.tls import TlsConfig
from colofs.wire.messages import Error
from colofs.wire.route import encode_route
from colofs.wire.stream import FrameStream
from colofs.workers.router import MAX_PROVISIONAL, Router
from colofs.workers.table import Table
from tests.pki import HAVE_OPENSSL, make_pki
from tests.waiting import wait_until

TIMEOUT = 60.0
FRAME = b"COLF" + bytes(20)
"""What a plain primary sends after the preamble: its first frame (a HELLO), starting with the frame magic."""
CLIENT_HELLO = b"\x16\x03\x01\x00\x2a" + bytes(42)
"""What a TLS primary sends after the preamble: a handshake record (its ClientHello)."""


class StubFleet:
    """What the router uses of the fleet: the table, the bus, start, wait_for, hand_over."""

    def __init__(self, opened: tuple[str, ...] = ()) -> None:
        self.table = Table()
        self.bus = EventBus()
        self.channels: dict[str, Any] = {}
        self.started: list[tuple[str, str | None]] = []
        self.handed: list[tuple[str, bytes, str]] = []
        self.handed_event = trio.Event()
        self._changed = trio.Event()
        for vm in opened:
            self._open(vm)

    def _open(self, vm: str) -> None:
        w = self.table.add(vm)
        self.table.started(w, 4242, 0.0)
        w.opened = True
        self.channels[vm] = object()

    async def start(self, vm: str, create_vm: str | None = None, *, on_attach: bool = False) -> Any:
        assert on_attach == (create_vm is not None)  # a VM started for a preamble is created only by an ATTACH
        self.started.append((vm, create_vm))
        self.table.add(vm)
        self._open(vm)  # as if the new worker had sent `opened` at once
        self._changed.set()
        return self.table.get(vm)

    async def wait_for(self, pred: Any, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while not pred():
                await self._changed.wait()
                self._changed = trio.Event()
            return True
        return False

    async def hand_over(self, vm: str, sock_fd: int, peer: str) -> None:
        # What the worker would read next on its copy of the socket: everything after the preamble.
        dup = socket.socket(fileno=os.dup(sock_fd))
        dup.setblocking(False)
        tsock = trio.socket.from_stdlib_socket(dup)
        with trio.fail_after(TIMEOUT):
            rest = await tsock.recv(100)
        tsock.close()
        self.handed.append((vm, rest, peer))
        self.handed_event.set()


async def _with_router(fleet: StubFleet, test: Any, **settings: Any) -> Router:
    """Serve ``fleet`` on a loopback port while ``test(router)`` runs."""
    router = Router(fleet, ReplConfig(**settings), keyed=False)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(router.serve, "127.0.0.1", 0)
        assert router.port is not None
        await test(router)
        nursery.cancel_scope.cancel()
    return router


async def _connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def _closed(stream: trio.SocketStream) -> bool:
    """The router closed the connection (EOF or reset), within the deadline."""
    with trio.fail_after(TIMEOUT):
        try:
            return await stream.receive_some(10) == b""
        except trio.BrokenResourceError:
            return True


def test_preamble_is_read_exactly_and_the_socket_handed_to_the_vms_worker() -> None:
    async def main() -> None:
        fleet = StubFleet(opened=("vm0",))

        async def test(router: Router) -> None:
            s = await _connect(router.port)  # type: ignore[arg-type]
            await s.send_all(encode_route("vm0") + FRAME)
            with trio.fail_after(TIMEOUT):
                await fleet.handed_event.wait()
            await s.aclose()

        router = await _with_router(fleet, test)
        assert [(vm, rest) for vm, rest, _ in fleet.handed] == [("vm0", FRAME)]
        assert fleet.started == [] and router.stats["routed"] == 1

    trio.run(main)


def test_an_unknown_vm_gets_a_secondary_worker_first() -> None:
    async def main() -> None:
        fleet = StubFleet()

        async def test(router: Router) -> None:
            s = await _connect(router.port)  # type: ignore[arg-type]
            await s.send_all(encode_route("newvm") + FRAME)
            with trio.fail_after(TIMEOUT):
                await fleet.handed_event.wait()
            await s.aclose()

        await _with_router(fleet, test)
        assert fleet.started == [("newvm", "secondary")]
        assert [(vm, rest) for vm, rest, _ in fleet.handed] == [("newvm", FRAME)]

    trio.run(main)


def test_bad_magic_is_refused_and_counted() -> None:
    async def main() -> None:
        fleet = StubFleet(opened=("vm0",))

        async def test(router: Router) -> None:
            s = await _connect(router.port)  # type: ignore[arg-type]
            await s.send_all(b"GET / HTTP/1.0\r\n\r\n")
            assert await _closed(s)
            await s.aclose()

        router = await _with_router(fleet, test)
        assert fleet.handed == [] and fleet.started == []
        assert router.admission.refused["handshake_failed"] == 1 and router.stats["refused"] == 1

    trio.run(main)


def test_a_silent_peer_is_closed_after_the_handshake_timeout() -> None:
    async def main() -> None:
        fleet = StubFleet(opened=("vm0",))

        async def test(router: Router) -> None:
            s = await _connect(router.port)  # type: ignore[arg-type]
            await s.send_all(b"COLO")  # part of the magic, then nothing
            assert await _closed(s)
            await s.aclose()

        router = await _with_router(fleet, test, handshake_timeout=0.5)
        assert fleet.handed == []
        assert router.admission.refused["handshake_timeout"] == 1

    trio.run(main)


def test_connections_past_the_per_source_cap_are_closed_unread() -> None:
    async def main() -> None:
        fleet = StubFleet(opened=("vm0",))

        async def test(router: Router) -> None:
            held = [await _connect(router.port) for _ in range(2)]  # type: ignore[arg-type]
            await wait_until(lambda: router.admission.pending == 2, TIMEOUT, "two pending connections")
            extra = await _connect(router.port)  # type: ignore[arg-type]
            assert await _closed(extra)
            await extra.aclose()
            for s in held:
                await s.aclose()

        router = await _with_router(fleet, test, max_unauthenticated_per_source=2, handshake_timeout=30.0)
        assert router.admission.refused["source_limit"] == 1

    trio.run(main)


def test_strangers_cannot_make_it_start_workers_without_bound() -> None:
    async def main() -> None:
        fleet = StubFleet()

        async def test(router: Router) -> None:
            for i in range(MAX_PROVISIONAL + 3):
                s = await _connect(router.port)  # type: ignore[arg-type]
                await s.send_all(encode_route(f"junk{i}") + FRAME)
                if i >= MAX_PROVISIONAL:
                    assert await _closed(s)  # closed unrouted past the cap
                await s.aclose()
            await wait_until(lambda: len(fleet.handed) == MAX_PROVISIONAL, TIMEOUT, "the first ones handed over")
            fleet.table.get("junk0").link = "connected"  # type: ignore[union-attr]  # a peer proved the key
            s = await _connect(router.port)  # type: ignore[arg-type]
            await s.send_all(encode_route("real") + FRAME)
            await wait_until(lambda: len(fleet.handed) == MAX_PROVISIONAL + 1, TIMEOUT, "a new VM again")
            await s.aclose()

        await _with_router(fleet, test)
        assert [vm for vm, _ in fleet.started] == [f"junk{i}" for i in range(MAX_PROVISIONAL)] + ["real"]

    trio.run(main)


def test_a_refused_stranger_sees_an_orderly_end_not_a_reset() -> None:
    """It sent more than the preamble's length: closing with that unread would reset the connection."""
    async def main() -> None:
        fleet = StubFleet()

        async def test(router: Router) -> None:
            s = await _connect(router.port)  # type: ignore[arg-type]
            await s.send_all(b"GET / HTTP/1.0\r\n\r\n" * 8)
            await s.send_eof()
            with trio.fail_after(TIMEOUT):
                while await s.receive_some(4096):  # a reset raises BrokenResourceError here
                    pass
            await s.aclose()
            await wait_until(lambda: router.stats["refused"] == 1, TIMEOUT, "the refusal counted")

        await _with_router(fleet, test)
        assert fleet.started == []

    trio.run(main)


def _tls(tmp_path: Path) -> TlsConfig:
    pki = make_pki(tmp_path / "pki")
    return TlsConfig.load(str(pki / "secondary.pem"), str(pki / "secondary.key"), str(pki / "ca.pem"))


async def _refusal(stream: trio.SocketStream) -> str:
    """The ERROR frame the router answered with, then its orderly end."""
    fs = FrameStream(stream)
    with trio.fail_after(TIMEOUT):
        msg = await fs.receive()
    assert isinstance(msg, Error), msg
    assert await _closed(stream)
    return msg.message


needs_openssl = pytest.mark.skipif(not HAVE_OPENSSL, reason="needs the openssl command")


@needs_openssl
def test_a_plain_primary_at_a_tls_secondary_starts_no_worker(tmp_path: Path) -> None:
    """Each of its attempts is refused at the router, told why, and counted; no worker is started for its VM."""
    tls = _tls(tmp_path)

    async def main() -> None:
        fleet = StubFleet()
        told: list[str] = []

        async def test(router: Router) -> None:
            for _ in range(3):
                s = await _connect(router.port)  # type: ignore[arg-type]
                await s.send_all(encode_route("vm1") + FRAME)
                told.append(await _refusal(s))
                await s.aclose()
            await wait_until(lambda: router.stats["refused"] == 3, TIMEOUT, "three refusals counted")

        router = await _with_router(fleet, test, tls=tls)
        assert fleet.started == [] and fleet.handed == [] and "vm1" not in fleet.table
        assert router.admission.refused["handshake_failed"] == 3 and router.stats["routed"] == 0
        assert all("does not speak TLS" in text for text in told), told
        assert "does not speak TLS" in (router.last_refusal or "")

    trio.run(main)


@needs_openssl
def test_a_tls_primary_at_a_tls_secondary_gets_its_worker(tmp_path: Path) -> None:
    tls = _tls(tmp_path)

    async def main() -> None:
        fleet = StubFleet()

        async def test(router: Router) -> None:
            s = await _connect(router.port)  # type: ignore[arg-type]
            await s.send_all(encode_route("vm1") + CLIENT_HELLO)
            with trio.fail_after(TIMEOUT):
                await fleet.handed_event.wait()
            await s.aclose()

        router = await _with_router(fleet, test, tls=tls)
        assert fleet.started == [("vm1", "secondary")]
        assert [(vm, rest) for vm, rest, _ in fleet.handed] == [("vm1", CLIENT_HELLO)]  # nothing consumed
        assert router.stats["refused"] == 0

    trio.run(main)


def test_a_tls_primary_at_a_plain_secondary_starts_no_worker() -> None:
    async def main() -> None:
        fleet = StubFleet()

        async def test(router: Router) -> None:
            s = await _connect(router.port)  # type: ignore[arg-type]
            await s.send_all(encode_route("vm1") + CLIENT_HELLO)
            # Answered with a colofs ERROR frame, which the peer's TLS layer reports as "does not speak TLS".
            assert "the peer starts TLS" in await _refusal(s)
            await s.aclose()
            await wait_until(lambda: router.stats["refused"] == 1, TIMEOUT, "the refusal counted")

        router = await _with_router(fleet, test)
        assert fleet.started == [] and fleet.handed == []
        assert "the peer starts TLS" in (router.last_refusal or "")

    trio.run(main)


def test_a_peer_silent_after_the_preamble_starts_no_worker() -> None:
    async def main() -> None:
        fleet = StubFleet()

        async def test(router: Router) -> None:
            s = await _connect(router.port)  # type: ignore[arg-type]
            await s.send_all(encode_route("vm1") + b"CO")  # then nothing
            assert await _closed(s)
            await s.aclose()

        router = await _with_router(fleet, test, handshake_timeout=0.5)
        assert fleet.started == []
        assert router.admission.refused["handshake_timeout"] == 1

    trio.run(main)
