"""The primary's memory bound: retained writes stay under ``max_backlog_bytes`` and writers wait, nothing is dropped."""

from __future__ import annotations

import random
from dataclasses import replace

import trio

from tests.repl.conftest import wait_until

SIZE = 8 << 20
WRITE = 64 << 10


async def test_unacknowledged_writes_hold_writers_back_within_the_bound(pair, repl_errors) -> None:
    backlog = 1 << 20
    pair.cfg = replace(pair.cfg, max_backlog_bytes=backlog, max_inflight_bytes=256 << 10, batch_max_bytes=128 << 10)
    limit = pair.cfg.effective_inflight
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary()
    proxy = await pair.start_proxy()
    await pair.start_primary(peer_port=proxy.port)
    await pair.caught_up()
    pvm = pair.primary.vm("vm")
    link = pair.link()
    rng = random.Random(7)
    image = bytearray(SIZE)
    total = 48  # 3 MiB: three times the backlog bound
    done = [0]
    peak = [0, 0]

    async def writer() -> None:
        for _ in range(total):
            off = rng.randrange(0, SIZE // WRITE) * WRITE
            data = rng.randbytes(WRITE)
            await pvm.disk("d0").write(off, data)
            image[off : off + WRITE] = data
            done[0] += 1
            peak[0] = max(peak[0], link.retained.nbytes)
            peak[1] = max(peak[1], link.unacked_bytes)

    proxy.hold_down = True  # the secondary applies, but its acknowledgements stop
    finished = trio.Event()

    async def run_writer() -> None:
        await writer()
        finished.set()

    pair.nursery.start_soon(run_writer)
    await wait_until(lambda: link.unacked_bytes + WRITE > limit, what="the in-flight bound to be reached")
    stuck_at = done[0]
    for _ in range(20):  # however long the loop runs, the writer gets no further without acknowledgements
        await trio.sleep(0.01)
    assert done[0] == stuck_at and not finished.is_set()
    assert stuck_at * WRITE <= limit + WRITE
    assert link.state == "streaming" and link.retaining

    proxy.release()
    with trio.fail_after(20):
        await finished.wait()
    await pair.caught_up()
    assert peak[0] <= backlog and peak[1] <= limit
    assert link.stats["stream_breaks"] == 0 and link.stats["resyncs"] == 1  # the attach only: nothing dropped
    await pair.repl.checkpoint("vm")
    await pair.assert_identical()
    assert bytes(await pvm.disk("d0").read(0, SIZE)) == bytes(image)
    assert repl_errors() == []
