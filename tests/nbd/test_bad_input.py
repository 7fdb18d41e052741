"""Malformed, out-of-range and oversized NBD requests: an error reply or a hang-up, and nothing applied.

"Nothing applied" is checked on the store's files: they are byte for byte
what they were before the bad requests (a secondary's write would land in
active.log, a primary's in base.raw).
"""

from __future__ import annotations

import struct

import trio

from colofs.nbd import protocol as p
from colofs.nbd.service import Limits
from tests.core.conftest import snapshot_tree
from tests.nbd.conftest import SIZE
from tests.waiting import DEADLINE


async def test_bad_requests_get_errors_and_change_nothing(serve) -> None:
    for role in ("secondary", "primary"):
        s = await serve(role)
        c = await s.connect()
        await c.write(0, b"k" * 4096)
        await c.call(p.CMD_FLUSH, 0, 0)
        before = snapshot_tree(s.store.path)
        cases = [
            # (type, offset, length, flags, payload, expected error)
            (p.CMD_READ, SIZE - 10, 11, 0, b"", p.EINVAL),
            (p.CMD_READ, SIZE, 1, 0, b"", p.EINVAL),
            (p.CMD_READ, (1 << 64) - 4096, 4096, 0, b"", p.EINVAL),
            (p.CMD_READ, 0, p.MAX_PAYLOAD + 1, 0, b"", p.EOVERFLOW),
            (p.CMD_READ, 0, 0, 0, b"", p.EINVAL),
            (p.CMD_WRITE, SIZE - 4095, 4096, 0, b"x" * 4096, p.ENOSPC),
            (p.CMD_WRITE, (1 << 64) - 1, 1, 0, b"x", p.ENOSPC),
            (p.CMD_WRITE, 0, 0, 0, b"", p.EINVAL),
            (p.CMD_WRITE, 0, 4096, 1 << 9, b"x" * 4096, p.EINVAL),  # unknown flag
            (p.CMD_WRITE, 0, 4096, p.CMD_FLAG_NO_HOLE, b"x" * 4096, p.EINVAL),  # not a write flag
            (p.CMD_WRITE_ZEROES, SIZE - 4096, 8192, 0, b"", p.ENOSPC),
            (p.CMD_TRIM, SIZE, 4096, 0, b"", p.EINVAL),
            (p.CMD_FLUSH, 4096, 0, 0, b"", p.EINVAL),
            (p.CMD_BLOCK_STATUS, SIZE - 1, 2, 0, b"", p.EINVAL),
            (5, 0, 4096, 0, b"", p.EINVAL),  # NBD_CMD_CACHE: not offered
            (200, 0, 4096, 0, b"", p.EINVAL),
        ]
        for typ, off, length, flags, payload, want in cases:
            r = await c.call(typ, off, length, flags=flags, payload=payload)
            assert r.error == want, (role, typ, off, length, flags, r.error, r.message)
        assert await c.read(0, 4096) == b"k" * 4096  # the connection still serves
        await c.disconnect()
        assert snapshot_tree(s.store.path) == before, role


async def test_block_status_needs_a_negotiated_context(serve) -> None:
    s = await serve()
    c = await s.connect(structured=True, meta=False)
    assert (await c.call(p.CMD_BLOCK_STATUS, 0, 4096)).error == p.EINVAL
    c = await s.connect(structured=False)
    assert (await c.call(p.CMD_BLOCK_STATUS, 0, 4096)).error == p.EINVAL


async def test_simple_replies_say_einval_for_an_oversized_read(serve) -> None:
    s = await serve()
    c = await s.connect(structured=False)
    assert (await c.call(p.CMD_READ, 0, p.MAX_PAYLOAD + 1)).error == p.EINVAL


async def test_oversized_write_payload_hangs_up_unapplied(serve) -> None:
    s = await serve()
    c = await s.connect()
    before = snapshot_tree(s.store.path)
    # The header announces more than the maximum payload: the server cannot skip it safely.
    await c.send(p.pack_request(p.CMD_WRITE, 7, 0, p.MAX_PAYLOAD + 1) + b"x" * 65536)
    with trio.fail_after(DEADLINE):
        assert await c.closed_by_server()
    assert snapshot_tree(s.store.path) == before


async def test_bad_request_magic_hangs_up(serve) -> None:
    s = await serve()
    c = await s.connect()
    await c.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, p.CMD_WRITE, 1, 0, 4) + b"evil")
    with trio.fail_after(DEADLINE):
        assert await c.closed_by_server()
    assert bytes(await s.store.disk("vm", "d").read(0, 4)) == bytes(4)


async def test_handshake_violations_hang_up(serve) -> None:
    s = await serve()
    # A client without the fixed newstyle flag, and one with unknown flags.
    for flags in (0, p.FLAG_FIXED_NEWSTYLE | 0x80):
        c = await s.client()
        await c.greet(flags)
        with trio.fail_after(DEADLINE):
            assert await c.closed_by_server()
    # Option data longer than any option needs; a wrong option magic.
    for header in (p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_GO, p.MAX_OPTION_LEN + 1),
                   p.OPTION_HEADER.pack(0x1234, p.OPT_GO, 0)):
        c = await s.client()
        await c.greet()
        await c.send(header)
        with trio.fail_after(DEADLINE):
            assert await c.closed_by_server()
    # Malformed GO data gets an error reply and the handshake goes on.
    c = await s.client()
    await c.greet()
    assert (await c.option(p.OPT_GO, b"\x00\x00\x00\x09ab"))[-1][0] == p.REP_ERR_INVALID
    assert (await c.option(p.OPT_GO, c.go_data("vm/d") + b"junk"))[-1][0] == p.REP_ERR_INVALID
    assert (await c.option(p.OPT_LIST, b"x"))[-1][0] == p.REP_ERR_INVALID
    assert (await c.option(p.OPT_GO, c.go_data("vm/d")))[-1][0] == p.REP_ACK
    # An unknown name with the old option: only a hang-up can refuse it.
    c = await s.client()
    await c.greet()
    await c.send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, 4) + b"nope")
    with trio.fail_after(DEADLINE):
        assert await c.closed_by_server()


async def test_too_many_options_hang_up(serve) -> None:
    s = await serve()
    c = await s.client()
    await c.greet()
    with trio.fail_after(DEADLINE):
        for _ in range(64):  # each answered; after the 64th the server stops listening
            assert (await c.option(99))[-1][0] == p.REP_ERR_UNSUP
        assert await c.closed_by_server()


async def test_a_stalled_handshake_is_cut(serve) -> None:
    s = await serve(limits=Limits(handshake_timeout=0.5))
    c = await s.client()
    await c.greet()  # then nothing: the server must not wait forever
    with trio.fail_after(DEADLINE):
        assert await c.closed_by_server()
    assert s.server.active == 0
