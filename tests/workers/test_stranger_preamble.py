"""A stranger's route preamble does not create a VM on a secondary with a worker per VM.

The router starts a worker for a VM the preamble names before anyone proved
the key; that worker creates the VM only when an authenticated primary
attaches it. A raw client sending a preamble for ``evil1`` and then garbage
leaves no ``STORE/evil1`` and no ``evil1`` in the root's status: its worker
ends and the supervisor forgets the VM. A real primary's new VM is still
created on the secondary (the same router path, authenticated), and a
stranger's connection to it is refused by its worker and counted in the
root's status.
"""

from __future__ import annotations

import socket

from colofs.wire.route import encode_route
from tests.waiting import wait_until_sync
from tests.workers.conftest import WorkersPair, nothing_left

MiB = 1 << 20
FORGOTTEN = "VM evil1: no authenticated primary attached it"


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_strangers_preamble_creates_no_vm(wpair: WorkersPair) -> None:
    wpair.start()
    port = int(wpair.sec.read_status()["replication"]["port"])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        # It starts like a frame (the router hands it on), then is garbage the worker refuses.
        sock.sendall(encode_route("evil1") + b"COLF not a handshake at all " * 8)
        sock.settimeout(1.0)
        wait_until_sync(lambda: _closed_by_peer(sock), 60, "the stranger's connection closed")
    wait_until_sync(lambda: FORGOTTEN in wpair.sec.log(), 60, "the secondary forgetting evil1")
    assert not (wpair.sec.store / "evil1").exists()
    root = wpair.sec.read_status()
    assert "evil1" not in root["vms"] and root["vm_count"] == 0, root

    # A primary's new VM still reaches the secondary through the same path, authenticated.
    wpair.pri.create("vm1", 64 * MiB, "d0")
    wpair.wait_disk("vm1", "d0", 64 * MiB)
    assert wpair.sec.read_status()["vms"] == ["vm1"]

    # A stranger's connection routed to vm1 is refused by vm1's worker; the root's status counts it.
    before = int(wpair.sec.read_status()["replication"]["refused"])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(encode_route("vm1") + b"COLF not a handshake at all " * 8)
        sock.settimeout(1.0)
        wait_until_sync(lambda: _closed_by_peer(sock), 60, "the stranger's vm1 connection closed")
    wait_until_sync(lambda: int(wpair.sec.read_status()["replication"]["refused"]) > before, 60,
                    "the worker's refusal counted in the root's status")
    assert "127.0.0.1" in wpair.sec.read_status()["replication"]["last_refusal"]
    assert wpair.sec.read_status()["vms"] == ["vm1"]
    wpair.pri.umount()
    wpair.sec.umount()
    nothing_left(wpair)
