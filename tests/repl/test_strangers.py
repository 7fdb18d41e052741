"""Connections that never authenticate: bounded apart from sessions, closed unread past the limits, timed out."""

from __future__ import annotations

import logging
from dataclasses import replace

import trio

from tests.repl.conftest import wait_until
from tests.waiting import DEADLINE

SIZE = 256 << 10


async def _stranger(port: int, source: str) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return sock


async def _closed(sock: trio.socket.SocketType) -> bytes:
    """What the secondary sent before closing (it closes at once, or at the handshake timeout)."""
    got = b""
    try:
        while chunk := await sock.recv(4096):
            got += chunk
    except OSError:
        pass
    return got


async def test_the_primary_attaches_while_strangers_hold_every_pending_slot(pair, caplog) -> None:
    caplog.set_level(logging.INFO, logger="colofs")
    pair.cfg = replace(pair.cfg, max_unauthenticated=4, max_unauthenticated_per_source=2)
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    server = await pair.start_secondary()
    held = [await _stranger(pair.port, src) for src in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3")]
    await wait_until(lambda: server.admission.pending == 4, what="4 pending strangers")
    # Past the limits, a stranger is closed at once and nothing it sends is read.
    for src in ("127.0.0.2", "127.0.0.3"):
        late = await _stranger(pair.port, src)
        with late:
            await late.send(b"COLF" * 100)
            assert await _closed(late) == b""
    why = server.admission.refused
    assert (why["source_limit"], why["evicted"]) == (2, 0)
    assert server.admission.pending == 4
    # The primary's address holds no pending connection: it takes a stranger's slot and attaches.
    await pair.start_primary()
    await pair.caught_up()
    await pair.primary.vm("vm").disk("d0").write(0, b"through")
    await pair.link("vm").replicate_checkpoint()
    assert why["evicted"] == 1 and server.status()["open_sessions"] == 1
    # The strangers left are closed by the handshake timeout, and counted as such.
    with trio.fail_after(DEADLINE):
        for sock in held:
            with sock:
                await _closed(sock)
    await wait_until(lambda: server.admission.pending == 0, what="no pending connection left")
    assert why["handshake_timeout"] == 3
    st = server.status()
    assert st["refused_by_reason"]["handshake_timeout"] == 3 and st["pending"] == 0
    lines = [r.getMessage() for r in caplog.records if "refused connection from 127.0.0." in r.getMessage()]
    assert any("unauthenticated connections from this address already" in m for m in lines), lines
