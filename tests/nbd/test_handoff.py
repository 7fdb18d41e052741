"""NBD with a process per VM: the supervisor negotiates on its socket, hands the socket to the VM's worker.

Each test plays the supervisor (a unix socket it accepts on, the VMs' channels)
and one or two workers, each serving a real store's VM over its end of a
channel (:mod:`colofs.workers.channel`): the client's socket really travels
in ``SCM_RIGHTS`` and the supervisor's copy is closed once handed over.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from colofs.core.store import Store
from colofs.nbd import protocol as p
from colofs.nbd.handoff import (
    Chosen,
    FrontServer,
    answer_nbd_request,
    hand_over,
    negotiate_until_export,
    resume_of,
    serve_handed_over,
    start_front,
)
from colofs.nbd.server import Resume
from colofs.nbd.service import Limits, NbdService
from colofs.workers.channel import Channel, channel_pair
from tests.nbd.rawclient import RawClient
from tests.waiting import DEADLINE, wait_until

MiB = 1 << 20
TOOLS = ("qemu-io", "qemu-img", "nbdinfo")


class Worker:
    """One VM's worker, in this process: its store, its listener-less NBD server, its end of the channel."""

    def __init__(self, store: Store, service: NbdService, channel: Channel, supervisor_end: Channel) -> None:
        self.store = store
        self.service = service
        self.channel = channel
        self.supervisor_end = supervisor_end
        self.handed: list[dict[str, Any]] = []

    async def handle(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any] | None:
        if msg["op"] == "nbd_connection":
            self.handed.append(msg)
            serve_handed_over(self.service, fds, msg)
            return None
        for fd in fds:
            os.close(fd)
        return answer_nbd_request(self.service, msg)


class Host:
    """The workers of the test's VMs, and the supervisor's view of them."""

    def __init__(self, nursery: trio.Nursery, tmp: Path) -> None:
        self.nursery = nursery
        self.tmp = tmp
        self.workers: dict[str, Worker] = {}
        self.stores: list[Store] = []

    async def add(self, vm: str, disks: Mapping[str, int], role: str = "primary") -> Worker:
        store = await Store.open(str(self.tmp / f"store-{vm}"), role=role, create=True)
        self.stores.append(store)
        for disk, size in disks.items():
            await store.create_disk(vm, disk, size)
        service = await NbdService.start(self.nursery, store, None, socket_path=None, tcp=None)
        sup, wrk = channel_pair()
        w = Worker(store, service, Channel(wrk, label=f"worker {vm}"), Channel(sup, label=f"supervisor {vm}"))
        self.nursery.start_soon(w.channel.run, w.handle)
        self.nursery.start_soon(w.supervisor_end.run, _refuse)
        self.workers[vm] = w
        return w

    def channels(self) -> dict[str, Channel]:
        return {vm: w.supervisor_end for vm, w in self.workers.items() if not w.supervisor_end.closed.is_set()}

    def handed(self) -> int:
        return sum(len(w.handed) for w in self.workers.values())


async def _refuse(msg: dict[str, Any], fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    async with trio.open_nursery() as nursery:
        h = Host(nursery, tmp_path)
        try:
            yield h
        finally:
            nursery.cancel_scope.cancel()
    for s in h.stores:
        s.abandon()


async def front(host: Host, tmp_path: Path, limits: Limits | None = None) -> tuple[NbdService, str]:
    path = str(tmp_path / "nbd.sock")
    svc = await start_front(host.nursery, host.channels, socket_path=path, tcp=None, limits=limits)
    return svc, path


async def tool(*args: str) -> str:
    with trio.fail_after(DEADLINE):
        done = await trio.run_process(list(args), capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, (args, done.stdout.decode(), done.stderr.decode())
    return done.stdout.decode()


@pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS), reason=f"needs {', '.join(TOOLS)}")
async def test_qemu_and_nbdinfo_reach_each_vms_disks_through_the_supervisor(host: Host, tmp_path: Path) -> None:
    w1 = await host.add("vm1", {"d0": 8 * MiB, "d1": 4 * MiB})
    w2 = await host.add("vm2", {"sys": 16 * MiB}, role="secondary")
    await w1.store.vm("vm1").snapshot("s1")
    svc, path = await front(host, tmp_path)
    uri = f"nbd+unix:///{{}}?socket={path}"
    out = await tool("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 2M", "-c", "read -P 0xab 1M 2M",
                     uri.format("vm1/d0"))
    assert "wrote 2097152/2097152 bytes" in out and "read 2097152/2097152 bytes" in out
    assert bytes(await w1.store.disk("vm1", "d0").read(MiB, 2 * MiB)) == b"\xab" * (2 * MiB)
    await tool("qemu-io", "-f", "raw", "-c", "write -P 0x5c 0 64k", uri.format("vm2/sys"))
    assert bytes(await w2.store.disk("vm2", "sys").read(0, 65536)) == b"\x5c" * 65536
    info = json.loads(await tool("qemu-img", "info", "--output=json", uri.format("vm2/sys")))
    assert info["virtual-size"] == 16 * MiB
    listed = json.loads(await tool("nbdinfo", "--list", "--json", f"nbd+unix://?socket={path}"))
    sizes = {e["export-name"]: e["export-size"] for e in listed["exports"]}
    assert sizes == {"vm1/d0": 8 * MiB, "vm1/d0@s1": 8 * MiB, "vm1/d1": 4 * MiB, "vm1/d1@s1": 4 * MiB,
                     "vm2/sys": 16 * MiB, "vm2/sys:ingest": 16 * MiB}, sizes
    ro = await tool("nbdinfo", "--json", f"nbd+unix:///vm1/d0@s1?socket={path}")
    assert json.loads(ro)["exports"][0]["is_read_only"] is True
    assert len(w1.handed) >= 2 and len(w2.handed) >= 2
    await svc.stop()
    assert not os.path.exists(path)


async def test_the_test_supervisor_hands_a_negotiated_connection_over_scm_rights(host: Host, tmp_path: Path) -> None:
    w = await host.add("vm1", {"d0": 4 * MiB})
    path = str(tmp_path / "own.sock")
    chosen: list[Chosen | None] = []

    async def supervisor(listener: trio.SocketListener) -> None:
        stream = await listener.accept()
        try:
            with trio.fail_after(DEADLINE):
                got = await negotiate_until_export(stream, host.channels, label="test")
            chosen.append(got)
            assert got is not None
            await hand_over(stream, host.channels()[got.vm], got, "test")
        finally:
            await trio.aclose_forcefully(stream)  # the worker holds its own copy now

    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(4)
    host.nursery.start_soon(supervisor, trio.SocketListener(sock))
    c = await RawClient.connect_unix(path)
    with trio.fail_after(DEADLINE):
        replies = await c.go("/vm1/d0")  # structured replies and base:allocation, then GO
        assert replies[-1][0] == p.REP_ACK and c.size == 4 * MiB
        assert chosen[0] == Chosen("vm1", Resume(p.OPT_GO, "/vm1/d0", (), p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES,
                                                 True, "vm1/d0"))
        assert (await c.write(8192, b"w" * 4096)).error == 0
        assert await c.read(8192, 4096) == b"w" * 4096
        r = await c.call(p.CMD_BLOCK_STATUS, 0, 4 * MiB)  # works only if the meta context came along
        assert r.error == 0 and r.extents and r.extents[0][1] & p.STATE_HOLE
        await c.disconnect()
    assert bytes(await w.store.disk("vm1", "d0").read(8192, 4096)) == b"w" * 4096
    assert w.handed[0]["export"] == "/vm1/d0" and w.handed[0]["option"] == {"code": p.OPT_GO, "infos": []}


async def test_nothing_past_the_choosing_option_is_read_by_the_supervisor(host: Host, tmp_path: Path) -> None:
    w = await host.add("vm1", {"d0": 4 * MiB})
    await w.store.disk("vm1", "d0").write(0, b"early" * 100)
    _, path = await front(host, tmp_path)
    c = await RawClient.connect_unix(path)
    await c.greet()
    # GO and a read request in one send: the read's bytes must reach the worker, untouched.
    await c.send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_GO, len(c.go_data("vm1/d0"))) + c.go_data("vm1/d0")
                 + p.pack_request(p.CMD_READ, 77, 0, 500))
    c.reads[77] = 500
    with trio.fail_after(DEADLINE):
        while True:
            _, _, rtype, length = p.OPTION_REPLY.unpack(await c.recv_exact(p.OPTION_REPLY.size))
            await c.recv_exact(length)
            if rtype == p.REP_ACK:
                break
        r = await c.reply()
    assert (r.cookie, r.error, r.data) == (77, 0, b"early" * 100)


async def test_old_export_name_is_handed_over_with_the_clients_flags(host: Host, tmp_path: Path) -> None:
    await host.add("vm1", {"d0": 4 * MiB})
    _, path = await front(host, tmp_path)
    c = await RawClient.connect_unix(path)
    await c.greet(p.FLAG_FIXED_NEWSTYLE)  # without NO_ZEROES: the worker must send the 124 zero bytes
    await c.send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, 6) + b"vm1/d0")
    with trio.fail_after(DEADLINE):
        size, tflags = struct.unpack(">QH", await c.recv_exact(10))
        assert size == 4 * MiB and not tflags & p.TF_READ_ONLY
        assert await c.recv_exact(124) == bytes(124)
        assert (await c.write(0, b"z" * 512)).error == 0
        assert await c.read(0, 512) == b"z" * 512
        await c.disconnect()
        assert await c.closed_by_server()  # the worker's close ends it: the supervisor kept no copy


async def test_malformed_or_unknown_choices_are_refused_by_the_supervisor_unhanded(host: Host, tmp_path: Path) -> None:
    await host.add("vm1", {"d0": 4 * MiB})
    svc, path = await front(host, tmp_path)
    c = await RawClient.connect_unix(path)
    await c.greet()
    with trio.fail_after(DEADLINE):
        assert (await c.option(p.OPT_GO, b"\x00\x00\x00\x09ab"))[-1][0] == p.REP_ERR_INVALID  # name past the data
        assert (await c.option(p.OPT_GO, c.go_data("vm1/d0") + b"junk"))[-1][0] == p.REP_ERR_INVALID
        assert (await c.option(p.OPT_GO, b"\x00\x00\x00\x02\xff\xfe\x00\x00"))[-1][0] == p.REP_ERR_INVALID  # not UTF-8
        assert (await c.option(p.OPT_LIST, b"x"))[-1][0] == p.REP_ERR_INVALID
        assert (await c.option(p.OPT_SET_META_CONTEXT, c.meta_data("vm1/d0", ["base:allocation"])))[-1][0] \
            == p.REP_ERR_INVALID  # before structured replies
        unknown_vm = await c.option(p.OPT_GO, c.go_data("vm9/d0"))
        assert unknown_vm[-1][0] == p.REP_ERR_UNKNOWN and b"no worker serves VM 'vm9'" in unknown_vm[-1][1]
        unknown_disk = await c.option(p.OPT_GO, c.go_data("vm1/nope"))  # the worker says so; nothing handed
        assert unknown_disk[-1][0] == p.REP_ERR_UNKNOWN and b"nope" in unknown_disk[-1][1]
        assert (await c.option(p.OPT_INFO, c.go_data("vm1")))[-1][0] == p.REP_ERR_UNKNOWN
        assert (await c.option(p.OPT_STARTTLS))[-1][0] == p.REP_ERR_POLICY
        assert (await c.option(99))[-1][0] == p.REP_ERR_UNSUP
        await c.send(p.OPTION_HEADER.pack(0x1234, p.OPT_GO, 0))  # a wrong option magic: hang up
        assert await c.closed_by_server()
        for header in (p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, 6) + b"vm9/d0",  # old option: hang up
                       p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_GO, p.MAX_OPTION_LEN + 1)):
            c = await RawClient.connect_unix(path)
            await c.greet()
            await c.send(header)
            assert await c.closed_by_server()
        c = await RawClient.connect_unix(path)
        await c.greet(0)  # not fixed newstyle
        assert await c.closed_by_server()
    assert host.handed() == 0
    assert isinstance(svc.server, FrontServer) and svc.server.handed == 0
    await wait_until(lambda: svc.server.active == 0, what="every refused connection closed by the supervisor")


async def test_info_and_list_are_answered_from_the_workers_and_a_gone_worker_is_refused(
        host: Host, tmp_path: Path) -> None:
    await host.add("vm1", {"d0": 4 * MiB})
    w2 = await host.add("vm2", {"d": MiB})
    _, path = await front(host, tmp_path)
    c = await RawClient.connect_unix(path)
    await c.greet()
    with trio.fail_after(DEADLINE):
        listed = await c.option(p.OPT_LIST)
        names = [d[4 : 4 + struct.unpack(">I", d[:4])[0]].decode() for t, d in listed if t == p.REP_SERVER]
        assert names == ["vm1/d0", "vm2/d"]
        info = await c.option(p.OPT_INFO, c.go_data("vm2/d", (p.INFO_NAME, p.INFO_DESCRIPTION)))
        kinds = {struct.unpack(">H", d[:2])[0]: d[2:] for t, d in info if t == p.REP_INFO}
        assert struct.unpack(">Q", kinds[p.INFO_EXPORT][:8])[0] == MiB and kinds[p.INFO_NAME] == b"vm2/d"
        w2.supervisor_end.close()  # the worker of vm2 is gone
        w2.channel.close()
        assert (await c.option(p.OPT_GO, c.go_data("vm2/d")))[-1][0] == p.REP_ERR_UNKNOWN
        listed = await c.option(p.OPT_LIST)
        assert [t for t, _ in listed].count(p.REP_SERVER) == 1
        assert (await c.option(p.OPT_GO, c.go_data("vm1/d0")))[-1][0] == p.REP_ACK  # the client chose again
        assert (await c.write(0, b"a" * 512)).error == 0
    assert host.handed() == 1


async def test_a_stalled_handshake_is_cut_and_the_cap_holds(host: Host, tmp_path: Path) -> None:
    await host.add("vm1", {"d0": MiB})
    svc, path = await front(host, tmp_path, Limits(handshake_timeout=0.5, max_connections=1))
    c = await RawClient.connect_unix(path)
    await c.greet()
    extra = await RawClient.connect_unix(path)
    with trio.fail_after(DEADLINE):
        assert await extra.closed_by_server()  # over the cap: closed unread
        assert await c.closed_by_server()  # said nothing more: cut
    await wait_until(lambda: svc.server.active == 0, what="the stalled connection closed")
    assert host.handed() == 0


async def test_a_worker_drops_malformed_handovers(host: Host) -> None:
    w = await host.add("vm1", {"d0": MiB})
    for msg in ({"export": "vm1/d0", "option": {"code": p.OPT_INFO}, "flags": 3},
                {"export": "vm1/d0", "option": {"code": p.OPT_GO, "infos": [9]}, "flags": 3},
                {"export": "vm1/d0", "option": {"code": p.OPT_GO}, "flags": 0},
                {"export": 5, "option": {"code": p.OPT_GO}, "flags": 3}):
        with pytest.raises(ValueError):
            resume_of(msg)
        a, b = trio.socket.socketpair()
        assert not serve_handed_over(w.service, [b.detach()], msg)
        with trio.fail_after(DEADLINE):
            assert await a.recv(16) == b""  # closed by the worker, nothing sent
        a.close()
    good = {"export": "vm1/d0", "option": {"code": p.OPT_GO, "infos": [p.INFO_NAME]}, "flags": 3}
    assert resume_of(good) == Resume(p.OPT_GO, "vm1/d0", (p.INFO_NAME,), 3, False, None)
    a, b = trio.socket.socketpair()
    assert not serve_handed_over(None, [b.detach()], good)  # no NBD in this worker
    with trio.fail_after(DEADLINE):
        assert await a.recv(16) == b""
    a.close()
    fd = os.open(os.devnull, os.O_RDONLY)
    assert not serve_handed_over(w.service, [fd], good)  # not a socket: closed, nothing raised
    with pytest.raises(OSError):
        os.fstat(fd)


async def test_tcp_is_handed_over_too_and_starttls_is_refused_with_the_reason(host: Host) -> None:
    w = await host.add("vm1", {"d0": MiB})
    svc = await start_front(host.nursery, host.channels, socket_path=None, tcp=("127.0.0.1", 0))
    port = int(svc.addresses[0].rsplit(":", 1)[1])
    c = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
    await c.greet()
    with trio.fail_after(DEADLINE):
        refused = await c.option(p.OPT_STARTTLS)
        assert refused[-1][0] == p.REP_ERR_POLICY and b"cannot be handed to a worker" in refused[-1][1]
        assert (await c.option(p.OPT_GO, c.go_data("vm1/d0")))[-1][0] == p.REP_ACK
        assert (await c.write(512, b"t" * 512)).error == 0
    assert bytes(await w.store.disk("vm1", "d0").read(512, 512)) == b"t" * 512
    assert w.handed[0]["peer"].startswith("#1 (127.0.0.1:")
    await svc.stop()
