"""Damage found after a crash quarantines one VM of the secondary; ``mountctl repair`` rebuilds it from the primary.

A real pair on loopback: vm1 (16 MiB) checkpointed with 'A', then primary
writes of 'B' over blocks 0-63 that the secondary applied, then kill -9 of the
secondary and one flipped byte in an acknowledged group of vm1's hidden.log.
The remount must succeed, keep vm1 quarantined (status names the file, offset
and reason; no disk file; hidden.log untouched) while vm2 serves, and never
serve 'B' as vm1's checkpoint image. The repair moves the damaged copy aside,
and the primary's full digest-compared sync makes vm1 equal to the primary.
"""

from __future__ import annotations

import errno
import json
import mmap
import os

from colofs.core.blocklog import file_header_len
from tests.e2e.pair import MiB, Pair, direct_pwrite, read_file
from tests.fs.mounts import mountctl
from tests.waiting import wait_until_sync

SIZE = 16 * MiB
BLOCK = 4096


def test_damaged_vm_is_quarantined_alone_and_repaired_from_the_primary(pair: Pair) -> None:
    pair.start()
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", str(SIZE))
    mountctl("create", pair.pri.mnt, "vm2/d0", "--size", str(MiB))
    pair.wait_disk("vm1", "d0", SIZE)
    pair.wait_disk("vm2", "d0", MiB)
    direct_pwrite(pair.pfile("vm1"), 0, b"A" * MiB)
    direct_pwrite(pair.pfile("vm2"), 0, b"O" * (64 * 1024))
    pair.checkpoint("vm1")
    pair.checkpoint("vm2")
    for g in range(4):  # 'B' over blocks 0-63, in four writes
        direct_pwrite(pair.pfile("vm1"), g * 64 * 1024, b"B" * (64 * 1024))
    pair.wait_caught_up("vm1")

    pair.sec.kill9()
    pair.sec.mounted = False
    hidden = pair.sec.store / "vm1" / "d0" / "hidden.log"
    first_data = file_header_len(BLOCK) + BLOCK  # the first segment's first saved block
    with open(hidden, "r+b") as f:
        f.seek(first_data + 100)
        byte = f.read(1)
        f.seek(first_data + 100)
        f.write(bytes([byte[0] ^ 1]))
    kept = hidden.read_bytes()

    pair.mount_secondary()  # succeeds: one damaged VM does not stop the store
    st = pair.vm_status(pair.sec, "vm1")
    assert st is not None and st["phase"] == "damaged", st
    assert st["damage"]["file"] == str(hidden)
    assert st["damage"]["offset"] == file_header_len(BLOCK)
    assert "fails its checksum" in st["damage"]["reason"]
    assert not pair.sfile("vm1").exists()  # nothing of it is served, least of all 'B' as the checkpoint
    assert read_file(pair.sfile("vm2"))[: 64 * 1024] == b"O" * (64 * 1024)
    assert hidden.read_bytes() == kept  # the evidence is kept, not truncated
    text = mountctl("status", pair.sec.mnt, "vm1").stdout
    assert "DAMAGED" in text and "mountctl repair" in text
    assert "quarantined" in pair.sec.log()
    # The primary is refused for vm1 and says why; it keeps serving and tracking its writes.
    wait_until_sync(lambda: "quarantined" in json.dumps(pair.peer(pair.pri, "vm1")), 60,
                    "the primary to report the secondary's quarantine")

    out = mountctl("repair", pair.sec.path("vm1")).stdout
    assert "moved aside" in out and "full digest-compared sync" in out
    aside = [e for e in os.listdir(pair.sec.store) if e.startswith(".damaged-vm1-")]
    assert len(aside) == 1
    assert (pair.sec.store / aside[0] / "d0" / "hidden.log").read_bytes() == kept

    wait_until_sync(lambda: pair.peer(pair.pri, "vm1").get("state") == "connected", 60,
                    "the primary to reattach vm1 after the repair")
    res = pair.checkpoint("vm1", timeout=60)
    assert res["replicated"]
    assert read_file(pair.sfile("vm1"), direct=True) == read_file(pair.pfile("vm1"), direct=True)
    st = pair.vm_status(pair.sec, "vm1")
    assert st["phase"] == "normal" and "damage" not in st
    assert "full" in pair.pri.log() and "repair started" in pair.sec.log()


def test_a_block_damaged_while_serving_is_eio_and_quarantines_only_its_vm(pair: Pair) -> None:
    """On a live secondary, a saved block of hidden.log that no longer matches its digest is never served."""
    pair.start()
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", str(MiB))
    mountctl("create", pair.pri.mnt, "vm2/d0", "--size", str(MiB))
    pair.wait_disk("vm1", "d0", MiB)
    pair.wait_disk("vm2", "d0", MiB)
    direct_pwrite(pair.pfile("vm1"), 0, b"A" * (64 * 1024))
    direct_pwrite(pair.pfile("vm2"), 0, b"O" * (64 * 1024))
    pair.checkpoint("vm1")
    pair.checkpoint("vm2")
    direct_pwrite(pair.pfile("vm1"), 0, b"B" * (64 * 1024))  # hidden now holds the checkpoint's 'A's
    pair.wait_caught_up("vm1")
    hidden = pair.sec.store / "vm1" / "d0" / "hidden.log"
    with open(hidden, "r+b") as f:  # the daemon reads the same page cache
        f.seek(file_header_len(BLOCK) + BLOCK + 5)
        f.write(b"a")

    fd = os.open(pair.sfile("vm1"), os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 64 * 1024)
        with buf:
            try:
                os.preadv(fd, [buf], 0)
            except OSError as e:
                assert e.errno == errno.EIO
            else:
                raise AssertionError(f"a damaged block was served: {bytes(buf[:16])!r}")
    finally:
        os.close(fd)
    st = pair.vm_status(pair.sec, "vm1")
    assert st is not None and st["phase"] == "damaged"
    assert (st["damage"]["file"], st["damage"]["offset"]) == (str(hidden), file_header_len(BLOCK) + BLOCK)
    assert read_file(pair.sfile("vm2"), direct=True)[: 64 * 1024] == b"O" * (64 * 1024)

    mountctl("repair", pair.sec.path("vm1"))
    wait_until_sync(lambda: pair.peer(pair.pri, "vm1").get("state") == "connected", 60,
                    "the primary to reattach vm1 after the repair")
    pair.checkpoint("vm1", timeout=60)
    assert read_file(pair.sfile("vm1"), direct=True) == read_file(pair.pfile("vm1"), direct=True)
