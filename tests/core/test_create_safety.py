"""Creating and importing disks in the core: refused up front when it cannot work, undone when it fails.

* an import source is opened without blocking and must be a regular file or
  a block device (a FIFO used to block the open until someone wrote to it);
* the copy fails when the source's size or mtime changes under it; the
  change is made from the copy's own progress report, after its first chunk;
* a size past what the store holds is refused before any directory is made;
* a failed creation removes its temporary disk directory, and the VM too
  when the same request made it.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable

import pytest
import trio

from colofs.core.disksize import MAX_DISK_BYTES, DiskTooLarge, check_disk_size
from colofs.core.errors import BadArgument
from colofs.core.imagesource import CHUNK, ImageSource, SourceChanged, open_image
from colofs.core.provision import create_disk

MiB = 1 << 20
OLD_NS = 10**18


def _image(path, size: int) -> bytes:
    data = bytearray(os.urandom(size))
    data[CHUNK : 2 * CHUNK] = bytes(CHUNK)  # a zero chunk, left as a hole
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, ns=(OLD_NS, OLD_NS))
    return bytes(data)


def _store_entries(store) -> set[str]:
    return {e for e in os.listdir(store.path) if not e.startswith(".") and e != "colofs-store"}


# -- what is taken as a source ------------------------------------------------------------------


async def test_a_fifo_is_refused_without_blocking(tmp_path) -> None:
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    try:
        with trio.fail_after(30):
            with pytest.raises(BadArgument, match=r"is a FIFO \(named pipe\); an import takes a regular file"):
                await trio.to_thread.run_sync(open_image, str(fifo), abandon_on_cancel=True)
    finally:
        try:  # frees an open that did block, should one ever
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_only_regular_files_and_block_devices_are_taken(tmp_path) -> None:
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        for path, words in ((tmp_path, "a directory"), ("/dev/null", "a character device"),
                            (sock_path, "a socket")):
            with pytest.raises(BadArgument, match=f"is {words}"):
                open_image(str(path))
    with pytest.raises(FileNotFoundError):
        open_image(str(tmp_path / "missing.raw"))
    img = tmp_path / "img.raw"
    data = _image(img, 3 * MiB)
    link = tmp_path / "link.raw"
    link.symlink_to(img)  # what a link points to is what counts
    with open_image(str(link)) as src:
        assert (src.size, src.kind) == (len(data), "a regular file")


# -- a source that changes under the copy ---------------------------------------------------------------


def _copy(src: ImageSource, dst, progress: Callable[[int], None] | None = None) -> None:
    fd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        src.copy_into(fd, progress)
    finally:
        os.close(fd)


def test_a_quiet_source_is_copied_exactly_with_holes(tmp_path) -> None:
    data = _image(tmp_path / "img.raw", 4 * MiB + 4096)
    seen: list[int] = []
    with open_image(str(tmp_path / "img.raw")) as src:
        _copy(src, tmp_path / "out", seen.append)
    assert (tmp_path / "out").read_bytes() == data
    assert seen[-1] == len(data) and len(seen) == 5


@pytest.mark.parametrize("change", ["shrink", "rewrite", "grow"])
def test_a_source_that_changes_during_the_copy_fails(tmp_path, change: str) -> None:
    img = tmp_path / "img.raw"
    _image(img, 4 * MiB)

    def after_first_chunk(done: int) -> None:
        if done != CHUNK:
            return
        if change == "shrink":
            os.truncate(img, 2 * MiB + 512)
        elif change == "grow":
            with open(img, "ab") as f:
                f.write(b"more")
        else:
            with open(img, "r+b") as f:
                f.write(b"\xa5")  # same size, new mtime

    with open_image(str(img)) as src:
        with pytest.raises(SourceChanged, match="changed|ended at") as e:
            _copy(src, tmp_path / "out", after_first_chunk)
    assert "nothing was imported" in str(e.value)


class _ChangingImage(ImageSource):
    """A real image file that the test truncates once its first chunk is copied."""

    def copy_into(self, fd: int, progress: Callable[[int], None] | None = None) -> None:
        def shrink(done: int) -> None:
            if done == CHUNK:
                os.truncate(self.path, CHUNK)

        super().copy_into(fd, shrink)


def _changing(path) -> ImageSource:
    src = open_image(str(path))
    fd, src.fd = src.fd, -1
    return _ChangingImage(str(path), fd, src.mode)


async def test_a_failed_import_leaves_no_disk_and_no_vm(open_store, tmp_path) -> None:
    store = await open_store()
    _image(tmp_path / "img.raw", 4 * MiB)
    with _changing(tmp_path / "img.raw") as src, pytest.raises(SourceChanged):
        await create_disk(store, "vm1", "d0", 4 * MiB, source=src)
    assert "vm1" not in store.vms and _store_entries(store) == set()
    # Into a VM that was there before: the VM stays, with nothing of the disk.
    await create_disk(store, "vm2", "d0", MiB)
    _image(tmp_path / "img.raw", 4 * MiB)
    with _changing(tmp_path / "img.raw") as src, pytest.raises(SourceChanged):
        await create_disk(store, "vm2", "d1", 4 * MiB, source=src)
    vm = store.vm("vm2")
    assert sorted(vm.disks) == ["d0"] and sorted(vm.state.disks) == ["d0"]
    assert sorted(os.listdir(vm.path)) == ["d0", "state"]


# -- sizes the store cannot hold -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1 << 62, 1 << 64, MAX_DISK_BYTES + 512])
async def test_a_size_past_the_bound_is_refused_before_anything_is_made(open_store, size: int) -> None:
    store = await open_store()
    with pytest.raises(DiskTooLarge, match=f"{size} bytes is more than the largest disk"):
        await create_disk(store, "u2", "big", size)
    assert "u2" not in store.vms and _store_entries(store) == set()
    vm = await store.create_vm("u3")
    with pytest.raises(DiskTooLarge):
        await vm.add_disk("big", size)
    assert os.listdir(vm.path) == ["state"] and vm.state.disks == {}


def _fs_type(path) -> str:
    res = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, timeout=30,
                         check=False)
    return res.stdout.strip()


async def test_a_size_the_file_system_cannot_hold_is_refused_by_probing_it(open_store, tmp_path) -> None:
    if _fs_type(tmp_path) != "ext2/ext3":
        pytest.skip("needs ext4 (whose files end at 16 TiB) under the test directory")
    store = await open_store()
    size = 32 << 40  # under the fixed bound, past ext4's largest file
    with pytest.raises(DiskTooLarge, match="the store's file system holds in one file"):
        await trio.to_thread.run_sync(check_disk_size, store.path, "disk u/big", size)
    with pytest.raises(DiskTooLarge):
        await create_disk(store, "u", "big", size)
    assert _store_entries(store) == set() and os.listdir(store.path) == ["colofs-store"]
    d = await create_disk(store, "u", "fits", 1 << 40)  # a sparse TiB is fine
    assert d.size == 1 << 40
