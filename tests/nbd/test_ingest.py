"""Ingest: NBD writes to ``VM/DISK:ingest`` on a secondary are forwarded primary writes, isolated from the SVM."""

from __future__ import annotations

from colofs.nbd import protocol as p


async def test_ingested_writes_go_through_copy_before_write_and_reach_the_svm_at_a_checkpoint(serve) -> None:
    s = await serve("secondary")
    vm = s.store.vm("vm")
    disk = s.store.disk("vm", "d")
    pri = await s.connect("vm/d:ingest")
    svm = await s.connect("vm/d")
    assert (await pri.write(0, b"P" * 8192)).error == 0
    assert (await pri.write(65536, b"Q" * 4096, flags=p.CMD_FLAG_FUA)).error == 0
    assert vm.state.last_applied == 2  # each write took the next sequence number
    assert len(disk.hidden) == 3  # the old blocks were saved first (copy-before-write)
    assert await pri.read(0, 8192) == b"P" * 8192  # the primary's image
    assert await svm.read(0, 8192) == bytes(8192)  # the SVM does not see it before a checkpoint
    assert (await svm.write(4096, b"S" * 4096)).error == 0  # nor the primary the SVM's write
    assert await pri.read(4096, 4096) == b"P" * 4096
    assert (await pri.call(p.CMD_FLUSH, 0, 0)).error == 0
    await vm.checkpoint()
    assert await svm.read(0, 8192) == b"P" * 8192  # the SVM's own write is dropped at the checkpoint
    assert await svm.read(65536, 4096) == b"Q" * 4096
    assert len(disk.hidden) == 0 and len(disk.active) == 0


async def test_ingest_is_refused_on_a_primary_and_for_snapshots(serve) -> None:
    s = await serve("primary")
    await s.store.vm("vm").snapshot("s1")
    c = await s.client()
    await c.greet()
    for name in ("vm/d:ingest", "vm/d@s1:ingest"):
        replies = await c.option(p.OPT_GO, c.go_data(name))
        assert replies[-1][0] == p.REP_ERR_UNKNOWN, name
