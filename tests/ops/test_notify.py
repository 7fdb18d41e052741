"""sd_notify: a daemon started with NOTIFY_SOCKET says READY=1 once its mount answers, STOPPING=1 when unmounted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from colofs.notify import notify
from tests.fs.mounts import Mount, run
from tests.mountable import mount_skip_reason

REASON = mount_skip_reason()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A unix datagram socket bound where a service manager's would be."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(60)  # only bounds a hang: each message is awaited, never slept for
        yield sock, path


def _fields(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().splitlines())


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify(READY=1) is False


def test_fields_arrive_as_lines_on_a_path_and_an_abstract_socket(monkeypatch, listener):
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify(READY=1, STATUS="serving x") is True
    assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "serving x"}

    name = f"colofs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        abstract.settimeout(60)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify(STOPPING=1) is True
        assert abstract.recv(4096) == b"STOPPING=1"


def test_a_missing_manager_socket_is_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify(READY=1) is False


@pytest.mark.skipif(REASON is not None, reason=f"mount test {REASON}")
@pytest.mark.parametrize("model", [[], ["--single-process"]], ids=["workers", "single-process"])
def test_daemon_says_ready_once_the_mount_answers_and_stopping_at_unmount(tmp_path, listener, model):
    sock, path = listener
    m = Mount(tmp_path, "secondary", "n")
    proc = subprocess.Popen([sys.executable, "-m", "colofs.mountd", "--role", "secondary", "--store",
                             str(m.store), *model, str(m.mnt)], env={**os.environ, "NOTIFY_SOCKET": path},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[2])
    try:
        ready = _fields(sock.recv(4096))
        # the message is only sent once the mount serves: it answers at once
        status = json.loads(os.getxattr(m.mnt, "user.colofs.status"))
        assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid), ready
        assert status["pid"] == proc.pid and status["mountpoint"] == str(m.mnt)
        assert str(m.store) in ready["STATUS"]

        run("umount", str(m.mnt))
        assert _fields(sock.recv(4096))["STOPPING"] == "1"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        run("fusermount3", "-u", "-z", str(m.mnt), check=False)  # a stale mount is no ismount()
