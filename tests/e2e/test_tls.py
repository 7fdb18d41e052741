"""Real mounts with --tls-cert/--tls-key/--tls-ca: replicated and checkpointed over TLS; a primary
without TLS is refused by a TLS secondary, with the reason in both statuses; a key file owned by
another user stops the mount."""

from __future__ import annotations

import os

import pytest

from tests.e2e.pair import MiB, Pair, direct_pwrite, read_file
from tests.fs.mounts import mountctl
from tests.pki import HAVE_OPENSSL, make_pki, tls_options
from tests.waiting import wait_until_sync

pytestmark = [pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
              pytest.mark.skipif(not HAVE_OPENSSL, reason="needs the openssl command")]


def test_tls_pair_replicates_and_checkpoints(pair: Pair, tmp_path) -> None:
    pki = make_pki(tmp_path / "pki")
    pair.sec.mount("--listen", f"127.0.0.1:{pair.port}", "--key-file", str(pair.key),
                   *tls_options(pki, "secondary"))
    pair.pri.mount("--peer", f"127.0.0.1:{pair.port}", "--key-file", str(pair.key), *tls_options(pki, "primary"))
    assert pair.status(pair.pri)["replication"]["tls"] is True
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", "4M")
    pair.wait_disk("vm1", "d0", 4 * MiB)
    data = os.urandom(MiB)
    direct_pwrite(pair.pfile(), MiB, data)
    pair.checkpoint()
    assert read_file(pair.sfile()) == read_file(pair.pfile())
    assert read_file(pair.sfile())[MiB : 2 * MiB] == data


def test_plain_primary_refused_by_a_tls_secondary(pair: Pair, tmp_path) -> None:
    pki = make_pki(tmp_path / "pki")
    pair.sec.mount("--listen", f"127.0.0.1:{pair.port}", "--key-file", str(pair.key),
                   *tls_options(pki, "secondary"))
    pair.mount_primary()
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", "4M")
    wait_until_sync(lambda: "does not speak TLS" in (pair.sec.status()["replication"].get("last_refusal") or ""),
                    what="the secondary to refuse the plain primary")
    wait_until_sync(lambda: pair.peer(pair.pri).get("reason"), what="the primary to say why")
    # The primary keeps reconnecting; with a worker per VM each attempt's route preamble names vm1, and
    # the secondary refuses it from its first bytes (not TLS) before starting a worker for vm1.
    wait_until_sync(lambda: pair.sec.status()["replication"]["refused"] >= 3, what="three attempts refused")
    assert "VM vm1: worker started" not in pair.sec.log()
    assert "vm1" not in pair.sec.status()["vms"]
    assert not (pair.sec.store / "vm1").exists()
    assert [p.name for p in pair.sec.store.iterdir() if p.is_dir() and not p.name.startswith(".")] == []


def test_tls_options_checked_before_the_mount(pair: Pair, tmp_path) -> None:
    pki = make_pki(tmp_path / "pki")
    opts = tls_options(pki, "secondary")
    res = mountctl("mount", "--role", "secondary", "--store", pair.base / "x", "--listen", "127.0.0.1:7788",
                   *opts[:4], pair.base, check=False)
    assert res.returncode == 2 and "missing --tls-ca" in res.stderr
    res = mountctl("mount", "--role", "secondary", "--store", pair.base / "x", "--listen", "127.0.0.1:7788",
                   "--tls-cert", str(pki / "primary.pem"), "--tls-key", str(pki / "secondary.key"),
                   "--tls-ca", str(pki / "ca.pem"), pair.base, check=False)
    assert res.returncode == 2 and "--tls-key" in res.stderr


def test_key_file_owned_by_another_user_stops_the_mount(pair: Pair) -> None:
    """Its owner could read it or loosen its mode at any time: the daemon refuses it, saying whose it is."""
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    os.chown(pair.key, 65534, -1)
    res = mountctl("mount", "--role", "secondary", "--store", pair.sec.store, "--listen", f"127.0.0.1:{pair.port}",
                   "--key-file", str(pair.key), pair.sec.mnt, check=False)
    assert res.returncode == 1, res
    assert "owned by uid 65534, not by this daemon's uid 0" in res.stderr
    assert not os.path.ismount(pair.sec.mnt)
