"""The systemd units in examples/systemd pass ``systemd-analyze verify`` without a warning.

They are installed as an operator would (``mountctl`` at the path it has
here, the template instantiated), and verified together. The hardening may
not give the service a mount namespace of its own: a FUSE mount made there
would be invisible to QEMU.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.ops.sysfiles import BIN

UNITS = Path(__file__).resolve().parents[2] / "examples" / "systemd"
ANALYZE = shutil.which("systemd-analyze")
NAMESPACING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
               "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
               "ProtectHostname", "ProtectProc", "ProcSubset", "ReadOnlyPaths", "ReadWritePaths",
               "InaccessiblePaths", "BindPaths", "BindReadOnlyPaths", "TemporaryFileSystem", "MountFlags",
               "RootDirectory", "RootImage")


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNITS / name)
    return cp


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (package systemd)")
def test_units_verify_cleanly(tmp_path):
    assert ANALYZE is not None
    mountctl = BIN / "mountctl"
    if not mountctl.exists():
        pytest.skip(f"mountctl is not installed in {BIN} (make venv, or pip install -e .)")
    for unit in ("colofs@.service", "mnt-colofs.mount"):
        text = (UNITS / unit).read_text().replace("/usr/local/bin/mountctl", str(mountctl))
        (tmp_path / unit).write_text(text)
    (tmp_path / "colofs@vm1.service").symlink_to("colofs@.service")
    res = subprocess.run([ANALYZE, "verify", str(tmp_path / "colofs@vm1.service"), str(tmp_path / "mnt-colofs.mount")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout + res.stderr == "", "systemd-analyze warned:\n" + res.stdout + res.stderr


def test_service_waits_for_the_mount_and_unmounts_cleanly_without_a_namespace():
    svc = _unit("colofs@.service")["Service"]
    assert svc["Type"] == "notify"
    assert "--foreground" in svc["ExecStart"]  # the daemon is the main process, whose READY=1 counts
    assert svc["ExecStop"].split()[1:3] == ["umount", "--timeout"]
    assert svc["Restart"] == "on-failure"
    assert "/dev/fuse rw" in svc["DeviceAllow"]
    assert not [k for k in svc if k in NAMESPACING]
    mount = _unit("mnt-colofs.mount")["Mount"]
    assert mount["Type"] == "fuse.colofs" and "_netdev" in mount["Options"]
