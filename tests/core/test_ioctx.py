"""The store's I/O context: owned by the store, handed to its disks, its threads ended at close."""

from __future__ import annotations

import os
import threading

from colofs.core import Store
from colofs.core.ioctx import IOContext

SIZE = 4 << 20


async def test_closing_the_store_ends_its_writeback_and_pool_threads(tmp_path, monkeypatch) -> None:
    """Writes start writeback and a large read uses the pool; after close no thread of the store lives."""
    from colofs.core import cbw

    monkeypatch.setattr(cbw, "WRITEBACK_EVERY", 64 << 10)
    store = await Store.open(os.path.join(tmp_path, "store"), role="primary", create=True)
    disk = await store.create_disk("vm", "d", SIZE)
    assert disk.io is store.io and disk.cbw.io is store.io  # one context, handed down
    for i in range(8):
        await disk.write(i * (64 << 10), bytes([i + 1]) * (64 << 10))
    io = store.io
    io.reads.mode = "thread"  # small reads go to the pool too
    assert bytes(await disk.read(4096, 4096)) == bytes([1]) * 4096
    threads = [t for t in (io.writeback._thread, *io.pool._threads) if t is not None]
    assert any(t.name == "colofs-writeback" for t in threads)
    assert any(t.name.startswith("colofs-io-") for t in threads)
    await store.close()
    assert not any(t.is_alive() for t in threads)
    assert not [t for t in threading.enumerate() if t in threads]


async def test_two_stores_in_one_process_keep_their_own_read_policy(tmp_path) -> None:
    """A policy pinned for one store's context leaves another store's untouched."""
    pinned = IOContext("loop")
    a = await Store.open(os.path.join(tmp_path, "a"), role="secondary", create=True, io=pinned)
    b = await Store.open(os.path.join(tmp_path, "b"), role="secondary", create=True)
    try:
        assert a.io is pinned and a.io.reads.mode == "loop"
        assert b.io is not pinned and b.io.reads is not pinned.reads
        da = await a.create_disk("vm", "d", SIZE)
        db = await b.create_disk("vm", "d", SIZE)
        await da.write(0, b"a" * 4096)
        await db.write(0, b"b" * 4096)
        assert bytes(await da.read(0, 4096)) == b"a" * 4096
        assert bytes(await db.read(0, 4096)) == b"b" * 4096
    finally:
        await a.close()
        await b.close()
