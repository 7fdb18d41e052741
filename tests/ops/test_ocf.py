"""The Pacemaker agent examples/ocf/colofs-vm on a real loopback pair.

``ocf-tester`` (Debian's resource-agents) checks the agent's life cycle on the
secondary of a pair whose primary replicates into it: meta-data against the
DTD, validate-all, probes, start, monitor, stop, starting a started and
stopping a stopped resource. It is installed here if missing; where it cannot
be, the test skips with the reason. ocf-tester's own promote/demote round
trip expects demote to succeed, which COLO cannot do, so the promotable
actions are checked directly: promote is a failover on the secondary that
keeps the last checkpoint's data, monitor then answers OCF_RUNNING_MASTER,
and demote of the primary is refused and changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountctl.pair import free_port, write_key
from tests.fs.mounts import Mount, mountctl
from tests.mountable import mount_skip_reason
from tests.ops.sysfiles import BIN
from tests.waiting import wait_until_sync

AGENT = Path(__file__).resolve().parents[2] / "examples" / "ocf" / "colofs-vm"
MiB = 1 << 20
OCF_SUCCESS, OCF_ERR_GENERIC, OCF_NOT_RUNNING, OCF_RUNNING_MASTER = 0, 1, 7, 8

_REASON = mount_skip_reason(("fusermount3",))
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"mount test {_REASON}")


def _install_ocf_tester() -> str | None:
    """The ocf-tester path, installing resource-agents (and xmllint, which it runs) if missing; None if not."""
    if shutil.which("ocf-tester") and shutil.which("xmllint"):
        return shutil.which("ocf-tester")
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return None
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "resource-agents", "libxml2-utils"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in range(2):
        if attempt:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600, check=False)
        if subprocess.run(cmd, capture_output=True, env=env, timeout=900, check=False).returncode == 0:
            break
    return shutil.which("ocf-tester") if shutil.which("xmllint") else None


@pytest.fixture(scope="module")
def ocf_tester() -> str:
    path = _install_ocf_tester()
    if path is None:
        pytest.skip("ocf-tester (Debian package resource-agents) is not installed and could not be installed "
                    "with apt-get")
    return path


@pytest.fixture
def mountctl_bin() -> str:
    path = BIN / "mountctl"
    if not path.exists():
        pytest.skip(f"mountctl is not installed in {BIN} (make venv, or pip install -e .)")
    return str(path)


class Node:
    """One node's instance of the resource: its parameters, and the agent run with them."""

    def __init__(self, base: Path, name: str, role: str, extra: dict[str, str], mountctl_bin: str) -> None:
        self.mount = Mount(base, role, name)
        self.params = {"store": str(self.mount.store), "mountpoint": str(self.mount.mnt), "vm": "vm1",
                       "role": role, "mountctl": mountctl_bin, **extra}

    def env(self, promotable: bool) -> dict[str, str]:
        env = {**os.environ, "OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": f"colofs-vm1:{self.mount.role}"}
        env.update({f"OCF_RESKEY_{k}": v for k, v in self.params.items()})
        if promotable:
            env["OCF_RESKEY_CRM_meta_promotable"] = "true"
        return env

    def agent(self, action: str, *, promotable: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(AGENT), action], capture_output=True, text=True, env=self.env(promotable),
                              timeout=400, check=False)

    def rc(self, action: str) -> int:
        return self.agent(action).returncode

    def cleanup(self) -> None:
        self.mount.mounted = os.path.ismount(self.mount.mnt)
        if self.mount.mounted and (self.mount.store / ".colofs-mount.lock").exists():
            self.mount.pids.append(json.loads((self.mount.store / ".colofs-mount.lock").read_text())["pid"])
        self.mount.cleanup()


@pytest.fixture
def pair(tmp_path: Path, mountctl_bin: str) -> Iterator[tuple[Node, Node]]:
    key = str(write_key(tmp_path / "colofs.key"))
    port = free_port()
    sec = Node(tmp_path, "s", "secondary", {"listen": f"127.0.0.1:{port}", "key_file": key}, mountctl_bin)
    pri = Node(tmp_path, "p", "primary", {"peer": f"127.0.0.1:{port}", "key_file": key}, mountctl_bin)
    try:
        yield sec, pri
    finally:
        pri.cleanup()
        sec.cleanup()


def _vm(node: Node) -> dict:
    try:
        return json.loads(os.getxattr(node.mount.mnt / "vm1", "user.colofs.status"))
    except FileNotFoundError:
        return {}


def test_ocf_tester_passes_on_the_secondary_of_a_replicating_pair(ocf_tester, pair):
    sec, pri = pair
    assert os.stat(AGENT).st_mode & 0o777 == 0o755
    assert pri.rc("start") == OCF_SUCCESS
    mountctl("create", pri.mount.mnt, "vm1/d0", "--size", "4M")
    opts = [a for k, v in sec.params.items() for a in ("-o", f"{k}={v}")]
    # ocf-tester runs meta-data as user nobody: the agent goes where nobody can reach it, as installed
    with tempfile.TemporaryDirectory(prefix="colofs-ocf-", dir="/tmp") as where:
        os.chmod(where, 0o755)
        agent = shutil.copy2(AGENT, os.path.join(where, "colofs-vm"))
        res = subprocess.run([ocf_tester, "-n", "colofs-vm1", *opts, agent], capture_output=True, text=True,
                             timeout=600, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{agent} passed all tests" in res.stdout
    # the life cycle ended stopped; started once more, the secondary receives the VM from its primary
    assert sec.rc("start") == OCF_SUCCESS
    wait_until_sync(lambda: _vm(sec).get("disks", {}).get("d0"), 60, "vm1/d0 on the secondary",
                    catch=(OSError, KeyError))
    assert sec.rc("stop") == OCF_SUCCESS


def test_promote_is_a_failover_and_demote_of_the_primary_is_refused(pair):
    sec, pri = pair
    assert sec.rc("monitor") == OCF_NOT_RUNNING
    assert sec.rc("start") == OCF_SUCCESS and pri.rc("start") == OCF_SUCCESS
    mountctl("create", pri.mount.mnt, "vm1/d0", "--size", "4M")
    data = os.urandom(MiB)
    with open(pri.mount.mnt / "vm1" / "d0.raw", "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    mountctl("checkpoint", pri.mount.mnt / "vm1")  # confirmed by the secondary
    assert pri.rc("monitor") == OCF_RUNNING_MASTER
    assert sec.rc("monitor") == OCF_SUCCESS
    assert sec.agent("monitor", promotable=False).returncode == OCF_SUCCESS
    assert pri.agent("monitor", promotable=False).returncode == OCF_SUCCESS

    assert sec.rc("demote") == OCF_SUCCESS  # not promoted: nothing to do
    refused = pri.agent("demote")
    assert refused.returncode == OCF_ERR_GENERIC
    assert "COLO has no demote" in refused.stderr
    assert pri.rc("monitor") == OCF_RUNNING_MASTER and _vm(pri)["role"] == "primary"

    assert pri.rc("stop") == OCF_SUCCESS  # the primary's host goes away
    assert pri.rc("monitor") == OCF_NOT_RUNNING
    epoch = _vm(sec)["epoch"]
    assert sec.rc("promote") == OCF_SUCCESS
    assert sec.rc("monitor") == OCF_RUNNING_MASTER
    assert _vm(sec)["role"] == "primary" and _vm(sec)["epoch"] > epoch
    with open(sec.mount.mnt / "vm1" / "d0.raw", "rb") as f:
        assert f.read(MiB) == data  # the last checkpoint's image
    assert sec.rc("promote") == OCF_SUCCESS  # promoting the promoted: nothing to do
    assert sec.agent("promote", promotable=False).returncode == 3  # a plain primitive has no promote

    assert sec.rc("stop") == OCF_SUCCESS
    assert sec.rc("monitor") == OCF_NOT_RUNNING
