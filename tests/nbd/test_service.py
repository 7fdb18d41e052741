"""The NBD listeners: a private unix socket, the connection cap, and TCP that requires TLS with a client certificate."""

from __future__ import annotations

import os
import socket
import ssl
import stat

import pytest
import trio

from colofs.nbd import protocol as p
from colofs.nbd.service import Limits, NbdService, NbdStartError
from colofs.repl.tls import TlsConfig
from tests.nbd.rawclient import RawClient
from tests.pki import HAVE_OPENSSL, make_pki
from tests.waiting import DEADLINE, wait_until


async def test_unix_socket_is_0600_and_a_stale_one_is_replaced(serve, tmp_path) -> None:
    s = await serve()
    path = str(tmp_path / "nbd.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # a dead daemon's socket: nothing listens
    stale.close()
    svc = await NbdService.start(s.nursery, s.store, None, socket_path=path, tcp=None)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    with pytest.raises(NbdStartError, match="in use"):  # a live server's socket is left alone
        await NbdService.start(s.nursery, s.store, None, socket_path=path, tcp=None)
    c = await RawClient.connect_unix(path)
    assert (await c.go("vm/d"))[-1][0] == p.REP_ACK
    await c.close()
    await svc.stop()
    assert not os.path.exists(path)
    other = tmp_path / "file"
    other.write_text("x")
    with pytest.raises(NbdStartError, match="not a socket"):
        await NbdService.start(s.nursery, s.store, None, socket_path=str(other), tcp=None)
    assert other.read_text() == "x"


async def test_connections_over_the_cap_are_closed(serve, tmp_path) -> None:
    s = await serve()
    path = str(tmp_path / "nbd.sock")
    svc = await NbdService.start(s.nursery, s.store, None, socket_path=path, tcp=None,
                                 limits=Limits(max_connections=2))
    held = [await RawClient.connect_unix(path) for _ in range(2)]
    for c in held:
        assert (await c.go("vm/d"))[-1][0] == p.REP_ACK
    extra = await RawClient.connect_unix(path)
    with trio.fail_after(DEADLINE):
        assert await extra.closed_by_server()  # no greeting: refused at accept
    await held[0].disconnect()
    await held[0].close()
    await wait_until(lambda: svc.server.active == 1, what="the first connection's end counted")
    again = await RawClient.connect_unix(path)
    assert (await again.go("vm/d"))[-1][0] == p.REP_ACK
    await svc.stop()


async def _starttls(c: RawClient, ctx: ssl.SSLContext) -> None:
    assert (await c.option(p.OPT_STARTTLS))[-1][0] == p.REP_ACK
    tls = trio.SSLStream(c.stream, ctx, server_hostname=None, https_compatible=False)
    await tls.do_handshake()
    c.stream = tls


@pytest.mark.skipif(not HAVE_OPENSSL, reason="needs the openssl command for test certificates")
async def test_tcp_requires_tls_and_a_certificate_from_the_ca(serve, tmp_path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = TlsConfig.load(str(pki / "secondary.pem"), str(pki / "secondary.key"), str(pki / "ca.pem"))
    s = await serve()
    svc = await NbdService.start(s.nursery, s.store, None, socket_path=None, tcp=("127.0.0.1", 0), tls=tls.server)
    port = int(svc.addresses[0].split(":")[2].split()[0])

    async def client() -> RawClient:
        c = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
        await c.greet()
        return c

    c = await client()  # plain: every option but STARTTLS and ABORT is refused
    assert (await c.option(p.OPT_LIST))[-1][0] == p.REP_ERR_TLS_REQD
    assert (await c.option(p.OPT_GO, c.go_data("vm/d")))[-1][0] == p.REP_ERR_TLS_REQD
    await c.send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, 4) + b"vm/d")
    with trio.fail_after(DEADLINE):
        assert await c.closed_by_server()

    def ctx(node: str) -> ssl.SSLContext:
        x = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        x.check_hostname = False
        x.load_verify_locations(str(pki / "ca.pem"))
        x.load_cert_chain(str(pki / f"{node}.pem"), str(pki / f"{node}.key"))
        return x

    for bad in ("stranger", "expired"):  # another CA's certificate, an expired one
        c = await client()
        with trio.fail_after(DEADLINE), pytest.raises(trio.BrokenResourceError):
            await _starttls(c, ctx(bad))
            await c.option(p.OPT_LIST)

    c = await client()
    await _starttls(c, ctx("primary"))
    assert (await c.option(p.OPT_STARTTLS))[-1][0] == p.REP_ERR_INVALID  # once is enough
    assert (await c.option(p.OPT_STRUCTURED_REPLY))[-1][0] == p.REP_ACK
    c.structured = True
    assert (await c.option(p.OPT_GO, c.go_data("vm/d")))[-1][0] == p.REP_ACK
    assert (await c.write(0, b"tls!" * 1024)).error == 0
    assert await c.read(0, 4096) == b"tls!" * 1024
    await svc.stop()


class _StuckSink:
    """A primary's forwarding sink whose secondary never acknowledges."""

    def __init__(self) -> None:
        self.items: list[object] = []

    async def wait_room(self, nbytes: int) -> None:
        pass

    def put_nowait(self, item: object) -> None:
        self.items.append(item)

    async def wait_acked(self, seq: int) -> None:
        await trio.sleep_forever()


async def test_stop_ends_a_request_stuck_past_the_grace(serve, tmp_path) -> None:
    s = await serve("primary")
    sink = _StuckSink()
    s.store.vm("vm").forward = sink  # type: ignore[assignment]
    path = str(tmp_path / "nbd.sock")
    svc = await NbdService.start(s.nursery, s.store, None, socket_path=path, tcp=None)
    c = await RawClient.connect_unix(path)
    assert (await c.go("vm/d"))[-1][0] == p.REP_ACK
    await c.request(p.CMD_WRITE, 0, 4096, payload=b"w" * 4096)
    await wait_until(lambda: sink.items, what="the write handed to the sink")
    with trio.fail_after(DEADLINE):
        await svc.stop(grace=0.2)
    assert svc.server.active == 0 and not os.path.exists(path)
