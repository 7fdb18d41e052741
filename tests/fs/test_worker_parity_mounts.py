"""A mount with a worker per VM answers as a single-process one where the supervisor carries what a worker says.

Each test is one place where running the suite on both process models (the
default, and ``COLOFS_TEST_WORKERS=0`` for ``--single-process``) found them
apart; the workers' side of each is tested on its own in
tests/fs/test_worker_parity.py.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
from pathlib import Path

from colofs.wire.route import encode_route
from mountctl.pair import write_key
from tests.fs.mounts import Mount, errno_of, last_error, mountctl
from tests.fs.test_worker_parity import fill
from tests.ops.test_events import Follower
from tests.waiting import wait_until_sync

P = "user.colofs."
MiB = 1 << 20


def _store_entries(m: Mount) -> set[str]:
    return {e for e in os.listdir(m.store) if not e.startswith(".") and e != "colofs-store"}


def test_a_refused_import_of_a_new_vm_leaves_neither_store_nor_root_entry(wsec: Mount, tmp_path: Path) -> None:
    req = json.dumps({"vm": "vm1", "disk": "d0", "source": str(tmp_path)}).encode()  # a directory
    assert errno_of(os.setxattr, wsec.mnt, P + "import", req) == errno.EINVAL
    assert "is a directory" in last_error(wsec.mnt)
    assert _store_entries(wsec) == set()
    assert os.listdir(wsec.mnt) == [] and not wsec.path("vm1").exists()
    # and the same VM can then be made (its worker started anew for it)
    mountctl("create", wsec.mnt, "vm1/d0", "--size", "1M")
    wait_until_sync(lambda: wsec.path("vm1", "d0.raw").exists(), 60, "vm1/d0 served", catch=(OSError,))
    assert _store_entries(wsec) == {"vm1"}


def test_umount_says_why_a_vm_could_not_be_closed(mounts, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    m = mounts(mount=False)
    m.store = small / "store"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True, timeout=30)
    try:
        m.mount("--workers")
        mountctl("create", m.mnt, "vm1/d0", "--size", "64M")
        path = m.path("vm1", "d0.raw")
        wait_until_sync(path.exists, 60, "vm1/d0 served", catch=(OSError,))
        fill(str(path))
        res = mountctl("umount", m.mnt, check=False)
        m.mounted = False
        assert res.returncode == 1 and "No space left on device" in res.stderr, res
    finally:
        m.cleanup()
        subprocess.run(["umount", "-l", str(small)], check=False, timeout=30)


def test_a_new_listener_is_greeted_with_each_vms_peer_and_sequence(wsec: Mount) -> None:
    mountctl("create", wsec.mnt, "vm1/d0", "--size", "1M")
    wait_until_sync(lambda: wsec.path("vm1", "d0.raw").exists(), 60, "vm1/d0 served", catch=(OSError,))
    wait_until_sync(lambda: json.loads(os.getxattr(wsec.path("vm1"), P + "status")).get("worker", {}).get("state")
                    == "serving", 60, "vm1's worker serving", catch=(OSError, ValueError))
    follower = Follower(wsec.mnt)
    try:
        exists = follower.wait("exists", vm="vm1")
    finally:
        follower.stop()
    assert exists["epoch"] == 1 and exists["last_seq"] is not None and exists["peer"], exists


def test_setting_a_vm_command_on_the_root_says_where_it_goes(wsec: Mount) -> None:
    assert errno_of(os.setxattr, wsec.mnt, P + "snapshot", b"s") == errno.EINVAL
    assert "snapshot a disk file" in last_error(wsec.mnt)


def test_a_connection_a_worker_refuses_shows_in_the_roots_status(mounts, tmp_path: Path) -> None:
    key = write_key(tmp_path / "key")
    m = mounts(mount=False)
    port = _free_port()
    m.mount("--workers", "--listen", f"127.0.0.1:{port}", "--key-file", str(key))
    mountctl("create", m.mnt, "vm1/d0", "--size", "1M")
    wait_until_sync(lambda: m.path("vm1", "d0.raw").exists(), 60, "vm1/d0 served", catch=(OSError,))
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        # starts like a frame, so the router hands it to the worker, which refuses it
        sock.sendall(encode_route("vm1") + b"COLF not a handshake at all " * 8)
        sock.settimeout(60)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass

    def refused() -> dict:
        repl = json.loads(os.getxattr(m.mnt, P + "status"))["replication"]
        return repl if repl["refused"] >= 1 and repl.get("last_refusal") else {}

    repl = wait_until_sync(refused, 60, "the refusal in the root's status", catch=(OSError, ValueError))
    assert "127.0.0.1" in repl["last_refusal"], repl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
