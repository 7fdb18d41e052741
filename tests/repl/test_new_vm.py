"""A VM that is new on both sides needs no sync; what the primary holds still reaches a new secondary."""

from __future__ import annotations

import os
import shutil

import trio

from colofs.repl.persist import load_needs_full_sync
from tests.repl.conftest import base_of, wait_until
from tests.waiting import DEADLINE

TiB = 1 << 40


async def test_a_new_empty_1tib_disk_starts_streaming_without_any_sync(pair, repl_errors) -> None:
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", TiB)
    await pair.start_secondary()
    await pair.start_primary()
    await pair.caught_up()
    link = pair.link()
    assert link.stats["resyncs"] == 0 and link.stats["full_syncs"] == 0
    assert link.progress.passes == 0 and link.dirty.count() == 0
    svm = pair.secondary.vm("vm")
    assert svm.disks["d0"].size == TiB and not load_needs_full_sync(svm)

    # The stream carries what follows, and the checkpoint gives the same image on both sides.
    pvm = pair.primary.vm("vm")
    spots = [0, 123 << 30, TiB - (1 << 20)]
    for i, off in enumerate(spots):
        await pvm.disk("d0").write(off, bytes([i + 1]) * (1 << 20))
    with trio.fail_after(DEADLINE):
        await pair.link("vm").replicate_checkpoint()
    for off in spots:
        want = bytes(await pvm.disk("d0").read(off, 1 << 20))
        assert bytes(await svm.disk("d0").read(off, 1 << 20)) == want
    assert link.stats["resyncs"] == 0
    assert not repl_errors()


async def test_imported_data_reaches_a_secondary_that_is_new_again(pair, tmp_path, repl_errors) -> None:
    """Synced once, no checkpoint yet, then the secondary's store is lost: the new one still gets the image."""
    size = 1 << 20
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(300_000))
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", size, source=str(image))
    await pair.start_secondary()
    port = pair.port
    await pair.start_primary()
    await pair.caught_up()
    link = pair.link()
    assert link.stats["full_syncs"] == 0 and link.stats["resyncs"] == 1  # the imported data only
    assert base_of(pair.secondary.vm("vm").disk("d0"))[:300_000] == image.read_bytes()

    await pair.kill_secondary()
    shutil.rmtree(pair.sdir)
    await pair.start_secondary(port=port)
    await wait_until(lambda: link.stats["connects"] == 2 and link.state == "streaming", DEADLINE,
                     "the primary to attach to the new secondary")
    with trio.fail_after(DEADLINE):
        await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()
    assert link.stats["full_syncs"] == 0 and link.stats["resyncs"] == 2
    assert not repl_errors()
