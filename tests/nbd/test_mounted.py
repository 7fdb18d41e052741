"""NBD on a real mount, driven by real tools: qemu-img, qemu-io, nbdinfo and nbdcopy.

Each test mounts a store with ``--nbd-socket`` and checks what the tools see
against the FUSE files of the same disks: the same bytes, writes seen both
ways, snapshots read-only and frozen.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from mountctl.pair import free_port, write_key
from tests.fs.mounts import Mount, mountctl, run
from tests.nbd.rawclient import RawClient
from tests.pki import HAVE_OPENSSL
from tests.waiting import wait_until, wait_until_sync

MiB = 1 << 20


def uri(m: Mount, export: str) -> str:
    return f"nbd+unix:///{export}?socket={m.sock}"  # type: ignore[attr-defined]


def qemu_io(m: Mount, export: str, *cmds: str, check: bool = True):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return run(*args, uri(m, export), check=check)


def test_socket_is_private_and_disk_export_matches_the_fuse_file(mounted, tmp_path) -> None:
    m = mounted("primary")
    st = os.stat(m.sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    mountctl("create", m.mnt, "vm1/d0", "--size", "32M")
    out = qemu_io(m, "vm1/d0", "write -P 0xab 1M 2M", "write -z 8M 64k", "read -P 0xab 1M 2M").stdout
    assert "wrote 2097152/2097152 bytes" in out and "read 2097152/2097152 bytes" in out
    with open(m.path("vm1", "d0.raw"), "rb") as f:  # written over NBD, read through FUSE
        f.seek(MiB)
        assert f.read(2 * MiB) == b"\xab" * (2 * MiB)
    info = json.loads(run("qemu-img", "info", "--output=json", uri(m, "vm1/d0")).stdout)
    assert info["virtual-size"] == 32 * MiB
    copy = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-O", "raw", uri(m, "vm1/d0"), copy)
    assert copy.read_bytes() == m.path("vm1", "d0.raw").read_bytes()
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri(m, "vm1/d0"), m.path("vm1", "d0.raw"))


async def test_an_acknowledged_nbd_write_replaces_pages_the_kernel_caches(mounted) -> None:
    m = mounted("primary")
    mountctl("create", m.mnt, "vm1/d0", "--size", "16M")
    c = await RawClient.connect_unix(str(m.sock))
    assert (await c.go("vm1/d0"))[-1][0] == 1
    fd = os.open(m.path("vm1", "d0.raw"), os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 4096) == bytes(4096)  # cached by the kernel now, the connection open
        assert (await c.write(0, b"\x5a" * 65536)).error == 0
        assert os.pread(fd, 4096, 4096) == b"\x5a" * 4096
    finally:
        os.close(fd)
    # Pages stay cached after a close (keep_cache): a later open must not see them either.
    for pattern in (b"\x6b", b"\x7c"):
        assert (await c.write(0, pattern * 65536)).error == 0
        with open(m.path("vm1", "d0.raw"), "rb") as f:
            assert f.read(8192) == pattern * 8192
    await c.disconnect()


async def test_a_snapshot_in_use_over_nbd_cannot_be_deleted(mounted) -> None:
    m = mounted("primary")
    mountctl("create", m.mnt, "vm1/d0", "--size", "4M")
    mountctl("snapshot", f"{m.mnt}/vm1/d0", "s1")
    c = await RawClient.connect_unix(str(m.sock))
    assert (await c.go("vm1/d0@s1"))[-1][0] == 1
    res = mountctl("snapshot", "--delete", f"{m.mnt}/vm1/d0", "s1", check=False)
    assert res.returncode != 0 and "open" in res.stderr
    assert await c.read(0, 4096) == bytes(4096)
    await c.disconnect()
    await c.close()
    await wait_until(lambda: mountctl("snapshot", "--delete", f"{m.mnt}/vm1/d0", "s1", check=False).returncode == 0,
                     what="the snapshot deleted once the NBD client left")


def test_nbd_and_fuse_see_each_others_completed_writes(mounted) -> None:
    m = mounted("primary")
    mountctl("create", m.mnt, "vm1/d0", "--size", "16M")
    path = m.path("vm1", "d0.raw")
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pread(fd, 4096, 0) == bytes(4096)  # the kernel now caches this page
        qemu_io(m, "vm1/d0", "write -P 0x5a 0 64k")
        assert os.pread(fd, 4096, 0) == b"\x5a" * 4096  # not the stale cached page
        os.pwrite(fd, b"\xc3" * 4096, 8 * MiB)  # buffered in the kernel, no fsync
        out = qemu_io(m, "vm1/d0", "read -P 0xc3 8M 4k").stdout
        assert "read 4096/4096 bytes" in out and "Pattern verification failed" not in out
    finally:
        os.close(fd)


def test_snapshot_export_with_nbdinfo_and_nbdcopy(mounted, tmp_path) -> None:
    m = mounted("primary")
    mountctl("create", m.mnt, "vm1/d0", "--size", "8M")
    qemu_io(m, "vm1/d0", "write -P 0x11 0 1M")
    mountctl("snapshot", f"{m.mnt}/vm1/d0", "nightly")
    qemu_io(m, "vm1/d0", "write -P 0x22 0 1M")
    snap = uri(m, "vm1/d0@nightly")
    info = json.loads(run("nbdinfo", "--json", snap).stdout)
    ex = info["exports"][0]
    assert ex["export-size"] == 8 * MiB and ex["is_read_only"] is True
    assert ex["can_zero"] is False and ex["contexts"] == ["base:allocation"]
    assert ex["block_size_maximum"] == 32 * MiB
    listed = run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={m.sock}").stdout
    assert {e["export-name"] for e in json.loads(listed)["exports"]} == {"vm1/d0", "vm1/d0@nightly"}
    alloc = run("nbdinfo", "--map", uri(m, "vm1/d0")).stdout
    assert "data" in alloc and "hole" in alloc  # 1M written, the rest a hole in base
    backup = tmp_path / "nightly.raw"
    run("nbdcopy", snap, backup)
    assert backup.read_bytes() == b"\x11" * MiB + bytes(7 * MiB)
    assert backup.read_bytes() == m.path("vm1", "d0@nightly.raw").read_bytes()
    disk_copy = tmp_path / "disk.raw"
    run("nbdcopy", uri(m, "vm1/d0"), disk_copy)
    assert disk_copy.read_bytes()[:MiB] == b"\x22" * MiB
    refused = qemu_io(m, "vm1/d0@nightly", "write -P 0x33 0 4k", check=False)
    assert "wrote" not in refused.stdout
    assert m.path("vm1", "d0@nightly.raw").read_bytes()[:MiB] == b"\x11" * MiB


def test_clone_export_is_writable(mounted) -> None:
    m = mounted("primary")
    mountctl("create", m.mnt, "vm1/d0", "--size", "8M")
    qemu_io(m, "vm1/d0", "write -P 0x11 0 64k")
    mountctl("clone", f"{m.mnt}/vm1/d0", "test")
    qemu_io(m, "vm1/d0@test", "write -P 0x44 0 4k")
    assert m.path("vm1", "d0@test.raw").read_bytes()[:8192] == b"\x44" * 4096 + b"\x11" * 4096
    assert m.path("vm1", "d0.raw").read_bytes()[:4096] == b"\x11" * 4096


def test_a_stale_socket_is_replaced_and_tcp_needs_a_key(mounted, tmp_path) -> None:
    m = mounted("secondary")
    m.umount()
    assert not os.path.exists(m.sock)  # removed at unmount
    res = mountctl("mount", "--role", "secondary", "--store", m.store, "--nbd-listen", "127.0.0.1:10809",
                   m.mnt, check=False)
    assert res.returncode != 0 and "--key-file" in res.stderr
    blocker = tmp_path / "not-a-socket"
    blocker.write_text("x")
    res = mountctl("mount", "--role", "secondary", "--store", m.store, "--nbd-socket", blocker, m.mnt,
                   check=False)
    assert res.returncode != 0 and "not a socket" in res.stderr
    assert not os.path.ismount(m.mnt)


def _pki(d: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 (clients check it) and a client one, laid out for libnbd and QEMU."""
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("openssl", "req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca-cert.pem", "-days", "30",
        "-subj", "/CN=nbd-test-ca")
    for name, extra in (("server", ["-addext", "subjectAltName=IP:127.0.0.1"]), ("client", [])):
        run("openssl", "req", *ec, "-keyout", d / f"{name}-key.pem", "-out", d / f"{name}.csr",
            "-subj", f"/CN={name}", *extra)
        run("openssl", "x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca-cert.pem", "-CAkey", d / "ca.key",
            "-CAcreateserial", "-out", d / f"{name}-cert.pem", "-days", "30", "-copy_extensions", "copy")
        os.chmod(d / f"{name}-key.pem", 0o600)
    return d


@pytest.mark.skipif(not HAVE_OPENSSL, reason="needs the openssl command for test certificates")
def test_tcp_with_tls_serves_nbdinfo_and_qemu_and_refuses_plain_clients(mounted, tmp_path) -> None:
    pki = _pki(tmp_path / "pki")
    key = write_key(tmp_path / "key")
    port = free_port()
    # A TLS session cannot be handed from the supervisor to a VM's worker: one process serves it all.
    m = mounted("secondary", "--single-process", "--nbd-listen", f"127.0.0.1:{port}", "--key-file", str(key),
                "--tls-cert", str(pki / "server-cert.pem"), "--tls-key", str(pki / "server-key.pem"),
                "--tls-ca", str(pki / "ca-cert.pem"))
    mountctl("create", m.mnt, "vm1/d0", "--size", "8M")
    qemu_io(m, "vm1/d0", "write -P 0x7e 0 64k")
    out = run("nbdinfo", "--json", f"nbds://127.0.0.1:{port}/vm1/d0?tls-certificates={pki}").stdout
    assert json.loads(out)["exports"][0]["export-size"] == 8 * MiB
    plain = run("nbdinfo", f"nbd://127.0.0.1:{port}/vm1/d0", check=False)
    assert plain.returncode != 0  # no TLS, no export
    res = run("qemu-io", "--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=client", "--image-opts",
              f"driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,"
              f"file.server.port={port},file.export=vm1/d0,file.tls-creds=tls0",
              "-c", "read -P 0x7e 0 64k")
    assert "read 65536/65536 bytes" in res.stdout and "failed" not in res.stdout
    assert "TLS on, client certificate verified" in m.log()


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="needs qemu-storage-daemon")
def test_an_unmodified_qemu_quorum_primary_feeds_the_secondary(mounted, tmp_path) -> None:
    """QEMU's COLO disk layout: a quorum of the primary's raw file and an NBD child on the secondary."""
    m = mounted("secondary")
    mountctl("create", m.mnt, "vm1/d0", "--size", "16M")
    local = tmp_path / "primary.raw"
    local.write_bytes(bytes(16 * MiB))
    psock = tmp_path / "primary.sock"
    qsd = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=pfile,filename={local}",
         "--blockdev", "driver=raw,node-name=plocal,file=pfile",
         "--blockdev", f"driver=nbd,node-name=rnbd,server.type=unix,server.path={m.sock},export=vm1/d0:ingest",
         "--blockdev", "driver=raw,node-name=rraw,file=rnbd",
         "--blockdev", "driver=quorum,node-name=colo,children.0=plocal,children.1=rraw,vote-threshold=1,"
                       "read-pattern=fifo",
         "--nbd-server", f"addr.type=unix,addr.path={psock}",
         "--export", "type=nbd,id=e0,node-name=colo,writable=on,name=disk"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_sync(lambda: psock.exists() or qsd.poll() is not None, what="qemu-storage-daemon's socket")
        assert qsd.poll() is None, qsd.stdout.read() if qsd.stdout else ""
        primary = f"nbd+unix:///disk?socket={psock}"
        svm = m.path("vm1", "d0.raw")
        for rnd, pattern in enumerate((0x61, 0x62)):
            run("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {rnd}M 1M", "-c", f"write -P {pattern} 9M 64k",
                primary)
            # Before the checkpoint the secondary VM sees the last checkpoint's image, not the new writes.
            assert svm.read_bytes()[rnd * MiB : rnd * MiB + 4096] == bytes(4096)
            with open(svm, "r+b") as f:  # the secondary VM's own write, never seen by the primary
                f.seek(12 * MiB)
                f.write(b"S" * 4096)
            # The primary is drained (qemu-io returned): checkpoint locally on the secondary.
            mountctl("checkpoint", f"{m.mnt}/vm1")
            assert svm.read_bytes() == local.read_bytes()
        assert local.read_bytes()[12 * MiB : 12 * MiB + 4096] == bytes(4096)
    finally:
        qsd.terminate()
        try:
            qsd.wait(timeout=30)
        except subprocess.TimeoutExpired:
            qsd.kill()
            qsd.wait(timeout=30)
