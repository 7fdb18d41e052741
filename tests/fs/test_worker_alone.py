"""One VM's worker process on its own, the test playing its supervisor over the channel.

The test waits for ``opened`` and ``ready``, sends ``ping``, ``create_disk``,
``import_disk``, ``budget``, ``connection`` and ``stop``, and reads the files
and attributes through the worker's VM-rooted mount (tests/fs/workerstub.py).
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from colofs.core import PrimaryWrite, Store
from colofs.workers.channel import RemoteError
from tests.fs.workerstub import XATTR, MiB, Supervisor, status, supervising
from tests.waiting import wait_until


async def test_worker_creates_its_vm_serves_it_and_stops_cleanly(tmp_path: Path) -> None:
    async with supervising(tmp_path, "primary") as (sup, nursery):
        await sup.start(nursery, create_vm="primary", restarts=2)
        opened = await sup.wait_for("opened")
        assert opened["role"] == "primary" and opened["damaged"] is False and opened["notes"] == []
        # The VM's directory shows up in the root only now: the worker waits for it to mount.
        os.mkdir(sup.vm_mount)
        ready = await sup.wait_for("ready")
        assert ready == {"op": "ready", "mountpoint": sup.vm_mount, "pid": sup.proc.pid}
        assert sup.got("summary")[0]["role"] == "primary"
        assert sup.mounted()
        assert sup.channel is not None
        pong = await sup.channel.call("ping", timeout=60)
        assert "error" not in pong

        made = await sup.channel.call("create_disk", timeout=60, disk="d0", size=MiB, block_size=4096)
        assert made["ok"] is True and made["op"] == "create"
        assert (made["vm"], made["disk"], made["size"]) == ("vm0", "d0", MiB)
        assert made["file"] == os.path.join(sup.vm_mount, "d0.raw")
        with pytest.raises(RemoteError) as refused:
            await sup.channel.call("create_disk", timeout=60, vm="other", disk="d0", size=MiB)
        assert refused.value.errno == errno.EINVAL
        with pytest.raises(RemoteError) as exists:
            await sup.channel.call("create_disk", timeout=60, disk="d0", size=MiB)
        assert exists.value.errno == errno.EEXIST
        image = tmp_path / "image.raw"
        image.write_bytes(b"I" * 3000)
        imported = await sup.channel.call("import_disk", timeout=60, disk="imp", source=str(image))
        assert imported["ok"] is True and imported["op"] == "import"
        assert (imported["size"], imported["source_bytes"]) == (3072, 3000)
        with pytest.raises(RemoteError) as relative:
            await sup.channel.call("import_disk", timeout=60, disk="imp2", source="image.raw")
        assert relative.value.errno == errno.EINVAL
        await sup.channel.notify("budget", max_retained_total_bytes=32 * MiB)
        await sup.channel.notify("budget", max_retained_total_bytes="lots")
        log = Path(sup.store, ".colofs-mount.log")
        await wait_until(lambda: "budget: 'lots' is not a positive number" in log.read_text(), what="the refusal")
        assert f"retained writes bounded to {32 * MiB} bytes" in log.read_text()

        data = os.urandom(64 * 1024)

        def use_the_mount() -> dict[str, Any]:
            path = os.path.join(sup.vm_mount, "d0.raw")
            assert sorted(os.listdir(sup.vm_mount)) == ["d0.raw", "imp.raw"]
            with open(os.path.join(sup.vm_mount, "imp.raw"), "rb") as imp:
                assert imp.read() == b"I" * 3000 + bytes(72)
            assert os.path.getsize(path) == MiB
            fd = os.open(path, os.O_RDWR)
            try:
                os.pwrite(fd, data, 8192)
                os.fsync(fd)
                assert os.pread(fd, len(data), 8192) == data
            finally:
                os.close(fd)
            names = os.listxattr(sup.vm_mount)
            assert XATTR + "status" in names and XATTR + "snapshots" in names
            assert XATTR + "version" not in names  # the root's attributes are the supervisor's
            with pytest.raises(OSError) as no_attr:
                os.getxattr(sup.vm_mount, XATTR + "version")
            assert no_attr.value.errno == errno.ENODATA
            with pytest.raises(OSError) as no_mkdir:
                os.mkdir(os.path.join(sup.vm_mount, "x"))
            assert no_mkdir.value.errno == errno.EPERM
            os.setxattr(sup.vm_mount, XATTR + "checkpoint", b"")
            new = os.path.join(sup.vm_mount, "d1.raw")
            with open(new, "wb"):  # a pending file, made a disk by its first truncate (qemu-img create's way)
                pass
            os.truncate(new, 2 * MiB)
            os.setxattr(sup.vm_mount, XATTR + "snapshot", b"s1")
            assert sorted(os.listdir(sup.vm_mount)) == ["d0.raw", "d0@s1.raw", "d1.raw", "d1@s1.raw",
                                                        "imp.raw", "imp@s1.raw"]
            with open(os.path.join(sup.vm_mount, "d0@s1.raw"), "rb") as snap:
                snap.seek(8192)
                assert snap.read(len(data)) == data
            return status(sup.vm_mount)

        st = await trio.to_thread.run_sync(use_the_mount)
        assert st["kind"] == "vm" and st["role"] == "primary"
        assert st["worker"] == {"state": "serving", "pid": sup.proc.pid, "restarts": 2}
        assert sorted(st["disks"]) == ["d0", "d1", "imp"] and st["disks"]["d1"]["size"] == 2 * MiB
        event = await wait_until(lambda: [m for m in sup.got("event") if m["kind"] == "checkpoint"],
                                 what="the checkpoint event")
        assert event[0]["fields"]["vm"] == "vm0"

        await sup.channel.notify("stop", lazy=False)
        assert await sup.exit_status() == 0
        assert not sup.mounted()

    store = await Store.open(sup.store, role="primary")
    try:
        vm = store.vm("vm0")
        assert vm.state.role == "primary"
        assert await vm.disk("d0").read(8192, len(data)) == data
        assert vm.recovery.action not in ("rolled-back", "failover-completed")
    finally:
        await store.close()


async def _route(listener: trio.socket.SocketType, secondary: Supervisor, routed: list[str]) -> None:
    """The secondary supervisor's part: accept, read the route preamble if there is one, hand the socket over."""
    assert secondary.channel is not None
    while True:
        sock, addr = await listener.accept()
        with sock:
            head = await sock.recv(8, socket.MSG_PEEK)
            if head == b"COLOROUT":
                header = await _recv_exactly(sock, 10)
                routed.append((await _recv_exactly(sock, header[9])).decode())
            await secondary.channel.notify("connection", peer=f"{addr[0]}:{addr[1]}", fds=[sock.fileno()])


async def _recv_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    data = b""
    while len(data) < n:
        got = await sock.recv(n - len(data))
        assert got, "the primary closed during its route preamble"
        data += got
    return data


async def test_secondary_worker_serves_connections_handed_to_it(tmp_path: Path) -> None:
    """A primary worker's link reaches a secondary worker through a connection its 'supervisor' accepted."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    routed: list[str] = []
    with listener:
        async with supervising(tmp_path / "s", "secondary", options=("--listen", f"127.0.0.1:{port}")) as (sec, n1), \
                supervising(tmp_path / "p", "primary", options=("--peer", f"127.0.0.1:{port}")) as (pri, n2):
            for sup, role in ((sec, "secondary"), (pri, "primary")):
                os.mkdir(sup.vm_mount)
                await sup.start(n1 if sup is sec else n2, create_vm=role)
                await sup.wait_for("ready")
            n1.start_soon(_route, listener, sec, routed)
            assert pri.channel is not None
            await pri.channel.call("create_disk", timeout=60, disk="d0", size=MiB)
            await wait_until(lambda: [m for m in pri.got("event") if m["kind"] == "peer-connected"],
                             what="the primary's link to connect")
            await wait_until(lambda: os.path.exists(os.path.join(sec.vm_mount, "d0.raw")),
                             what="the disk on the secondary")
            data = os.urandom(128 * 1024)

            def write_and_checkpoint() -> None:
                fd = os.open(os.path.join(pri.vm_mount, "d0.raw"), os.O_RDWR)
                try:
                    os.pwrite(fd, data, 4096)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.setxattr(pri.vm_mount, XATTR + "checkpoint", b"")  # through the secondary

            await trio.to_thread.run_sync(write_and_checkpoint)

            def read_secondary() -> bytes:
                with open(os.path.join(sec.vm_mount, "d0.raw"), "rb") as f:
                    f.seek(4096)
                    return f.read(len(data))

            assert await trio.to_thread.run_sync(read_secondary) == data
            st = await trio.to_thread.run_sync(status, sec.vm_mount)
            assert st["peer"]["state"] == "connected", st["peer"]
            assert pri.got("summary")[-1]["link"] == "connected"
            if routed:  # a primary that sends the route preamble names its VM in it
                assert set(routed) == {"vm0"}
            for sup in (pri, sec):
                assert sup.channel is not None
                await sup.channel.notify("stop", lazy=False)
                assert await sup.exit_status() == 0
                assert not sup.mounted()


async def test_worker_runs_its_vms_crash_recovery_and_reports_it(tmp_path: Path) -> None:
    """A secondary VM left mid-stream by a crash is rolled back to its checkpoint by the worker that opens it."""
    async with supervising(tmp_path, "secondary", create_store=False) as (sup, nursery):
        store = await Store.open(sup.store, role="secondary", create=True)
        await store.create_disk("vm0", "d0", MiB)
        vm = store.vm("vm0")
        await vm.apply_primary(1, [PrimaryWrite("d0", 0, b"A" * 4096)])
        await vm.checkpoint(1)
        await vm.apply_primary(2, [PrimaryWrite("d0", 0, b"B" * 4096)])
        store.abandon()  # as a killed worker leaves it
        os.mkdir(sup.vm_mount)
        await sup.start(nursery, restarts=1)
        opened = await sup.wait_for("opened")
        assert opened["damaged"] is False
        assert any("recovered after a crash" in note and "checkpoint seq 1" in note for note in opened["notes"])
        await sup.wait_for("ready")

        def read_back() -> tuple[bytes, dict[str, Any]]:
            with open(os.path.join(sup.vm_mount, "d0.raw"), "rb") as f:
                return f.read(4096), status(sup.vm_mount)

        data, st = await trio.to_thread.run_sync(read_back)
        assert data == b"A" * 4096
        assert st["recovery"]["action"] == "rolled-back" and st["worker"]["restarts"] == 1
        assert sup.channel is not None
        await sup.channel.notify("stop", lazy=False)
        assert await sup.exit_status() == 0


async def test_worker_serves_a_damaged_vm_quarantined(tmp_path: Path) -> None:
    async with supervising(tmp_path, "secondary", create_store=False) as (sup, nursery):
        store = await Store.open(sup.store, role="secondary", create=True)
        await store.create_disk("vm0", "d0", MiB)
        await store.close()
        Path(sup.store, "vm0", "state").write_bytes(b"not a state file")
        os.mkdir(sup.vm_mount)
        await sup.start(nursery)
        assert (await sup.wait_for("opened"))["damaged"] is True
        await sup.wait_for("ready")
        st = await trio.to_thread.run_sync(status, sup.vm_mount)
        assert st["damage"] is not None and st["worker"]["state"] == "serving"
        assert sup.channel is not None
        await sup.channel.notify("stop", lazy=False)
        assert await sup.exit_status() == 0
