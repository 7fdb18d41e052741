"""``mountctl events MNT --json`` on a real pair: a checkpoint, a peer loss and a failover arrive as lines.

A listener that never reads is dropped with a last ``dropped`` line once its
bounded queue is full, while the daemon goes on serving the others.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from colofs.events import socket_path
from mountctl.events import format_event
from tests.e2e.pair import direct_pwrite
from tests.fs.mounts import MOUNTCTL, mountctl
from tests.mountable import mount_skip_reason
from tests.waiting import wait_until_sync

REASON = mount_skip_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"mount test {REASON}")

MiB = 1 << 20


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Follower:
    """``mountctl events MNT --json`` in the background, its lines gathered by a thread as they come."""

    def __init__(self, mnt: Path) -> None:
        # SIGINT as an interactive user's: a shell runs a background job with it ignored, and the
        # child would inherit that (Python then installs no KeyboardInterrupt handler), so stop() could not end it.
        self.proc = subprocess.Popen([*MOUNTCTL, "events", str(mnt), "--json"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
        self.events: list[dict[str, Any]] = []
        self.bad: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.bad.append(line)

    def seen(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in list(self.events)
                if e.get("event") == kind and all(e.get(k) == v for k, v in fields.items())]

    def wait(self, kind: str, **fields: Any) -> dict[str, Any]:
        return wait_until_sync(lambda: (self.seen(kind, **fields) or [None])[-1],
                               what=f"event {kind} {fields}; got {[e.get('event') for e in self.events]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self._thread.join(timeout=60)


def test_events_follow_a_checkpoint_a_peer_loss_a_failover_and_drop_a_slow_reader(pair):
    pair.start()
    mountctl("create", str(pair.pri.mnt), "vm1/d0", "--size", "4M")
    pair.wait_disk("vm1", "d0", 4 * MiB)
    sock = socket_path(str(pair.sec.store))
    assert os.stat(sock).st_mode & 0o777 == 0o600

    follower = Follower(pair.sec.mnt)
    try:
        follower.wait("listening")
        exists = follower.wait("exists", vm="vm1")
        assert exists["role"] == "secondary" and exists["peer"] == "connected", exists

        direct_pwrite(pair.pfile(), 0, b"\x11" * 65536)
        seq = pair.checkpoint()["seq"]
        cp = follower.wait("checkpoint", vm="vm1", seq=seq)
        assert cp["by"] == "primary" and cp["seconds"] >= 0

        pair.pri.umount()
        lost = follower.wait("peer-lost", vm="vm1")
        assert lost["role"] == "secondary"

        mountctl("failover", str(pair.sec.path("vm1")))
        fo = follower.wait("failover", vm="vm1")
        assert fo["epoch"] >= 1

        # A listener that never reads: its queue fills and it is dropped, the others are not.
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(sock)
        vm_dir = pair.sec.path("vm1")

        made = [len(follower.seen("checkpoint", vm="vm1"))]  # checkpoints of vm1 the follower must see

        def burst() -> bool:
            for _ in range(5):  # a few at a time: the drop is seen soon after it happens
                os.setxattr(vm_dir, "user.colofs.checkpoint", b"")
                made[0] += 1
            return "events: dropped listener" in pair.sec.log()

        wait_until_sync(burst, what="the daemon to drop the listener that never reads")
        slow.settimeout(60)  # bounds a hang only: the daemon closes it after the note
        got = b""
        while chunk := slow.recv(65536):
            got += chunk
        slow.close()
        last = json.loads(got.splitlines()[-1])
        assert last["event"] == "dropped" and last["reason"] == "too slow", last

        # The daemon goes on serving: the follower still gets every new event, and was never dropped.
        wait_until_sync(lambda: len(follower.seen("checkpoint", vm="vm1")) >= made[0],
                        what=f"the follower to have every one of the {made[0]} checkpoints of the bursts")
        mountctl("checkpoint", "--json", str(vm_dir))
        wait_until_sync(lambda: len(follower.seen("checkpoint", vm="vm1")) >= made[0] + 1,
                        what="the follower to see the checkpoint made after the drop")
        assert len(follower.seen("checkpoint", vm="vm1")) == made[0] + 1
        assert not follower.seen("dropped") and not follower.bad
    finally:
        follower.stop()


def test_the_text_form_is_time_event_and_fields():
    line = format_event({"time": 0.25, "event": "peer-lost", "vm": "vm1", "reason": "connection reset",
                         "peer": None})
    assert line == '1970-01-01T00:00:00.250Z peer-lost vm=vm1 reason="connection reset"'


def test_a_primary_reports_its_peer_lost_then_connected_again_with_a_resync_then_a_verify(pair):
    pair.start()
    mountctl("create", str(pair.pri.mnt), "vm1/d0", "--size", "4M")
    pair.wait_disk("vm1", "d0", 4 * MiB)
    follower = Follower(pair.pri.mnt)
    try:
        follower.wait("listening")
        pair.sec.umount()
        lost = follower.wait("peer-lost", vm="vm1")
        assert lost["role"] == "primary"
        direct_pwrite(pair.pfile(), 0, b"\x22" * 65536)  # written while the secondary is away: resynced
        pair.mount_secondary()
        follower.wait("peer-connected", vm="vm1")
        started = follower.wait("resync-started", vm="vm1")
        done = follower.wait("resync-done", vm="vm1")
        assert done["time"] >= started["time"] and done["blocks_total"] >= 1, (started, done)

        report = json.loads(mountctl("verify", "--json", str(pair.pri.path("vm1"))).stdout)
        follower.wait("verify-started", vm="vm1", id=report["id"])
        end = follower.wait("verify-done", vm="vm1", id=report["id"])
        assert end["state"] == "done" and end["blocks_differing"] == 0, end
        assert not follower.bad
    finally:
        follower.stop()
