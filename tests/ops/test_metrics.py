"""``--metrics HOST:PORT``: a real mount serves Prometheus text at /metrics, parsed with prometheus_client.

Every metric the README lists must be there with its type; a line the parser
rejects fails the test; the values match the I/O, checkpoints and refused
connections the test caused.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mountctl.pair import free_port
from tests.e2e.pair import direct_pwrite, read_file
from tests.fs.mounts import Mount, mountctl
from tests.mountable import mount_skip_reason
from tests.waiting import wait_until_sync

REASON = mount_skip_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"mount test {REASON}")

MiB = 1 << 20

EXPECTED = {
    # name -> type, as prometheus_client.parser reports them (counters without their _total)
    "colofs_reads": "counter", "colofs_read_bytes": "counter",
    "colofs_writes": "counter", "colofs_write_bytes": "counter",
    "colofs_request_seconds": "histogram",
    "colofs_hidden_bytes": "gauge", "colofs_active_bytes": "gauge",
    "colofs_io_errors": "counter",
    "colofs_checkpoints": "counter", "colofs_checkpoint_seconds": "histogram",
    "colofs_failovers": "counter",
    "colofs_replication_state": "gauge",
    "colofs_backlog_writes": "gauge", "colofs_backlog_bytes": "gauge",
    "colofs_acked_seq": "gauge", "colofs_last_seq": "gauge",
    "colofs_lz4_ratio": "gauge",
    "colofs_resync_active": "gauge", "colofs_resync_blocks_total": "gauge", "colofs_resync_blocks_checked": "gauge",
    "colofs_verify_active": "gauge", "colofs_verify_blocks_total": "gauge",
    "colofs_verify_blocks_done": "gauge", "colofs_verify_blocks_differing": "gauge",
    "colofs_damaged": "gauge",
    "colofs_refused_connections": "counter",
}


class Scrape:
    """One parsed scrape: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(text):  # raises on a malformed line
            self.types[fam.name] = fam.type
            for s in fam.samples:
                self.samples.setdefault(s.name, []).append((dict(s.labels), s.value))

    def value(self, name: str, **labels: str) -> float:
        got = [v for lab, v in self.samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
        assert len(got) == 1, f"{name}{labels}: expected one sample, got {got} of {self.samples.get(name)}"
        return got[0]


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return Scrape(r.read().decode())


def check_all_listed(s: Scrape) -> None:
    missing = sorted(set(EXPECTED) - set(s.types))
    assert not missing, f"metrics missing from the scrape: {missing}"
    wrong = {n: s.types[n] for n, t in EXPECTED.items() if s.types[n] != t}
    assert not wrong, f"metrics of the wrong type: {wrong}"


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    m = Mount(tmp_path, "secondary", "m")  # a secondary VM buffers its writes in the active layer
    try:
        yield m
    finally:
        m.cleanup()


def test_a_mount_serves_its_io_and_checkpoints_as_prometheus_metrics(mount):
    port = free_port()
    out = mount.mount("--metrics", f"127.0.0.1:{port}").stdout
    assert f"http://127.0.0.1:{port}/metrics" in out
    mountctl("create", str(mount.mnt), "vm1/d0", "--size", "4M")
    disk = mount.path("vm1", "d0.raw")
    written = 0
    for i in range(8):
        direct_pwrite(disk, i * 65536, bytes([i + 1]) * 65536)
        written += 65536
    assert read_file(disk, direct=True)[:65536] == b"\x01" * 65536
    for _ in range(3):
        mountctl("checkpoint", str(mount.path("vm1")))
    direct_pwrite(disk, MiB, b"\x09" * 4096)  # after the checkpoints: in the active layer now

    s = scrape(port)
    check_all_listed(s)
    d = {"vm": "vm1", "disk": "d0"}
    assert s.value("colofs_writes_total", **d) >= 9
    assert s.value("colofs_write_bytes_total", **d) >= written + 4096
    assert s.value("colofs_reads_total", **d) >= 1
    assert s.value("colofs_read_bytes_total", **d) >= 65536
    assert s.value("colofs_request_seconds_count", **d, kind="write") == s.value("colofs_writes_total", **d)
    assert s.value("colofs_request_seconds_bucket", **d, kind="write", le="+Inf") == s.value(
        "colofs_request_seconds_count", **d, kind="write")
    assert s.value("colofs_request_seconds_count", **d, kind="read") == s.value("colofs_reads_total", **d)
    assert s.value("colofs_hidden_bytes", **d) + s.value("colofs_active_bytes", **d) >= 4096
    assert s.value("colofs_io_errors_total", **d) == 0
    assert s.value("colofs_checkpoints_total", vm="vm1") == 3
    assert s.value("colofs_checkpoint_seconds_count", vm="vm1") == 3
    assert s.value("colofs_failovers_total", vm="vm1") == 0
    assert s.value("colofs_replication_state", vm="vm1", state="not configured") == 1
    assert s.value("colofs_last_seq", vm="vm1") >= 0
    assert s.value("colofs_damaged", vm="vm1") == 0

    # Anything but /metrics is a 404, and the daemon goes on answering.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=30)
    assert e.value.code == 404
    assert scrape(port).value("colofs_checkpoints_total", vm="vm1") == 3


def test_a_metrics_port_in_use_stops_the_mount_with_the_reason(mount):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = mountctl("mount", "--role", "secondary", "--store", str(mount.store), "--metrics",
                       f"127.0.0.1:{port}", str(mount.mnt), check=False)
    assert res.returncode != 0
    assert f"--metrics: cannot listen on 127.0.0.1:{port}" in res.stderr
    assert not os.path.ismount(mount.mnt)


def test_a_pair_reports_replication_figures_and_refused_connections(pair):
    sport, pport = free_port(), free_port()
    pair.sec.mount("--listen", f"127.0.0.1:{pair.port}", "--key-file", str(pair.key),
                   "--metrics", f"127.0.0.1:{sport}")
    pair.pri.mount("--peer", f"127.0.0.1:{pair.port}", "--key-file", str(pair.key),
                   "--metrics", f"127.0.0.1:{pport}")
    mountctl("create", str(pair.pri.mnt), "vm1/d0", "--size", "4M")
    pair.wait_disk("vm1", "d0", 4 * MiB)
    for i in range(4):
        direct_pwrite(pair.pfile(), i * 65536, bytes([0x41 + i]) * 65536)
    assert pair.checkpoint()["replicated"] is True
    pair.wait_caught_up()

    # A stranger that does not handshake is refused by the secondary.
    with socket.create_connection(("127.0.0.1", pair.port), timeout=30) as stranger:
        stranger.sendall(b"GET / HTTP/1.0\r\n\r\n" * 8)
        stranger.shutdown(socket.SHUT_WR)
        while stranger.recv(4096):
            pass

    p = scrape(pport)
    check_all_listed(p)
    last = p.value("colofs_last_seq", vm="vm1")
    assert last >= 4
    assert p.value("colofs_replication_state", vm="vm1", state="connected") == 1
    assert p.value("colofs_replication_state", vm="vm1", state="refused") == 0
    assert p.value("colofs_checkpoints_total", vm="vm1") == 1
    assert p.value("colofs_write_bytes_total", vm="vm1", disk="d0") >= 4 * 65536
    assert 0 < p.value("colofs_lz4_ratio", vm="vm1") < 1  # runs of one byte compress well
    assert p.value("colofs_resync_active", vm="vm1") == 0
    assert p.value("colofs_verify_active", vm="vm1") == 0
    # Acknowledged up to the last write, with no backlog left (waited for, not assumed).
    wait_until_sync(lambda: (lambda x: x.value("colofs_acked_seq", vm="vm1") == last
                             and x.value("colofs_backlog_writes", vm="vm1") == 0)(scrape(pport)),
                    what="the primary's metrics to show every write acknowledged")

    s = wait_until_sync(lambda: (lambda x: x if sum(v for _, v in x.samples.get(
        "colofs_refused_connections_total", [])) >= 1 else None)(scrape(sport)),
        what="the secondary's metrics to count the refused stranger")
    check_all_listed(s)
    assert s.value("colofs_checkpoints_total", vm="vm1") == 1  # the primary's, taken through this mount
    assert s.value("colofs_acked_seq", vm="vm1") >= last
    assert s.value("colofs_replication_state", vm="vm1", state="connected") == 1


def test_figures_of_two_processes_merge_without_counting_a_vm_twice():
    from colofs.fs.iostats import Histogram
    from colofs.fs.metrics import Figures, Hist, merge, render

    def worker(vm: str, writes: int, refused: int) -> Figures:
        h = Histogram()
        for _ in range(writes):
            h.observe(0.001)
        return Figures({"colofs_writes": (((vm, "d0"), writes),),
                        "colofs_request_seconds": (((vm, "d0", "write"), Hist.of(h)),),
                        "colofs_refused_connections": ((("handshake_failed",), refused),)})

    s = Scrape(render(merge([worker("vm1", 3, 1), worker("vm2", 5, 2)])).decode())
    check_all_listed(s)
    assert s.value("colofs_writes_total", vm="vm1") == 3 and s.value("colofs_writes_total", vm="vm2") == 5
    assert s.value("colofs_request_seconds_count", vm="vm2", kind="write") == 5
    assert s.value("colofs_refused_connections_total", reason="handshake_failed") == 3
