"""How one VM's worker ends when things go wrong: its supervisor gone or deaf, the root above it dead,
an unmount that fails, a signal, a start that cannot succeed. The VM is closed cleanly every time.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import trio

from colofs.core import Store
from tests.fs.workerstub import XATTR, MiB, Supervisor, supervising
from tests.waiting import wait_until


async def test_worker_gone_supervisor_unmounts_lazily_and_closes_the_vm(tmp_path: Path) -> None:
    """The end of the channel (a dead supervisor) detaches the mount at once, even busy; the VM closes cleanly."""
    async with supervising(tmp_path, "secondary", create_store=False) as (sup, nursery):
        store = await Store.open(sup.store, role="secondary", create=True)
        await store.create_disk("vm0", "d0", MiB)
        await store.close()
        os.mkdir(sup.vm_mount)
        await sup.start(nursery)
        assert (await sup.wait_for("opened"))["role"] == "secondary"
        await sup.wait_for("ready")
        fd = await trio.to_thread.run_sync(os.open, os.path.join(sup.vm_mount, "d0.raw"), os.O_RDONLY)
        try:
            assert sup.channel is not None
            sup.channel.close()
            await wait_until(lambda: not sup.mounted(), what="the lazy unmount")
            assert sup.proc is not None and sup.proc.poll() is None  # a file is still open
        finally:
            os.close(fd)
        assert await sup.exit_status() == 0
    store = await Store.open(sup.store, role="secondary")
    try:
        assert store.vm("vm0").recovery.action != "rolled-back"
    finally:
        await store.close()


async def test_worker_without_its_vm_reports_failed(tmp_path: Path) -> None:
    async with supervising(tmp_path, "secondary") as (sup, nursery):
        os.mkdir(sup.vm_mount)
        await sup.start(nursery)  # no create_vm: the VM must exist
        failed = await wait_until(lambda: sup.got("failed"), what="failed")
        assert "has no VM vm0" in failed[0]["error"]
        assert await sup.exit_status() == 1
        assert not sup.got("ready") and not sup.mounted()
        assert not os.path.exists(os.path.join(sup.store, "vm0"))


async def test_worker_refuses_options_it_cannot_serve(tmp_path: Path) -> None:
    """The supervisor's arguments are re-parsed: an option refused with --workers fails the start."""
    async with supervising(tmp_path, "secondary") as (sup, nursery):
        tls = ["--tls-cert", str(tmp_path / "c"), "--tls-key", str(tmp_path / "k"), "--tls-ca", str(tmp_path / "ca")]
        sup.argv = lambda: ["--role", "secondary", "--store", sup.store, "--workers",  # type: ignore[method-assign]
                            "--key-file", str(tmp_path / "key"), *tls, "--nbd-listen", "127.0.0.1:9",
                            str(sup.mnt)]
        await sup.start(nursery, create_vm="secondary")
        failed = await wait_until(lambda: sup.got("failed"), what="failed")
        assert "--nbd-listen with TLS needs --single-process" in failed[0]["error"]
        assert await sup.exit_status() == 1


async def test_sigterm_unmounts_the_worker_and_closes_its_vm(tmp_path: Path) -> None:
    async with supervising(tmp_path, "secondary") as (sup, nursery):
        os.mkdir(sup.vm_mount)
        await sup.start(nursery, create_vm="secondary")
        await sup.wait_for("ready")
        assert sup.proc is not None
        sup.proc.send_signal(signal.SIGTERM)
        assert await sup.exit_status() == 0
        assert not sup.mounted()
    store = await Store.open(sup.store, role="secondary")
    try:
        assert store.vm("vm0").recovery.action != "rolled-back"
    finally:
        await store.close()


async def test_worker_under_a_dead_root_still_closes_its_vm(tmp_path: Path, mounts) -> None:
    """The root mount above the VM's dies with its supervisor; the worker, told by its channel's end, still
    detaches its mount (the path to it is cached) and closes its VM cleanly.
    """
    root = mounts("secondary", name="root")  # a real FUSE root: a one-process colofs mount
    root.path("vm0").mkdir()  # its VM directory is where the worker mounts
    sup = Supervisor(tmp_path / "w", "secondary")
    sup.mnt = root.mnt
    sup.vm_mount = str(root.path("vm0"))
    store = await Store.open(sup.store, role="secondary", create=True)
    await store.create_disk("vm0", "d0", MiB)
    await store.close()
    try:
        async with trio.open_nursery() as nursery:
            await sup.start(nursery)
            await sup.wait_for("ready")
            assert await trio.to_thread.run_sync(os.listdir, sup.vm_mount) == ["d0.raw"]
            await trio.to_thread.run_sync(root.kill9)  # the supervisor (and its root mount) die
            assert sup.channel is not None
            sup.channel.close()
            assert await sup.exit_status() == 0
            nursery.cancel_scope.cancel()
    finally:
        sup.cleanup()
    reopened = await Store.open(sup.store, role="secondary")
    try:
        assert reopened.vm("vm0").recovery.action != "rolled-back"
    finally:
        await reopened.close()


async def test_worker_that_cannot_unmount_ends_its_session_and_closes_its_vm(tmp_path: Path) -> None:
    """Both unmounts fail (here: a fusermount3 that always fails): the worker must not stay behind.

    An orphan worker after its supervisor died would keep the VM's files open
    while a new supervisor starts another worker for the same VM.
    """
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "fusermount3").write_text("#!/bin/sh\necho 'fusermount3: refused by the test' >&2\nexit 1\n")
    (fake / "fusermount3").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    async with supervising(tmp_path, "secondary") as (sup, nursery):
        os.mkdir(sup.vm_mount)
        await sup.start(nursery, create_vm="secondary", env=env)
        await sup.wait_for("ready")
        assert sup.channel is not None
        sup.channel.close()
        assert await sup.exit_status() == 0
    store = await Store.open(sup.store, role="secondary")
    try:
        assert store.vm("vm0").recovery.action != "rolled-back"
    finally:
        await store.close()


async def test_worker_whose_supervisor_stops_reading_stops_cleanly(tmp_path: Path) -> None:
    """An event sent into a channel nobody reads any more fails (EPIPE); the worker takes the supervisor
    for gone and stops cleanly. And SIGPIPE, which the zygote leaves at its default (death), is ignored:
    a write to a peer's reset TCP connection must fail with EPIPE, not kill the worker.
    """
    async with supervising(tmp_path, "secondary") as (sup, nursery):
        os.mkdir(sup.vm_mount)
        await sup.start(nursery, create_vm="secondary")
        await sup.wait_for("ready")
        assert sup.proc is not None
        with open(f"/proc/{sup.proc.pid}/status") as f:
            ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
        assert ignored & (1 << (signal.SIGPIPE - 1)), "the worker dies of SIGPIPE on a reset connection"
        assert sup.channel is not None
        sup.channel._sock.shutdown(socket.SHUT_RD)  # the worker's next send gets EPIPE
        await trio.to_thread.run_sync(os.setxattr, sup.vm_mount, XATTR + "checkpoint", b"")  # an event
        assert await sup.exit_status() == 0
        assert not sup.mounted()


async def test_stop_while_waiting_for_the_vm_directory_ends_the_start_cleanly(tmp_path: Path) -> None:
    async with supervising(tmp_path, "secondary") as (sup, nursery):
        await sup.start(nursery, create_vm="secondary")  # MOUNTPOINT/vm0 never appears
        await sup.wait_for("opened")
        assert sup.channel is not None
        await sup.channel.notify("stop", lazy=False)
        assert await sup.exit_status() == 0
        assert not sup.got("failed") and not sup.got("ready")
    store = await Store.open(sup.store, role="secondary")
    try:
        assert store.vm("vm0").recovery.action != "rolled-back"
    finally:
        await store.close()


async def test_a_vm_directory_that_never_appears_fails_the_start(tmp_path: Path) -> None:
    async with supervising(tmp_path, "secondary") as (sup, nursery):
        (sup.mnt / "vm0").write_text("a file, not a directory")
        await sup.start(nursery, create_vm="secondary")
        failed = await wait_until(lambda: sup.got("failed"), what="failed")
        assert "cannot mount on" in failed[0]["error"] and "not a directory" in failed[0]["error"]
        assert await sup.exit_status() == 1
        assert not sup.mounted()


async def test_keyless_secondary_worker_checks_its_listen_address_like_a_listener(tmp_path: Path) -> None:
    """The supervisor owns the port, but a keyless --listen that may not be loopback still fails the start."""
    async with supervising(tmp_path, "secondary", options=("--listen", "no-such-host.invalid:7000")) as (sup, nursery):
        os.mkdir(sup.vm_mount)
        await sup.start(nursery, create_vm="secondary")
        failed = await wait_until(lambda: sup.got("failed"), what="failed")
        assert "--listen no-such-host.invalid" in failed[0]["error"]
        assert await sup.exit_status() == 1
        assert not sup.mounted()
