"""ATTACH rules and stream fallbacks: disk geometry, session replacement, writes too big for a frame."""

from __future__ import annotations

import logging
from dataclasses import replace

import trio

from colofs.core.state import SECONDARY
from colofs.repl import ReplCode
from colofs.wire.messages import Ack, Batch, DiskInfo, Error, Write
from tests.repl.conftest import wait_until
from tests.repl.rawpeer import RawPrimary
from tests.waiting import DEADLINE

SIZE = 256 << 10


async def test_disk_with_another_geometry_refuses_the_attach(pair, caplog) -> None:
    caplog.set_level(logging.INFO, logger="colofs")
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.secondary.create_disk("vm", "d0", SIZE * 2, role=SECONDARY)
    await pair.start_secondary()
    link = (await pair.start_primary()).links["vm"]
    await wait_until(lambda: link.state == "refused", what="the refusal")
    assert "disk d0 is 524288 bytes with 4096-byte blocks here, 262144 bytes" in link.last_error
    assert pair.secondary.vm("vm").state.last_applied == 0


async def test_a_new_connection_replaces_a_half_open_one(pair) -> None:
    await pair.open_stores()
    await pair.secondary.create_disk("vm", "d0", SIZE, role=SECONDARY)
    await pair.start_secondary(key=None)
    disks = [DiskInfo("d0", SIZE, 4096)]
    old = await RawPrimary.connect(pair.port, "vm", disks)
    await old.send(Batch(1, (Write(0, 0, b"one"),)))
    assert await old.receive() == Ack(1)
    new = await RawPrimary.connect(pair.port, "vm", disks)  # the primary reconnected; the old one is silent
    assert new.attached.last_applied == 1
    closed, err = await old.until_closed(DEADLINE)
    assert closed and isinstance(err, Error) and err.code == ReplCode.REPLACED
    await new.send(Batch(2, (Write(0, 3, b"two"),)))
    assert await new.receive() == Ack(2)
    assert bytes(await pair.secondary.vm("vm").disk("d0").read(0, 6)) == bytes(6)  # V: the SVM's, unchanged
    for c in (old, new):
        await c.aclose()


async def test_a_write_too_big_for_a_frame_is_resynchronised(pair, repl_errors) -> None:
    pair.cfg = replace(pair.cfg, max_write_bytes=64 << 10)
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", 1 << 20)
    await pair.start_secondary()
    await pair.start_primary()
    await pair.caught_up()
    pvm = pair.primary.vm("vm")
    await pvm.disk("d0").write(1000, b"small")
    await pvm.disk("d0").write(4096, bytes(range(256)) * 1024)  # 256 KiB in one write
    await pvm.disk("d0").write(2000, b"after")
    with trio.fail_after(DEADLINE):
        await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()
    st = pair.repl.status("vm")
    assert st["stream_breaks"] == 1 and st["resyncs"] == 1  # a new, empty VM needs none: only this one
    assert not repl_errors()


async def test_disk_created_during_a_write_storm(pair, caplog) -> None:
    """Creating a disk saves the VM state while writes go on; the images still end up identical."""
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", 1 << 20)
    await pair.start_secondary()
    await pair.start_primary()
    await pair.caught_up()
    pvm = pair.primary.vm("vm")
    stop = trio.Event()
    written = 0

    async def storm() -> None:
        nonlocal written
        while not stop.is_set():
            i = written
            await pvm.disk("d0").write((i * 4096) % (1 << 20), bytes([i % 251 + 1]) * 4096)
            written += 1
            await trio.sleep(0)

    async def more_writes(n: int) -> None:
        target = written + n
        await wait_until(lambda: written >= target, what=f"{n} more storm writes")

    async with trio.open_nursery() as n:
        n.start_soon(storm)
        await more_writes(20)
        for k in range(3):
            await pair.primary.create_disk("vm", f"new{k}", 64 << 10)
            await more_writes(10)  # the storm goes on between and after the creations
        stop.set()
    with trio.fail_after(DEADLINE):
        await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()
