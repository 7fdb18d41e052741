"""A group waits for a large write still arriving, so a write split over receives does not cost a group of its own."""

from __future__ import annotations

import trio
import trio.testing

from colofs.nbd import ingest
from colofs.nbd import protocol as p
from tests.nbd.test_ingest_group import Syncs, disk_image, requests, write
from tests.waiting import wait_until

KiB = 1 << 10


async def test_a_large_write_half_received_joins_the_group_before_it(serve, monkeypatch) -> None:
    s = await serve("secondary")
    c = await s.connect("vm/d:ingest")
    assert (await c.write(0, b"x" * (1 << 20))).error == 0  # base holds data: each group saves into hidden
    await s.store.vm("vm").checkpoint()
    syncs = Syncs(monkeypatch)
    first, second = b"a" * (256 * KiB), b"b" * (256 * KiB)
    data, cookies = requests(c, [write(0, first), write(512 * KiB, second)])
    half = len(data) - 128 * KiB  # the first write whole, the second one half
    await c.send(data[:half])
    await trio.testing.wait_all_tasks_blocked()  # the server took what was sent and waits for more
    await c.send(data[half:])
    replies = [await c.reply() for _ in cookies]
    assert all(r.error == 0 for r in replies), [(r.error, r.message) for r in replies]
    assert (await c.call(p.CMD_FLUSH, 0, 0)).error == 0  # every write before it applied
    assert syncs.count("hidden.log") == 1, syncs.calls  # one group (was one per write: two syncs)
    img = disk_image(s)
    assert img[: 256 * KiB] == first and img[512 * KiB : 768 * KiB] == second
    assert img[256 * KiB : 512 * KiB] == b"x" * (256 * KiB)


async def test_small_writes_are_not_waited_for_and_a_close_applies_what_was_gathered(serve, monkeypatch) -> None:
    s = await serve("secondary")
    c = await s.connect("vm/d:ingest")
    data, _ = requests(c, [write(0, b"s" * 4096), write(8192, b"t" * 4096)])
    rest = data[-100:]
    await c.send(data[:-100])  # the second 4 KiB write is cut: the first is applied without waiting for it
    await trio.testing.wait_all_tasks_blocked()
    assert (await c.reply()).error == 0  # answered once queued: applied soon after
    await wait_until(lambda: disk_image(s)[:4096] == b"s" * 4096, what="the first write applied")
    monkeypatch.setattr(ingest, "WAIT_WRITE", 1, raising=False)  # now every write still arriving is waited for
    data, _ = requests(c, [write(16384, b"u" * 4096), write(32768, b"v" * 4096)])
    await c.send(rest + data[:-100])  # the rest of the cut write, a whole one, a cut one
    await trio.testing.wait_all_tasks_blocked()
    await c.close()  # the third write never completes: the two whole ones are applied all the same
    await wait_until(lambda: disk_image(s)[16384 : 16384 + 4096] == b"u" * 4096, what="the gathered writes applied")
    img = disk_image(s)
    assert img[8192 : 8192 + 4096] == b"t" * 4096 and img[32768 : 32768 + 4096] == bytes(4096)
