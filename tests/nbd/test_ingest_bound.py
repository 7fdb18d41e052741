"""An ingest connection holds a bounded amount of answered writes: with its queue full it stops reading its socket."""

from __future__ import annotations

import array
import fcntl
import termios

import trio

from colofs.nbd import ingest
from colofs.nbd import protocol as p
from colofs.nbd.exports import Export
from colofs.nbd.handshake import RECV_SIZE
from tests.nbd.conftest import SIZE
from tests.nbd.rawclient import RawClient
from tests.nbd.test_ingest_group import Syncs, released, requests, write
from tests.waiting import wait_until

MiB = 1 << 20


def unread(sock: trio.socket.SocketType) -> int:
    """Bytes in the socket's receive queue that its owner has not read yet."""
    n = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, n)
    return n[0]


async def test_a_full_queue_stops_the_export_reading_its_socket(serve, monkeypatch) -> None:
    s = await serve("secondary")
    groups: list[ingest.WriteGroup] = []
    write_group = Export.write_group

    def capture(export: Export) -> ingest.WriteGroup | None:
        g = write_group(export)
        if g is not None:
            groups.append(g)
        return g

    monkeypatch.setattr(Export, "write_group", capture)
    a, b = trio.socket.socketpair()
    s.server.active += 1
    s.nursery.start_soon(s.server.handle, trio.SocketStream(b), "test")
    c = RawClient(trio.SocketStream(a))
    assert (await c.go("vm/d:ingest"))[-1][0] == p.REP_ACK
    syncs = Syncs(monkeypatch)
    syncs.hold = "hidden.log"  # the first group's apply stays under way: nothing leaves the queue
    # Twice the 12 MiB a connection may hold: without the bound (or with 16 MiB queue and groups) it reads them all.
    n = 24
    ops = [write(i % (SIZE // MiB) * MiB, bytes([i + 1]) * MiB) for i in range(n)]
    data, cookies = requests(c, ops)
    sent = 0

    async def send() -> None:
        nonlocal sent
        with memoryview(data) as mv:
            while sent < len(data):
                sent += await a.send(mv[sent : sent + (64 << 10)])

    with released(syncs):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await wait_until(syncs.holding.is_set, what="the first group's hidden sync")
            await wait_until(lambda: groups and groups[0].full and unread(b) > 0,
                             what="the export waiting for room with the client's bytes left unread")
            read = sent - unread(b)  # at most what the server took (a send may not be counted yet)
            assert sent < len(data)
            # The queue and the group being queued (8 MiB: 32 with 16 MiB of each, which read all 24 MiB
            # sent here), and what one receive left in the buffer.
            assert read <= 8 * MiB + RECV_SIZE + MiB + n * p.REQUEST.size, (read, sent)
            syncs.release.set()
            replies = [await c.reply() for _ in ops]
    assert sorted(r.cookie for r in replies) == sorted(cookies)
    assert all(r.error == 0 for r in replies), [(r.error, r.message) for r in replies]
    assert not groups[0].full
    assert (await c.call(p.CMD_FLUSH, 0, 0)).error == 0
    for i in range(SIZE // MiB):  # the last write to each MiB won
        last = max(j for j in range(n) if j % (SIZE // MiB) == i)
        assert await c.read(i * MiB, MiB) == bytes([last + 1]) * MiB
    await c.close()


def test_an_ingest_connection_holds_at_most_a_sixth_of_the_worker_budget() -> None:
    """The worker's 64 MiB RSS budget: the payload a connection may hold stays a small part of it."""
    assert ingest.HELD_BYTES <= 12 * MiB
