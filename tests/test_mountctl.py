"""mountctl end to end: every command, its --json output, and its errors (exit 1, or 2 for usage)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from colofs.fs.config import LOCK_NAME, LOG_NAME
from mountctl.pair import with_workers
from tests.fs.mounts import MOUNTCTL, Mount, mountctl
from tests.mountable import mount_skip_reason
from tests.waiting import wait_until_sync

_SKIP = mount_skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"mount test {_SKIP}")
MiB = 1 << 20


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator:
    made: list[Mount] = []

    def make(role: str = "secondary", name: str = "m", mount: bool = True) -> Mount:
        m = Mount(tmp_path, role, name)
        made.append(m)
        if mount:
            m.mount()
        return m

    try:
        yield make
    finally:
        for m in made:
            m.cleanup()


def _fails(*args: object, code: int = 1) -> str:
    res = mountctl(*map(str, args), check=False)
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert err, "an error must say what went wrong"
    if code == 1:
        assert err.startswith("mountctl: ") and res.stdout == ""
    return err


def _lock_state(m: Mount) -> dict:
    return json.loads((m.store / LOCK_NAME).read_text())


def test_mount_creates_the_store_and_reports_where_it_logs(mounts):
    m = mounts(mount=False)
    res = m.mount()
    assert f"log {m.store / LOG_NAME}" in res.stdout and f"on {m.mnt}" in res.stdout
    assert (m.store / LOG_NAME).exists() and (m.store / "colofs-store").exists()
    assert _lock_state(m)["state"] == "serving"
    st = m.status()
    assert st["store"] == str(m.store) and st["default_role"] == "secondary" and st["vms"] == {}
    assert st["replication"] == {"state": "not configured"}
    assert "no VMs yet" in mountctl("status", m.mnt).stdout
    res = mountctl("umount", m.mnt)
    m.mounted = False
    assert "closed cleanly" in res.stdout
    assert _lock_state(m)["state"] == "closed" and not os.path.ismount(m.mnt)


def test_create_import_status_checkpoint_failover(mounts, tmp_path):
    m = mounts()
    out = mountctl("create", m.mnt, "vm1/d0", "--size", "64M").stdout
    assert out.startswith(f"created {m.mnt}/vm1/d0.raw: 64MiB, 4096-byte blocks")
    mountctl("create", m.mnt, "vm1/d1.raw", "--size", "1G", "--block-size", "65536")
    img = tmp_path / "img.raw"
    img.write_bytes(os.urandom(3 * MiB + 100))
    out = mountctl("import", m.mnt, "vm2/sys", "--from", img).stdout
    assert "imported" in out and "vm2/sys.raw" in out
    assert os.stat(m.path("vm2", "sys.raw")).st_size == 3 * MiB + 512
    mountctl("import", m.mnt, "vm2/big", "--from", img, "--size", "8M")
    assert os.stat(m.path("vm2", "big.raw")).st_size == 8 * MiB

    st = m.status()
    vm1 = st["vms"]["vm1"]
    for key in ("role", "phase", "epoch", "last_checkpoint", "last_applied", "peer", "recovery", "disks"):
        assert key in vm1
    want = {"size": 1 << 30, "block_size": 65536, "hidden_bytes": 0, "active_bytes": 0, "file": "d1.raw",
            "io_errors": 0}
    assert {k: vm1["disks"]["d1"][k] for k in want} == want
    assert m.status("vm1")["vm"] == "vm1"
    assert m.status("vm1/d0")["size"] == 64 * MiB
    human = mountctl("status", m.mnt).stdout
    assert "vm1 role:secondary phase:normal epoch:1" in human
    assert "disk:d1 size:1GiB block:65536 hidden:0B active:0B" in human
    assert "peer:not configured" in human
    assert mountctl("status", m.mnt, "vm2").stdout.startswith("vm2 role:secondary")
    assert "disk:sys" in mountctl("status", m.mnt, "vm2/sys").stdout

    with open(m.path("vm1", "d0.raw"), "r+b") as f:
        f.write(b"x" * 10000)
    out = mountctl("checkpoint", m.path("vm1")).stdout
    assert out.startswith("vm1: checkpoint at seq 0: discarded 12KiB active and 0B hidden; took ")
    assert "last:checkpoint seq:0" in mountctl("status", m.mnt, "vm1").stdout
    out = mountctl("failover", m.path("vm2")).stdout
    assert out.startswith("vm2: failover complete: 0 blocks committed") and "epoch 1 -> 2; now primary" in out
    assert m.status("vm2")["role"] == "primary"


def test_errors_are_one_clear_line(mounts, tmp_path):
    m = mounts()
    mountctl("create", m.mnt, "vm1/d0", "--size", "4M")
    missing = tmp_path / "nowhere"
    assert "no such file" in _fails("status", missing)
    assert "is not on a colofs mount" in _fails("status", tmp_path)
    assert "is not on a colofs mount" in _fails("checkpoint", tmp_path)
    assert "no VM 'nosuch' in the colofs mount" in _fails("checkpoint", m.path("nosuch"))
    assert "no VM 'nosuch'" in _fails("status", m.mnt, "nosuch")
    assert "no disk 'zz' in VM 'vm1'" in _fails("status", m.mnt, "vm1/zz")
    assert "is the root of a colofs mount" in _fails("checkpoint", m.mnt)
    assert "is a VM directory" in _fails("status", m.path("vm1"))
    assert "is a VM directory" in _fails("create", m.path("vm1"), "vm1/d9", "--size", "1M")
    assert "already exists" in _fails("create", m.mnt, "vm1/d0", "--size", "4M")
    assert "multiple of 512" in _fails("create", m.mnt, "vm1/d1", "--size", "1000")
    assert "no such image" in _fails("import", m.mnt, "vm1/d2", "--from", tmp_path / "none.raw")
    assert "failover of a primary" not in _fails("checkpoint", m.path("vm1"), "--seq", "5")
    mountctl("failover", m.path("vm1"))
    assert "failover of a primary" in _fails("failover", m.path("vm1"))
    # Usage errors exit with 2.
    assert "not a size" in _fails("create", m.mnt, "vm1/d3", "--size", "lots", code=2)
    assert "is not VM/DISK" in _fails("create", m.mnt, "justadisk", "--size", "1M", code=2)
    _fails("checkpoint", code=2)
    _fails("frobnicate", code=2)


def test_mount_refusals(mounts, tmp_path):
    m = mounts()
    other = mounts(name="other", mount=False)
    err = _fails("mount", "--role", "secondary", "--store", m.store, other.mnt)
    assert f"store {m.store} is already mounted on {m.mnt}" in err
    assert "already a mount point" in _fails("mount", "--role", "secondary", "--store", other.store, m.mnt)
    assert "does not exist" in _fails("mount", "--role", "primary", "--store", other.store, tmp_path / "nope")
    afile = tmp_path / "afile"
    afile.write_text("")
    assert "not a directory" in _fails("mount", "--role", "primary", "--store", other.store, afile)
    key = tmp_path / "key"
    key.write_text("secret\n")
    usage = [
        (["--role", "primary", "--listen", "0.0.0.0:7000", "--key-file", key], "--listen is for a secondary"),
        (["--role", "secondary", "--peer", "h:7000", "--key-file", key], "--peer is for a primary"),
        (["--role", "secondary", "--listen", "nohost", "--key-file", key], "is not HOST:PORT"),
        (["--role", "secondary", "--listen", "h:99999", "--key-file", key], "port '99999'"),
        (["--role", "secondary", "--listen", "10.1.2.3:7000"], "needs --key-file"),
        (["--role", "secondary", "--key-file", key], "only used with --listen or --peer"),
        (["--role", "secondary", "--listen", "h:7000", "--key-file", tmp_path / "nokey"], "--key-file"),
        (["--role", "tertiary"], "invalid choice"),
    ]
    for args, words in usage:
        assert words in _fails("mount", *args, "--store", other.store, other.mnt, code=2), args
    assert not other.store.exists(), "a refused mount must not create the store"
    # The daemon's own refusal comes back through the readiness pipe.
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "somefile").write_text("not a store")
    err = _fails("mount", "--role", "primary", "--store", junk, other.mnt)
    assert "cannot open store" in err and "non-empty directory" in err
    assert not os.path.ismount(other.mnt)


def test_replication_options_are_validated_and_shown(mounts, tmp_path):
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    sec = mounts(mount=False)
    err = _fails("mount", "--role", "secondary", "--store", sec.store, "--listen", "127.0.0.1:7788",
                 "--key-file", key, sec.mnt)
    assert "must not be accessible by group or others" in err and not os.path.ismount(sec.mnt)
    key.chmod(0o600)
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    sec.mount("--listen", f"[::1]:{port}", "--key-file", str(key))
    rep = sec.status()["replication"]
    assert rep["state"] == "running" and rep["role"] == "secondary"
    assert rep["listen"] == f"[::1]:{port}" and rep["port"] == port and rep["key_file"] == str(key)
    pri = mounts("primary", name="p", mount=False)
    pri.mount("--peer", "backup.example:7788", "--key-file", str(key))
    assert pri.status()["replication"]["peer"] == "backup.example:7788"
    assert "replication:running role:primary peer:backup.example:7788" in mountctl("status", pri.mnt).stdout


def test_umount_busy_lazy_and_sigterm(mounts):
    m = mounts()
    mountctl("create", m.mnt, "vm1/d0", "--size", "4M")
    f = m.path("vm1", "d0.raw")
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"written while busy", 0)
        assert "is busy" in _fails("umount", m.mnt)
        # SIGTERM while busy: detached lazily, the daemon serves the open file until it is closed.
        os.kill(m.pid, signal.SIGTERM)
        wait_until_sync(lambda: not os.path.ismount(m.mnt), what="the lazy detach after SIGTERM")
        os.pwrite(fd, b"after the detach", 4096)
        assert os.pread(fd, 18, 0) == b"written while busy"
    finally:
        os.close(fd)
    m.mounted = False
    Mount._wait_gone(m.pid)
    assert _lock_state(m)["state"] == "closed"
    m.mount()
    with open(f, "rb") as r:
        assert r.read(18) == b"written while busy"
        r.seek(4096)
        assert r.read(16) == b"after the detach"
    # SIGTERM when idle: unmount, close, exit.
    os.kill(m.pid, signal.SIGTERM)
    Mount._wait_gone(m.pid)
    m.mounted = False
    assert not os.path.ismount(m.mnt) and _lock_state(m)["state"] == "closed"
    m.mount()
    out = mountctl("umount", "--lazy", m.mnt).stdout
    m.mounted = False
    assert "detached" in out
    Mount._wait_gone(m.pid)
    assert "is not on a colofs mount" in _fails("umount", m.mnt)


def test_foreground_mount_stops_on_sigint(mounts):
    m = mounts(mount=False)
    proc = subprocess.Popen([*MOUNTCTL, "mount", *with_workers(["--foreground", "--role", "primary", "--store",
                                                                 str(m.store), str(m.mnt)])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"mounted {m.store} on {m.mnt}")
        m.pids.append(proc.pid)
        m.mounted = True
        mountctl("create", m.mnt, "vm1/d0", "--size", "1M")
        with open(m.path("vm1", "d0.raw"), "r+b") as f:
            f.write(b"foreground")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None and "closed cleanly" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    m.mounted = False
    assert not os.path.ismount(m.mnt)
    m.mount()
    with open(m.path("vm1", "d0.raw"), "rb") as r:
        assert r.read(10) == b"foreground"


def test_peer_and_replication_lines():
    """What ``mountctl status`` prints of replication, for each state a VM's peer can be in."""
    from mountctl.render import render_peer, render_replication

    resync = {"active": True, "percent": 42.5, "blocks_checked": 425, "blocks_total": 1000,
              "bytes_sent": 3 * MiB, "full": True}
    line = render_peer({"state": "resyncing", "mode": "sync", "resync": resync, "acked_seq": 7,
                        "backlog_writes": 3, "backlog_bytes": 8192, "degraded": True, "lz4_ratio": 0.51234})
    assert "peer:resyncing mode:sync progress:42.5% (425/1000 blocks, 3MiB sent, full)" in line
    assert "acked:7 backlog:3 writes/8KiB DEGRADED lz4:0.512" in line
    line = render_peer({"state": "connected", "mode": "sync", "acked_seq": 7, "receipts": True, "received_seq": 9})
    assert line == "  peer:connected mode:sync acked:7 received:9"
    line = render_peer({"state": "refused", "reason": "the secondary refused VM vm1: failed over"})
    assert line == "  peer:refused reason:the secondary refused VM vm1: failed over"
    assert render_peer({"state": "connected", "reason": "old"}) == "  peer:connected"
    assert render_peer("not configured") == "  peer:not configured"
    rep = render_replication({"state": "running", "role": "secondary", "listen": "0.0.0.0:7788", "port": 7788,
                              "authenticated": True, "connections": 4, "sessions": 1, "refused": 2,
                              "last_refusal": "10.0.0.9:5000: wrong key"})
    assert rep == ("  replication:running role:secondary listen:0.0.0.0:7788 port:7788 connections:4 "
                   "sessions:1 refused:2 last-refusal:10.0.0.9:5000: wrong key")
    rep = render_replication({"state": "running", "role": "primary", "peer": "b:7788", "authenticated": False,
                              "vms": 2, "connected": 1, "connecting": 1, "resyncing": 0, "refused": 0})
    assert rep.endswith("peer:b:7788 unauthenticated(loopback) vms:2 connected:1 connecting:1 resyncing:0 refused:0")
