"""``mount -t fuse.colofs``, ``/etc/fstab`` (``mount -T FILE -a``) and plain ``umount`` on real stores.

The helper is reached both ways mount(8) has: ``/sbin/mount.fuse.colofs``
directly, and, without it, ``mount.fuse3`` running ``colofs``. After a plain
``umount`` the daemon must end as ``mountctl umount`` leaves it: exit status 0
(seen by running mount under a subreaper), the store's lock released, the
state recorded as closed cleanly, and a remount serving the same disks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from colofs.fs.config import LOCK_NAME, LOG_NAME, add_mount_arguments
from colofs.fs.lock import holder, last_state
from mountctl.mounthelper import OptionError, main, mount_args, mount_options
from mountctl.pair import free_port, single_process_forced, write_key
from tests.fs.mounts import Mount, mountctl, run
from tests.mountable import mount_skip_reason
from tests.ops.sysfiles import BIN, Reaped, linked, system_lock
from tests.waiting import wait_until_sync

SBIN_HELPER = "/sbin/mount.fuse.colofs"
SBIN_UMOUNT = "/sbin/umount.fuse.colofs"  # umount(8)'s helper: a mount with a worker per VM needs it
PATH_PROGRAM = "/usr/local/bin/colofs"  # mount.fuse3 runs `colofs` from the default PATH
MiB = 1 << 20

needs_mount = pytest.mark.skipif(mount_skip_reason(("fusermount3", "mount", "umount")) is not None,
                                 reason=f"mount test {mount_skip_reason(('fusermount3', 'mount', 'umount'))}")


# -- the option mapping (no mount) -------------------------------------------------------------


def test_options_map_to_mountctl_flags_and_generic_ones_are_ignored():
    flags = mount_args("rw,role=secondary,listen=0.0.0.0:7788,key_file=/etc/colofs.key,allow_other,"
                       "_netdev,nofail,defaults,noauto,dev,suid,x-systemd.requires=network-online.target,"
                       "subtype=colofs")
    assert flags == ["--role", "secondary", "--listen", "0.0.0.0:7788", "--key-file", "/etc/colofs.key",
                     "--allow-other"]
    assert mount_args("role=primary,peer=[::1]:7788,key-file=/k,debug") == [
        "--role", "primary", "--peer", "[::1]:7788", "--key-file", "/k", "--debug"]


def test_every_option_the_daemon_takes_is_an_o_option_of_the_same_name():
    daemon = argparse.ArgumentParser()
    add_mount_arguments(daemon)
    taken = [o for a in daemon._actions for o in a.option_strings if o.startswith("--") and o not in ("--store", "--help")]
    assert "--metrics" in taken and "--nbd-listen" in taken and "--tls-ca" in taken
    for flag in taken:
        name = flag[2:].replace("-", "_")
        if flag == "--role":
            continue
        action = next(a for a in daemon._actions if flag in a.option_strings)
        opt = name if action.nargs == 0 else f"{name}=x"
        got = mount_args(f"role=secondary,{opt}")
        assert got[2:] == ([flag] if action.nargs == 0 else [flag, "x"]), (opt, got)


def test_the_readme_lists_every_option_the_helper_takes():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    start = readme.index("The options are `mountctl mount`'s")
    listed = readme[start : readme.index("Options that mean", start)]
    valued, flags = mount_options()
    missing = [f"{n}=" for n in valued if f"`{n}=`" not in listed] + [n for n in flags if f"`{n}`" not in listed]
    assert not missing, f"README's mount helper section does not list {missing}"


def test_metrics_and_the_other_daemon_options_map_in_either_spelling():
    assert mount_args("role=secondary,metrics=127.0.0.1:9464,nbd-listen=0.0.0.0:10809,nbd_socket=/run/c.sock,"
                      "tls_cert=/c,tls-key=/k,tls_ca=/ca,log_file=/l,timeout=30,_netdev") == [
        "--role", "secondary", "--metrics", "127.0.0.1:9464", "--nbd-listen", "0.0.0.0:10809",
        "--nbd-socket", "/run/c.sock", "--tls-cert", "/c", "--tls-key", "/k", "--tls-ca", "/ca",
        "--log-file", "/l", "--timeout", "30"]


def test_options_the_helper_cannot_pass_on_are_refused():
    for opt in ("store=/x", "foreground", "help"):
        with pytest.raises(OptionError, match="unknown option"):
            mount_args(f"role=secondary,{opt}")


def test_a_bad_metrics_value_is_a_usage_error_before_anything_is_mounted(tmp_path, capsys):
    assert main([str(tmp_path / "store"), str(tmp_path), "-f", "-o", "role=secondary,metrics=nohost"]) == 1
    assert "--metrics" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
    assert main([str(tmp_path / "store"), str(tmp_path), "-f", "-o", "role=secondary,metrics"]) == 1
    assert main([str(tmp_path / "store"), str(tmp_path), "-f", "-o", "role=secondary,metrics=127.0.0.1:9464"]) == 0


@pytest.mark.parametrize(("options", "message"), [
    ("listen=0.0.0.0:7788", "role=primary or role=secondary is required"),
    ("role=secondary,bogus=1", "unknown option 'bogus=1'"),
    ("role=secondary,ro", "read-write"),
    ("role=secondary,listen", "listen: needs a value"),
    ("role=secondary,allow_other=1", "allow_other: takes no value"),
])
def test_bad_options_are_refused_with_the_option_named(options, message):
    with pytest.raises(OptionError, match=message):
        mount_args(options)


def test_sloppy_mount_skips_unknown_options():
    assert mount_args("role=secondary,bogus=1", sloppy=True) == ["--role", "secondary"]


# -- real mounts -------------------------------------------------------------------------------


@pytest.fixture
def helper() -> Iterator[str]:
    """``/sbin/mount.fuse.colofs`` and ``/sbin/umount.fuse.colofs`` present for the test (linked to this venv's)."""
    if not (BIN / "mount.fuse.colofs").exists() or not (BIN / "umount.fuse.colofs").exists():
        pytest.skip(f"the console scripts are not installed in {BIN} (make venv, or pip install -e .)")
    with system_lock(), linked(SBIN_HELPER, BIN / "mount.fuse.colofs") as link, \
            linked(SBIN_UMOUNT, BIN / "umount.fuse.colofs"):
        yield link


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[dict[str, Mount]]:
    made = {"s": Mount(tmp_path, "secondary", "s"), "p": Mount(tmp_path, "primary", "p")}
    try:
        yield made
    finally:
        for m in (made["p"], made["s"]):
            m.cleanup()


def _o(options: str) -> str:
    """``-o`` options, with ``single_process`` under ``COLOFS_TEST_WORKERS=0`` (as every harness mount gets it)."""
    chosen = {"workers", "single_process"} & set(options.split(","))  # a test that names its model keeps it
    return f"{options},single_process" if single_process_forced() and not chosen else options


def _mount_t(m: Mount, options: str) -> Reaped:
    """``mount -t fuse.colofs STORE MNT -o OPTIONS`` under a subreaper; the mount is then served."""
    r = Reaped("mount", "-t", "fuse.colofs", str(m.store), str(m.mnt), "-o", _o(options))
    assert r.rc == 0, r.out
    _adopt(m)
    return r


def _adopt(m: Mount) -> None:
    """Let ``Mount`` clean up a daemon that mount(8) started."""
    m.mounted = True
    m.pids.append(int(json.loads((m.store / LOCK_NAME).read_text())["pid"]))


def _status(m: Mount) -> dict:
    return json.loads(os.getxattr(m.mnt, "user.colofs.status"))


def _vm_status(m: Mount, vm: str = "vm1") -> dict:
    return json.loads(os.getxattr(m.mnt / vm, "user.colofs.status"))


def _findmnt(m: Mount) -> dict:
    out = run("findmnt", "-J", "-o", "SOURCE,FSTYPE,TARGET", "--mountpoint", str(m.mnt)).stdout
    return json.loads(out)["filesystems"][0]


def _umount_cleanly(m: Mount, reaped: Reaped | None, log: Path | None = None) -> None:
    """Plain ``umount``; then the daemon exits 0, lets go of the lock, and has said so."""
    pid = m.pid
    run("umount", str(m.mnt))
    m.mounted = False
    if reaped is not None:
        assert {"pid": pid, "status": 0} in reaped.exits(), "the daemon did not exit 0"
    wait_until_sync(lambda: holder(str(m.store / LOCK_NAME)) is None, 60, "the store's lock to be released")
    state = last_state(str(m.store / LOCK_NAME))
    assert state["state"] == "closed" and state["clean"] is True, state
    assert f"store {m.store} closed cleanly" in (log or m.store / LOG_NAME).read_text()


@needs_mount
def test_mount_t_pair_replicates_and_plain_umount_closes_cleanly(tmp_path, helper, mounts):
    key = write_key(tmp_path / "colofs.key")
    port = free_port()
    sec, pri = mounts["s"], mounts["p"]
    rs = _mount_t(sec, f"role=secondary,listen=127.0.0.1:{port},key_file={key},allow_other,_netdev,nofail")
    rp = _mount_t(pri, f"role=primary,peer=127.0.0.1:{port},key_file={key},_netdev,defaults")
    assert _findmnt(sec) == {"source": str(sec.store), "fstype": "fuse.colofs", "target": str(sec.mnt)}
    st = _status(sec)
    assert st["replication"]["role"] == "secondary" and st["replication"]["listen"] == f"127.0.0.1:{port}"
    assert "allow_other" in run("findmnt", "-n", "-o", "OPTIONS", str(sec.mnt)).stdout

    mountctl("create", pri.mnt, "vm1/d0", "--size", "4M")
    with open(pri.mnt / "vm1" / "d0.raw", "r+b") as f:
        f.write(b"\x5a" * MiB)
    wait_until_sync(lambda: _vm_status(sec)["last_applied"] >= _vm_status(pri)["last_applied"] > 0, 60,
                    "the secondary to catch up", catch=(OSError, KeyError))

    _umount_cleanly(pri, rp)
    _umount_cleanly(sec, rs)

    again = _mount_t(sec, f"role=secondary,listen=127.0.0.1:{port},key_file={key},_netdev")  # utab: umount's helper
    assert _vm_status(sec)["role"] == "secondary"
    _umount_cleanly(sec, again)


@needs_mount
def test_fstab_lines_mount_with_mount_a_and_a_second_mount_a_leaves_them(tmp_path, helper, mounts):
    key = write_key(tmp_path / "colofs.key")
    port = free_port()
    sec, pri = mounts["s"], mounts["p"]
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# colofs: the secondary listens, the primary sends to it\n"
        f"{sec.store} {sec.mnt} fuse.colofs "
        + _o(f"role=secondary,listen=127.0.0.1:{port},key_file={key},allow_other,_netdev,nofail") + " 0 0\n"
        f"{pri.store} {pri.mnt} fuse.colofs " + _o(f"role=primary,peer=127.0.0.1:{port},key_file={key},_netdev,nofail")
        + " 0 0\n"
    )
    r = Reaped("mount", "-T", str(fstab), "-a")
    assert r.rc == 0, r.out
    _adopt(sec)
    _adopt(pri)
    assert _status(sec)["replication"]["role"] == "secondary"
    assert _status(pri)["replication"]["role"] == "primary"
    wait_until_sync(lambda: _status(pri)["replication"].get("peer") == f"127.0.0.1:{port}", 60,
                    "the primary's peer", catch=(OSError, KeyError))

    again = subprocess.run(["mount", "-T", str(fstab), "-a", "-v"], capture_output=True, text=True, timeout=60,
                           check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already mounted") == 2, again.stdout
    assert holder(str(sec.store / LOCK_NAME))["pid"] == sec.pid  # the same daemons serve

    _umount_cleanly(pri, None)
    _umount_cleanly(sec, None)
    exits = r.exits()
    assert {"pid": sec.pid, "status": 0} in exits and {"pid": pri.pid, "status": 0} in exits, exits


@needs_mount
def test_without_the_sbin_helper_mount_fuse3_runs_colofs(tmp_path, mounts):
    sec = mounts["s"]
    with system_lock():
        if os.path.lexists(SBIN_HELPER):
            pytest.skip(f"{SBIN_HELPER} is installed here, so mount(8) never falls back to mount.fuse3")
        if not (BIN / "colofs").exists():
            pytest.skip(f"the console scripts are not installed in {BIN} (make venv, or pip install -e .)")
        with linked(PATH_PROGRAM, BIN / "colofs"), linked(SBIN_UMOUNT, BIN / "umount.fuse.colofs"):
            r = _mount_t(sec, "role=secondary,_netdev,nofail,allow_other")
            assert _findmnt(sec)["fstype"] == "fuse.colofs"
            assert _status(sec)["replication"]["state"] == "not configured"
            _umount_cleanly(sec, r)


@needs_mount
def test_a_bad_option_fails_the_mount_naming_it(tmp_path, helper, mounts):
    sec = mounts["s"]
    res = subprocess.run(["mount", "-t", "fuse.colofs", str(sec.store), str(sec.mnt), "-o", "role=secondary,bogus=1"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode != 0
    assert "unknown option 'bogus=1'" in res.stderr
    assert not os.path.ismount(sec.mnt) and not (sec.store / LOCK_NAME).exists()


def _scrape(port: int) -> dict[str, str]:
    """Metric family name -> type, parsed by prometheus_client (a malformed line raises)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {fam.name: fam.type for fam in text_string_to_metric_families(text)}


@needs_mount
def test_metrics_option_from_mount_t_and_from_fstab_serves_prometheus(tmp_path, helper, mounts):
    sec, pri = mounts["s"], mounts["p"]
    sport, pport = free_port(), free_port()
    log = tmp_path / "secondary.log"
    r = _mount_t(sec, f"role=secondary,metrics=127.0.0.1:{sport},log_file={log},_netdev,nofail")
    fams = _scrape(sport)
    assert fams.get("colofs_replication_state") == "gauge" and fams.get("colofs_checkpoints") == "counter", fams
    assert f"store {sec.store}" in log.read_text()  # log_file= reached the daemon too
    _umount_cleanly(sec, r, log=log)

    fstab = tmp_path / "fstab"
    fstab.write_text(f"{pri.store} {pri.mnt} fuse.colofs "
                     + _o(f"role=primary,metrics=127.0.0.1:{pport},_netdev,nofail,x-systemd.after=network-online.target")
                     + " 0 0\n")
    rf = Reaped("mount", "-T", str(fstab), "-a")
    assert rf.rc == 0, rf.out
    _adopt(pri)
    assert _scrape(pport).get("colofs_reads") == "counter"
    _umount_cleanly(pri, rf)


@needs_mount
def test_plain_umount_of_a_mount_with_a_worker_per_vm_closes_every_vm(tmp_path, helper, mounts):
    """The VM directories are mounts of their own: without the umount helper this is EBUSY.

    umount(8) looks for the helper by the type mountinfo gives (``fuse.colofs``) when
    the mount has an entry in utab, as an fstab line with ``_netdev`` gives it.
    """
    sec = mounts["s"]
    r = _mount_t(sec, "role=secondary,workers,_netdev")
    for n in range(2):
        mountctl("create", sec.mnt, f"vm{n}/d0", "--size", "1M")
    assert os.path.ismount(sec.mnt / "vm0") and os.path.ismount(sec.mnt / "vm1")
    _umount_cleanly(sec, r)
    assert not os.path.ismount(sec.mnt / "vm0") and not os.path.ismount(sec.mnt)
    log = (sec.store / LOG_NAME).read_text()
    assert "worker for VM vm0 stopped cleanly" in log and "worker for VM vm1 stopped cleanly" in log, log[-3000:]


@needs_mount
def test_umount_of_one_vm_stops_that_vm_alone_and_the_helper_refuses_a_plain_directory(tmp_path, helper, mounts):
    sec = mounts["s"]
    r = _mount_t(sec, "role=secondary,workers,_netdev")
    for n in range(2):
        mountctl("create", sec.mnt, f"vm{n}/d0", "--size", "1M")
    run("umount", str(sec.mnt / "vm0"))
    wait_until_sync(lambda: _vm_status(sec, "vm0")["worker"]["state"] == "stopped", 60, "vm0's worker stopped",
                    catch=(OSError, KeyError, ValueError))
    assert not os.path.ismount(sec.mnt / "vm0")
    with open(sec.mnt / "vm1" / "d0.raw", "r+b") as f:  # the other VM still serves
        f.write(b"\x11" * 4096)
    assert "restarting it" not in (sec.store / LOG_NAME).read_text()
    res = subprocess.run([SBIN_UMOUNT, str(sec.mnt / "vm0")], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 32 and "not a colofs mountpoint" in res.stderr, res
    _umount_cleanly(sec, r)
