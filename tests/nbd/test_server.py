"""The NBD server over the core, without FUSE: every command's effect on the store, and negotiation."""

from __future__ import annotations

import struct

from colofs.nbd import protocol as p
from tests.nbd.conftest import SIZE
from tests.sink import RecordingSink


async def test_writes_reach_the_svm_view_and_read_back(serve) -> None:
    s = await serve("secondary")
    disk = s.store.disk("vm", "d")
    for structured in (False, True):
        c = await s.connect(structured=structured)
        assert c.size == SIZE and c.tflags & p.TF_READ_ONLY == 0
        data = bytes(range(256)) * 20
        assert (await c.write(1000, data)).error == 0
        assert bytes(await disk.read(1000, len(data))) == data  # the core's SVM view has it
        assert len(disk.active) > 0 and len(disk.hidden) == 0  # a secondary's own write goes to active
        assert await c.read(1000, len(data)) == data
        await c.disconnect()


async def test_pipelined_requests_all_answered(serve) -> None:
    s = await serve("secondary")
    c = await s.connect()
    burst = b""
    cookies = []
    for i in range(200):
        cookies.append(i * 2 + 1)
        burst += p.pack_request(p.CMD_WRITE, i * 2 + 1, i * 4096, 4096) + bytes([i % 251 + 1]) * 4096
        cookies.append(i * 2 + 2)
        burst += p.pack_request(p.CMD_READ, i * 2 + 2, i * 4096, 4096)
        c.reads[i * 2 + 2] = 4096
    await c.send(burst)  # everything at once: the server reads many requests per receive
    got = {r.cookie: r for r in [await c.reply() for _ in cookies]}  # in any order, each by its cookie
    assert sorted(got) == cookies
    assert all(r.error == 0 for r in got.values())
    for i in range(200):  # each read ran after the write to its block that came before it
        assert got[2 * i + 2].data == bytes([i % 251 + 1]) * 4096


async def test_primary_writes_are_forwarded_like_fuse_writes(serve) -> None:
    s = await serve("primary")
    vm = s.store.vm("vm")
    q = RecordingSink()
    vm.forward = q
    c = await s.connect()
    assert (await c.write(4096, b"P" * 8192, flags=p.CMD_FLAG_FUA)).error == 0
    batch = await q.get_batch(1 << 20)
    assert [(w.disk, w.offset, bytes(w.data)) for w in batch] == [("d", 4096, b"P" * 8192)]
    assert vm.state.last_applied == 1


async def test_write_zeroes_flush_trim(serve) -> None:
    s = await serve("secondary")
    disk = s.store.disk("vm", "d")
    c = await s.connect()
    await c.write(0, b"\xff" * (3 << 20))
    r = await c.call(p.CMD_WRITE_ZEROES, 4096, (2 << 20) + 5, flags=p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FUA)
    assert r.error == 0
    got = bytes(await disk.read(0, 3 << 20))
    assert got[:4096] == b"\xff" * 4096
    assert got[4096 : 4096 + (2 << 20) + 5] == bytes((2 << 20) + 5)
    assert got[4096 + (2 << 20) + 5 :] == b"\xff" * ((3 << 20) - 4096 - (2 << 20) - 5)
    assert (await c.call(p.CMD_FLUSH, 0, 0)).error == 0
    assert (await c.call(p.CMD_TRIM, 0, 4096)).error == 0
    assert bytes(await disk.read(0, 4096)) == b"\xff" * 4096  # trim is advisory: data kept


async def test_block_status_reports_holes_and_data(serve) -> None:
    s = await serve("primary")
    c = await s.connect()
    r = await c.call(p.CMD_BLOCK_STATUS, 0, SIZE)
    assert r.error == 0 and r.extents == [(SIZE, p.STATE_HOLE | p.STATE_ZERO)]
    await c.write(1 << 20, b"d" * 65536)
    r = await c.call(p.CMD_BLOCK_STATUS, 0, SIZE)
    assert r.extents[0] == (1 << 20, p.STATE_HOLE | p.STATE_ZERO)
    assert r.extents[1][1] == 0 and r.extents[1][0] >= 65536
    assert sum(n for n, _ in r.extents) == SIZE
    one = await c.call(p.CMD_BLOCK_STATUS, 0, SIZE, flags=p.CMD_FLAG_REQ_ONE)
    assert one.extents == [(1 << 20, p.STATE_HOLE | p.STATE_ZERO)]


async def test_block_status_sees_the_secondary_layers(serve) -> None:
    s = await serve("secondary")
    c = await s.connect()
    await c.write(8192, b"a" * 4096)  # into active; base stays a hole
    r = await c.call(p.CMD_BLOCK_STATUS, 0, 5 * 4096)
    assert r.extents == [(8192, 3), (4096, 0), (8192, 3)]


async def test_snapshot_export_is_read_only_and_frozen(serve) -> None:
    s = await serve("primary")
    disk = s.store.disk("vm", "d")
    await disk.write(0, b"old!" * 1024)
    await s.store.vm("vm").snapshot("nightly")
    await disk.write(0, b"new!" * 1024)
    c = await s.connect("/vm/d@nightly")
    assert c.tflags & p.TF_READ_ONLY
    assert await c.read(0, 4096) == b"old!" * 1024
    r = await c.write(0, b"x" * 4096)
    assert r.error == p.EPERM
    assert (await c.call(p.CMD_WRITE_ZEROES, 0, 4096)).error == p.EPERM
    assert await c.read(0, 4096) == b"old!" * 1024
    assert bytes(await disk.read(0, 4096)) == b"new!" * 1024


async def test_clone_export_is_writable_and_leaves_the_disk_alone(serve) -> None:
    s = await serve("primary")
    disk = s.store.disk("vm", "d")
    await disk.write(0, b"base" * 1024)
    await s.store.vm("vm").clone("d", "work")
    c = await s.connect("vm/d@work")
    assert not c.tflags & p.TF_READ_ONLY
    assert (await c.write(0, b"mine" * 1024)).error == 0
    assert await c.read(0, 4096) == b"mine" * 1024
    assert bytes(await disk.read(0, 4096)) == b"base" * 1024


async def test_list_info_and_unknown_exports(serve) -> None:
    s = await serve("primary")
    await s.store.vm("vm").snapshot("s1")
    c = await s.client()
    flags = await c.greet()
    assert flags & p.FLAG_FIXED_NEWSTYLE
    listed = await c.option(p.OPT_LIST)
    names = [d[4 : 4 + struct.unpack(">I", d[:4])[0]].decode() for t, d in listed if t == p.REP_SERVER]
    assert names == ["vm/d", "vm/d@s1"]
    info = await c.option(p.OPT_INFO, c.go_data("vm/d", (p.INFO_NAME, p.INFO_DESCRIPTION)))
    assert info[-1][0] == p.REP_ACK
    kinds = {struct.unpack_from(">H", d)[0] for t, d in info if t == p.REP_INFO}
    assert kinds == {p.INFO_EXPORT, p.INFO_NAME, p.INFO_DESCRIPTION, p.INFO_BLOCK_SIZE}
    for bad in ("vm/nope", "nope/d", "vm/d@nope", "", "vm"):
        assert (await c.option(p.OPT_GO, c.go_data(bad)))[-1][0] == p.REP_ERR_UNKNOWN, bad
    ctx = await c.option(p.OPT_LIST_META_CONTEXT, c.meta_data("vm/d", []))
    assert ctx[-1][0] == p.REP_ERR_INVALID  # structured replies first
    await c.option(p.OPT_STRUCTURED_REPLY)
    ctx = await c.option(p.OPT_LIST_META_CONTEXT, c.meta_data("vm/d", []))
    assert [(t, d[4:]) for t, d in ctx] == [(p.REP_META_CONTEXT, b"base:allocation"), (p.REP_ACK, b"")]
    assert (await c.option(p.OPT_STARTTLS))[-1][0] == p.REP_ERR_POLICY
    assert (await c.option(99))[-1][0] == p.REP_ERR_UNSUP
    assert (await c.option(p.OPT_ABORT))[-1][0] == p.REP_ACK
    assert await c.closed_by_server()


async def test_old_export_name_option(serve) -> None:
    s = await serve("secondary")
    c = await s.client()
    await c.greet(p.FLAG_FIXED_NEWSTYLE)  # without NO_ZEROES: 124 zero bytes follow
    await c.send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, 4) + b"vm/d")
    size, tflags = struct.unpack(">QH", await c.recv_exact(10))
    assert size == SIZE and await c.recv_exact(124) == bytes(124)
    assert (await c.write(0, b"z" * 512)).error == 0
    assert await c.read(0, 512) == b"z" * 512
