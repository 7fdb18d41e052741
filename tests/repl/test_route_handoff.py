"""The route preamble between real nodes: the primary sends it first, a secondary serves it in one
process or takes a connection whose preamble another process read, and ATTACH must name the routed VM."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import replace

import pytest
import trio

from colofs.repl import SecondaryServer
from colofs.repl.handshake import handshake
from colofs.wire import FrameStream, NonceRegistry
from colofs.wire.messages import Attach, DiskInfo, Error, Role
from colofs.wire.route import RouteError, encode_route, read_route
from tests.pki import HAVE_OPENSSL, make_pki
from tests.repl.conftest import FAST, Pair, wait_until
from tests.repl.proxy import FaultProxy
from tests.repl.rawpeer import RawPrimary

SIZE = 256 << 10


async def _closed(stream: trio.SocketStream) -> bytes:
    """What the secondary sent before it closed."""
    got = b""
    with trio.fail_after(60):
        try:
            while chunk := await stream.receive_some(4096):
                got += chunk
        except (trio.BrokenResourceError, OSError):
            pass
    return got


# -- the primary's side, and a single-process secondary ------------------------------------------


async def test_the_primary_sends_the_preamble_first_and_the_pair_replicates(pair) -> None:
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary()
    proxy = FaultProxy(pair.port, record=True)
    await pair.nursery.start(proxy.run)
    await pair.start_primary(peer_port=proxy.port)
    await pair.primary.vm("vm").disk("d0").write(4096, b"routed")
    await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()
    seen = bytes(proxy.recorded)
    pre = encode_route("vm")
    assert seen.startswith(pre) and seen[len(pre):len(pre) + 4] == b"COLF"  # then the HELLO frame


@pytest.mark.skipif(not HAVE_OPENSSL, reason="needs the openssl command")
async def test_the_preamble_precedes_tls(pair, tmp_path) -> None:
    from colofs.repl.tls import TlsConfig

    d = make_pki(tmp_path / "pki")

    def tls(node: str) -> TlsConfig:
        return TlsConfig.load(str(d / f"{node}.pem"), str(d / f"{node}.key"), str(d / "ca.pem"))

    pair.cfg = replace(FAST, tls=tls("secondary"))
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary()
    proxy = FaultProxy(pair.port, record=True)
    await pair.nursery.start(proxy.run)
    await pair.start_primary(peer_port=proxy.port, config=replace(FAST, tls=tls("primary")))
    await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()
    seen = bytes(proxy.recorded)
    pre = encode_route("vm")
    assert seen.startswith(pre) and seen[len(pre)] == 0x16  # a TLS handshake record right after it


async def test_a_connection_without_preamble_is_still_served(pair) -> None:
    await pair.open_stores()
    await pair.start_secondary()
    raw = await RawPrimary.connect(pair.port, "vm", [DiskInfo("d0", SIZE, 4096)], key=pair.key)
    assert raw.attached.vm == "vm"
    await raw.aclose()


async def _routed_attach(port: int, key: bytes | None, route: str, vm: str) -> tuple[trio.SocketStream, FrameStream]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(encode_route(route))
    fs = FrameStream(stream)
    await handshake(fs, key, "raw-primary", Role.PRIMARY, initiator=True, nonces=NonceRegistry(), timeout=60)
    await fs.send(Attach(vm, 1, 1, (DiskInfo("d0", SIZE, 4096),)))
    return stream, fs


async def test_preamble_for_one_vm_then_attach_for_another_is_refused(pair, caplog) -> None:
    caplog.set_level(logging.INFO, logger="colofs")
    await pair.open_stores()
    server = await pair.start_secondary()
    stream, fs = await _routed_attach(pair.port, pair.key, "vma", "vmb")
    with trio.fail_after(60):
        msg = await fs.receive()
    await stream.aclose()
    assert isinstance(msg, Error) and "ATTACH names VM 'vmb', but the connection was routed to VM 'vma'" in msg.message
    assert server.stats["refused"] == 1 and server.stats["sessions"] == 0
    assert "routed to VM 'vma'" in (server.last_refusal or "")
    assert "vma" not in pair.secondary.vms and "vmb" not in pair.secondary.vms
    # The same preamble with a matching ATTACH attaches.
    stream, fs = await _routed_attach(pair.port, pair.key, "vmb", "vmb")
    with trio.fail_after(60):
        msg = await fs.receive()
    assert not isinstance(msg, Error) and msg.vm == "vmb"
    await stream.aclose()


@pytest.mark.parametrize(
    ("sent", "says"),
    [
        (b"COLOROUT\x02\x02vm", "version 2"),
        (b"COLOROUT\x01\x00", "empty"),
        (b"COLOROUT\x01\xff" + b"v" * 255, "255 bytes claimed"),
        (b"COLOROUT\x01\x06../etc", "may use only letters"),
    ],
    ids=["version", "length-0", "length-255", "bad-name"],
)
async def test_a_malformed_preamble_is_refused_and_counted(pair, sent: bytes, says: str) -> None:
    await pair.open_stores()
    server = await pair.start_secondary()
    stream = await trio.open_tcp_stream("127.0.0.1", pair.port)
    await stream.send_all(sent)
    assert await _closed(stream) == b""  # closed unanswered: the peer may be in the middle of TLS
    await stream.aclose()
    await wait_until(lambda: server.admission.refused["handshake_failed"] == 1, what="the refusal counted")
    assert server.stats["refused"] == 1 and server.admission.pending == 0
    assert says in (server.last_refusal or "")
    assert pair.secondary.vms == {}


async def test_a_stalled_preamble_is_closed_by_the_handshake_timeout(pair) -> None:
    pair.cfg = replace(FAST, handshake_timeout=1.0)
    await pair.open_stores()
    server = await pair.start_secondary()
    stream = await trio.open_tcp_stream("127.0.0.1", pair.port)
    await stream.send_all(b"COLOROUT\x01\x05vm")  # three name bytes short, then silence
    start = trio.current_time()
    assert await _closed(stream) == b""
    assert trio.current_time() - start >= 0.9
    await stream.aclose()
    await wait_until(lambda: server.admission.refused["handshake_timeout"] == 1, what="the timeout counted")
    assert "route preamble" in (server.last_refusal or "")


# -- a connection handed over by the process that read the preamble -------------------------------


class Router:
    """What a secondary's supervisor does: read the preamble, hand the socket over (as SCM_RIGHTS would:
    a new descriptor of the same socket), let the VM's server take it from there."""

    def __init__(self, server: SecondaryServer, route_to: str | None = None) -> None:
        self.server = server
        self.route_to = route_to
        self.port = 0
        self.refused: list[str] = []

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        host, port = tcp.socket.getpeername()[:2]
        try:
            vm = await read_route(tcp, 60)
        except RouteError as e:
            self.refused.append(str(e))
            await trio.aclose_forcefully(tcp)
            return
        fd = os.dup(tcp.socket.fileno())
        await trio.aclose_forcefully(tcp)
        handed = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
        await self.server.serve_handoff(handed, f"{host}:{port}", self.route_to or vm)


async def _handoff_pair(pair: Pair, route_to: str | None = None) -> tuple[SecondaryServer, Router]:
    await pair.open_stores()
    server = SecondaryServer(pair.secondary, pair.key, node_id=pair.secondary.node_id, config=pair.cfg,
                             nonces=pair.secondary_nonces, hooks=None)
    router = Router(server, route_to)
    await pair.nursery.start(router.run)
    return server, router


async def test_a_handed_off_connection_replicates(pair, repl_errors) -> None:
    server, router = await _handoff_pair(pair)
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.primary.create_disk("vm2", "d0", SIZE)
    await pair.start_primary(peer_port=router.port)
    for vm in ("vm", "vm2"):
        await pair.primary.vm(vm).disk("d0").write(8192, f"handed over to {vm}".encode())
        await pair.link(vm).replicate_checkpoint()
        await pair.assert_identical(vm)
    assert server.stats["sessions"] == 2 and server.status("vm")["connected"]
    assert server.port is None  # it never listened
    # A primary that comes back connects through the router again, and replication goes on.
    await pair.stop_primary()
    await pair.primary.vm("vm").disk("d0").write(0, b"after a reconnect")
    await pair.start_primary(peer_port=router.port)
    await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical("vm")
    assert repl_errors() == []


async def test_a_handed_off_connection_must_attach_the_routed_vm(pair, caplog) -> None:
    caplog.set_level(logging.INFO, logger="colofs")
    server, router = await _handoff_pair(pair, route_to="other")
    await pair.primary.create_disk("vm", "d0", SIZE)
    link = (await pair.start_primary(peer_port=router.port)).links["vm"]
    await wait_until(lambda: "routed to VM 'other'" in (link.last_error or ""), what="the refusal")
    assert "ATTACH names VM 'vm'" in link.last_error
    assert server.stats["refused"] >= 1 and server.stats["sessions"] == 0
    assert "vm" not in pair.secondary.vms and "other" not in pair.secondary.vms


async def test_a_handed_off_connection_meets_the_admission_caps(pair) -> None:
    pair.cfg = replace(FAST, max_unauthenticated=4, max_unauthenticated_per_source=1)
    server, router = await _handoff_pair(pair)
    first = await trio.open_tcp_stream("127.0.0.1", router.port)
    await first.send_all(encode_route("vm"))  # then silence: pending in the VM's server
    await wait_until(lambda: server.admission.pending == 1, what="one pending connection")
    second = await trio.open_tcp_stream("127.0.0.1", router.port)
    await second.send_all(encode_route("vm") + b"COLF" * 100)
    assert await _closed(second) == b""
    assert server.admission.refused["source_limit"] == 1 and server.admission.pending == 1
    for s in (first, second):
        await s.aclose()
    await wait_until(lambda: server.admission.pending == 0, what="the first connection gone")


async def test_close_sessions_ends_handed_off_sessions_with_the_reason(pair) -> None:
    """A server fed only by hand-offs has no listener to end its sessions: close_sessions does."""
    server, router = await _handoff_pair(pair)
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_primary(peer_port=router.port)
    await pair.caught_up()
    session = server.sessions["vm"]
    server.close_sessions("the VM's process is stopping")
    with trio.fail_after(60):
        await session.finished.wait()
    link = pair.link()
    await wait_until(lambda: "the VM's process is stopping" in (link.last_error or ""), what="the reason told")
