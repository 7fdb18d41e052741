"""Primary and secondary stores replicating over loopback TCP: images, isolation, disks, failover."""

from __future__ import annotations

import os
import random

import pytest
import trio

from colofs.core.state import PRIMARY
from colofs.repl import CheckpointError
from tests.repl.conftest import base_of, wait_until
from tests.waiting import DEADLINE

D0 = 1 << 20  # 4 KiB blocks
D1 = (256 << 10) + 512  # with 4 KiB blocks: a short last block
D1_BLOCK = 4096


def rand_write(rng: random.Random, size: int) -> tuple[int, bytes]:
    n = rng.choice([1, 100, 512, 4096, 5000, 20000, 65536])
    n = min(n, size)
    off = rng.randrange(0, size - n + 1)
    data = rng.randbytes(n) if rng.random() < 0.6 else bytes([rng.randrange(1, 256)]) * n
    return off, data


async def test_stream_with_checkpoints_isolation_and_failover(pair, repl_errors) -> None:
    rng = random.Random(7)
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", D0)
    await pair.primary.create_disk("vm", "d1", D1, block_size=D1_BLOCK)
    await pair.start_secondary()
    await pair.start_primary()
    pvm = pair.primary.vm("vm")
    sizes = {"d0": D0, "d1": D1}
    pimg = {n: bytearray(s) for n, s in sizes.items()}
    await pair.caught_up()
    svm = pair.secondary.vm("vm")
    sview = {n: bytearray(s) for n, s in sizes.items()}
    # The VM is new and empty on both sides: no sync at all, only the stream.
    assert pair.repl.status("vm")["full_syncs"] == 0 and pair.repl.status("vm")["resyncs"] == 0

    for rnd in range(8):
        for _ in range(60):
            name = rng.choice(["d0", "d1"])
            off, data = rand_write(rng, sizes[name])
            if rng.random() < 0.7:
                await pvm.disk(name).write(off, data)
                pimg[name][off : off + len(data)] = data
            else:
                await svm.disk(name).write(off, data)
                sview[name][off : off + len(data)] = data
            if rng.random() < 0.1:
                # Isolation: whatever part of the stream is applied, the SVM sees only its own writes.
                for n in sizes:
                    assert bytes(await svm.disk(n).read(0, sizes[n])) == sview[n], f"round {rnd}: V changed"
        res = await pair.link("vm").replicate_checkpoint()
        assert res.seq == pvm.state.last_applied and res.latency_s > 0
        assert pvm.state.last_checkpoint == res.seq == svm.state.last_checkpoint
        for n in sizes:
            assert bytes(await pvm.disk(n).read(0, sizes[n])) == pimg[n]
        await pair.assert_identical()
        sview = {n: bytearray(pimg[n]) for n in sizes}
        st = pair.repl.status("vm")
        assert st["state"] == "streaming" and st["resyncs"] == 0 and st["full_syncs"] == 0

    # Uncheckpointed primary and SVM writes, then the primary is lost and the SVM takes over.
    for _ in range(40):
        name = rng.choice(["d0", "d1"])
        off, data = rand_write(rng, sizes[name])
        if rng.random() < 0.5:
            await pvm.disk(name).write(off, data)
        else:
            await svm.disk(name).write(off, data)
            sview[name][off : off + len(data)] = data
    await pair.caught_up()
    await svm.failover()
    assert svm.state.role == PRIMARY
    for n in sizes:
        assert bytes(await svm.disk(n).read(0, sizes[n])) == sview[n]
        assert base_of(svm.disk(n)) == bytes(sview[n])
    applied = svm.state.last_applied
    link = pair.link()
    await wait_until(lambda: link.state == "refused", what="the old primary to be refused")
    assert "failed over" in (link.last_error or "")
    assert "stale epoch" in (link.last_error or "")
    # The old primary keeps serving its VM; nothing reaches the new primary. A connection attempt
    # begun after the write, and refused, is where the write would have been sent.
    refused = pair.server.stats["refused"]
    await pvm.disk("d0").write(0, b"after failover")
    await wait_until(lambda: pair.server.stats["refused"] >= refused + 2,
                     what="a reconnection after the write to be refused")
    assert svm.state.last_applied == applied
    assert pair.server.status("vm")["connected"] is False
    with pytest.raises(CheckpointError):
        await pair.link("vm").replicate_checkpoint(timeout=0.3)
    assert not repl_errors()


async def test_disks_and_vms_created_later_appear_on_the_secondary(pair, tmp_path, repl_errors) -> None:
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", D0)
    await pair.start_secondary()
    await pair.start_primary()
    await pair.caught_up()
    pvm = pair.primary.vm("vm")
    await pvm.disk("d0").write(10, b"first")
    # A disk made from an image: its content never passes through a write.
    image = os.path.join(tmp_path, "image.raw")
    rng = random.Random(3)
    content = bytearray(300 << 10)
    content[5000:9000] = rng.randbytes(4000)
    content[200000:200100] = b"z" * 100
    with open(image, "wb") as f:
        f.write(content)
    await pair.primary.create_disk("vm", "img", 512 << 10, block_size=512, source=image)
    await pair.primary.create_disk("vm", "empty", 64 << 10)
    await pvm.disk("empty").write(100, b"e" * 10)
    res = await pair.link("vm").replicate_checkpoint()
    assert res.seq == pvm.state.last_applied
    svm = pair.secondary.vm("vm")
    assert svm.disk("img").block_size == 512 and svm.disk("img").size == 512 << 10
    await pair.assert_identical()
    # A VM created later (with a disk) is found by the scan.
    await pair.primary.create_disk("vm2", "a", 128 << 10)
    await pair.primary.vm("vm2").disk("a").write(4096, b"vm2")
    await wait_until(lambda: "vm2" in pair.repl.links, what="the new VM to be replicated")
    await pair.link("vm2").replicate_checkpoint()
    await pair.assert_identical("vm2")
    assert not repl_errors()


async def test_checkpoint_needs_the_secondary_but_writes_do_not(pair, repl_errors) -> None:
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", D0)
    await pair.start_secondary()
    port = pair.port
    await pair.stop_secondary()
    await pair.start_primary(peer_port=port)
    pvm = pair.primary.vm("vm")
    with trio.fail_after(DEADLINE):  # bounds a hang only: writes never wait for an absent secondary
        for i in range(50):
            await pvm.disk("d0").write(i * 4096, bytes([i + 1]) * 4096)
    with pytest.raises(CheckpointError, match="within 0.3 s"):
        await pair.link("vm").replicate_checkpoint(timeout=0.3)
    st = pair.repl.status("vm")
    assert st["state"] in ("disconnected", "connecting") and st["backlog_writes"] == 50
    await pair.start_secondary(port=port)
    await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()
    assert not repl_errors()
