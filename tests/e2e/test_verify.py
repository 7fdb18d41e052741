"""``mountctl verify`` on a mounted pair: bit rot found exactly and repaired, fio during the pass, a cut.

The secondary's ``base.raw`` is damaged behind colofs's back between
checkpoints (a byte inverted per block, synced, and the file's pages dropped
from the page cache so the daemon reads what is on the device).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.pair import Pair
from tests.fs.mounts import MOUNTCTL, TIMEOUT, mountctl
from tests.waiting import wait_until_sync

SIZE = 16 << 20
BS = 4096
FLIPPED = [2, 1000, 1001, 3000]  # 3000 lies past the data: a hole on both sides until the flip


def _setup(pair: Pair, *, budget=None) -> None:
    pair.start(budget=budget)
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", str(SIZE))
    pair.wait_disk("vm1", "d0", SIZE)
    rng = random.Random(3)
    with open(pair.pfile(), "r+b") as f:
        f.write(rng.randbytes(SIZE // 2))
    pair.checkpoint()
    pair.wait_caught_up()


def _flip(pair: Pair, blocks: list[int]) -> None:
    path = pair.sec.store / "vm1" / "d0" / "base.raw"
    fd = os.open(path, os.O_RDWR)
    try:
        for b in blocks:
            off = b * BS + 333
            old = os.pread(fd, 1, off) or b"\0"
            os.pwrite(fd, bytes([old[0] ^ 0xA5]), off)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _report(pair: Pair) -> dict[str, Any]:
    return json.loads(os.getxattr(pair.pri.path("vm1"), "user.colofs.verify"))


def _verify(pair: Pair, *args: str) -> tuple[int, dict[str, Any]]:
    res = mountctl("verify", "--json", pair.pri.path("vm1"), *args, check=False, timeout=TIMEOUT)
    assert res.returncode in (0, 1), res.stdout + res.stderr
    return res.returncode, json.loads(res.stdout)


def _ranges(rep: dict[str, Any]) -> list[tuple[int, int]]:
    return [(r["first_block"], r["blocks"]) for r in rep["differing"]]


def test_verify_finds_flipped_blocks_and_resync_repairs_them(pair: Pair) -> None:
    _setup(pair)
    refused = mountctl("verify", pair.sec.path("vm1"), check=False)
    assert refused.returncode == 1 and "run the verify on its primary" in refused.stderr, refused.stderr
    code, clean = _verify(pair)
    assert (code, clean["blocks_differing"], clean["blocks_compared"]) == (0, 0, SIZE // BS)

    _flip(pair, FLIPPED)
    code, found = _verify(pair)
    assert code == 1 and found["state"] == "done"
    assert _ranges(found) == [(2, 1), (1000, 2), (3000, 1)]
    assert found["blocks_differing"] == len(FLIPPED) and found["blocks_unverified"] == 0
    # The report stays in the VM's status until the next verify.
    st = pair.vm_status(pair.pri)
    assert st is not None and st["verify"]["id"] == found["id"] and st["verify"]["blocks_differing"] == 4
    assert "verify:done" in mountctl("status", pair.pri.mnt, "vm1").stdout

    proc = subprocess.Popen([*MOUNTCTL, "verify", "--json", "--resync", str(pair.pri.path("vm1"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The final pass needs a checkpoint after the resync: the test is the one taking checkpoints.
        wait_until_sync(lambda: _report(pair).get("id") != found["id"]
                        and _report(pair).get("phase") == "waiting for a checkpoint",
                        what="the verify to resync and wait for a checkpoint")
        pair.checkpoint()
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    fixed = json.loads(out)
    assert fixed["resync"]["repaired"] == len(FLIPPED) and fixed["resync"]["still_differing"] == 0
    assert [(r["first_block"], r["blocks"]) for r in fixed["resync"]["ranges"]] == [(2, 1), (1000, 2), (3000, 1)]
    assert "differing" in err or "%" in err  # progress went to stderr while it ran

    pair.checkpoint()
    code, final = _verify(pair)
    assert (code, final["blocks_differing"], final["blocks_compared"]) == (0, 0, SIZE // BS)
    with open(pair.pfile(), "rb") as p, open(pair.sfile(), "rb") as s:
        assert p.read() == s.read()


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_verify_during_fio_writes_reports_no_differences(pair: Pair, tmp_path: Path) -> None:
    _setup(pair)
    # runtime only bounds a run whose stop never came; the test stops fio itself
    fio = subprocess.Popen(
        ["fio", "--output-format=terse", "--name=w", "--ioengine=psync", "--rw=randwrite", "--bsrange=4k-64k",
         "--size=16M", "--time_based", "--runtime=600", f"--filename={pair.pfile()}", "--fallocate=none",
         "--allow_file_create=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Slow enough that fio writes all over the disk while the pass goes; checkpoints between.
        mountctl("verify", "--no-wait", "--rate", "8", pair.pri.path("vm1"))
        seen = 0
        while _report(pair).get("state") == "running":
            assert fio.poll() is None, f"fio ended early: {fio.stderr.read() if fio.stderr else ''}"
            pair.checkpoint()
            seen += 1
        assert fio.poll() is None, "fio ended before the verify"
        fio.send_signal(signal.SIGINT)
        fio.communicate(timeout=TIMEOUT)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait(timeout=TIMEOUT)
    rep = _report(pair)
    assert rep["state"] == "done", rep
    assert rep["blocks_differing"] == 0, rep["differing"]
    assert rep["blocks_rechecked"] > 0  # fio's writes did land on compared blocks
    assert rep["blocks_compared"] + rep["blocks_unverified"] == SIZE // BS
    assert seen >= 1


def test_verify_cut_by_the_network_resumes_and_reports_the_flips(pair: Pair) -> None:
    _setup(pair, budget=lambda: None)  # the proxy passes everything until cut_all
    _flip(pair, FLIPPED)
    # 16 MiB at 4 MB/s: about 4 s, so the cut lands mid-pass.
    mountctl("verify", "--no-wait", "--rate", "4", pair.pri.path("vm1"))
    wait_until_sync(lambda: _report(pair)["blocks_done"] > 0, what="the verify to compare its first blocks")
    assert _report(pair)["state"] == "running"
    assert pair.proxy is not None
    pair.proxy.cut_all()  # the next connection is allowed through (budget None)
    wait_until_sync(lambda: _report(pair)["state"] != "running", what="the verify to finish")
    rep = _report(pair)
    assert rep["state"] == "done", rep
    assert rep["interruptions"] >= 1
    assert rep["blocks_done"] == SIZE // BS and rep["blocks_compared"] == SIZE // BS
    assert _ranges(rep) == [(2, 1), (1000, 2), (3000, 1)]
