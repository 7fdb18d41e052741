"""Hostile frames after a valid handshake: the session ends, the frame changes nothing, others go on.

Every example is a fresh trio run against the same secondary store (closed
cleanly between examples): one healthy primary connection for VM ``other``,
one hand-driven connection for VM ``fuzz`` that sends exactly one bad frame
(mutated bytes, a truncated frame, an oversized or lz4-bomb header, or a
well-formed frame whose content the protocol forbids). Afterwards every file
of VM ``fuzz``, its state and its view are unchanged, and ``other`` still
gets its batch applied and acknowledged.
"""

from __future__ import annotations

import functools
import os
import struct

import trio
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colofs.core import Store
from colofs.repl import ReplConfig, serve_secondary
from colofs.wire import NonceRegistry
from colofs.wire.frames import DEFAULT_MAX_RAW_LEN, DEFAULT_MAX_WIRE_LEN, encode_frame
from colofs.wire.messages import (
    Ack,
    Attach,
    Attached,
    Batch,
    Checkpoint,
    CheckpointDone,
    DiskAdd,
    DiskInfo,
    Error,
    Hello,
    MessageType,
    Pong,
    ResyncBlock,
    ResyncData,
    ResyncDone,
    ResyncQuery,
    ResyncRequest,
    Write,
)
from tests.repl.rawpeer import RawPrimary
from tests.waiting import DEADLINE, wait_until

FUZZ_DISKS = [DiskInfo("d0", 64 << 10, 4096), DiskInfo("d1", (16 << 10) + 512, 512)]
OTHER_DISKS = [DiskInfo("d0", 64 << 10, 4096)]
CFG = ReplConfig(handshake_timeout=3.0, peer_timeout=3.0)


def _header(mtype: int, flags: int, wire_len: int, raw_len: int) -> bytes:
    prefix = struct.pack("<4sBBHII", b"COLF", 1, mtype, flags, wire_len, raw_len)
    return prefix + struct.pack("<Q", xxhash.xxh3_64_intdigest(prefix))


def _semantic(kind: str, n: int, seq: int) -> bytes:
    """A well-formed frame that a secondary at ``seq`` must refuse."""
    ok = Write(0, 0, b"x" * 10)
    msgs = {
        "replay": lambda: Batch(max(1, seq - n % 3), (ok,)) if seq else Batch(0, (ok,)),
        "skip": lambda: Batch(seq + 2 + n, (ok,)),
        "range": lambda: Batch(seq + 1, (Write(0, (64 << 10) - n % 100, b"y" * 101),)),
        "disk_index": lambda: Batch(seq + 1, (Write(2 + n % 5, 0, b"y"),)),
        "empty_write": lambda: Batch(seq + 1, (Write(0, 0, b""),)),
        "mixed": lambda: Batch(seq + 1, (ok, Write(1, (16 << 10) + 400, b"z" * 200))),
        "checkpoint_seq": lambda: Checkpoint(seq + 1 + n, 1),
        "resync_bs": lambda: ResyncData(0, 512, (ResyncBlock(0, b"a" * 512),)),
        "resync_range": lambda: ResyncData(0, 4096, (ResyncBlock(16 + n, b"a" * 4096),)),
        "resync_len": lambda: ResyncData(0, 4096, (ResyncBlock(15, b"a" * (4000 + n)),)),
        "resync_done": lambda: ResyncDone(seq + 1 + n),
        "query_range": lambda: ResyncQuery(0, 10, 7 + n),
        "disk_add_index": lambda: DiskAdd(5 + n % 3, DiskInfo("new", 4096, 4096)),
        "disk_add_dup": lambda: DiskAdd(2, DiskInfo("d0", 64 << 10, 4096)),
        "unexpected": lambda: [Ack(1), Attached("fuzz", 1, 0, 0), CheckpointDone(0, 0), Pong(1),
                               ResyncRequest(0, 0, (1,)), Attach("fuzz", 1, 1, ()),
                               Hello(1, "x", 1, bytes(32))][n % 7],
        "error": lambda: Error(3, "the primary gives up"),
    }
    return encode_frame(msgs[kind]())


KINDS = ["replay", "skip", "range", "disk_index", "empty_write", "mixed", "checkpoint_seq", "resync_bs",
         "resync_range", "resync_len", "resync_done", "query_range", "disk_add_index", "disk_add_dup",
         "unexpected", "error"]

cases = st.one_of(
    st.tuples(st.just("mutate"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                          min_size=1, max_size=4), st.binary(min_size=1, max_size=3000)),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999), st.binary(min_size=1, max_size=3000)),
    st.tuples(st.just("oversize"), st.integers(DEFAULT_MAX_WIRE_LEN + 1, 2**32 - 1), st.just(b"")),
    st.tuples(st.just("bomb"), st.integers(DEFAULT_MAX_RAW_LEN + 1, 2**32 - 1), st.just(b"")),
    st.tuples(st.just("semantic"), st.sampled_from(KINDS), st.integers(0, 50)),
)


def _materialise(case: tuple, seq: int) -> bytes:
    kind, a, b = case
    if kind in ("mutate", "truncate"):
        frame = bytearray(encode_frame(Batch(seq + 1, (Write(0, 100, bytes(b)), Write(1, 0, bytes(b[:512]) or b"q")))))
        if kind == "mutate":
            original = bytes(frame)
            for pos, xor in a:
                frame[pos % len(frame)] ^= xor
            if frame == original:  # the flips cancelled out
                frame[0] ^= 0xFF
            return bytes(frame)
        return bytes(frame[: max(1, int(len(frame) * a))])
    if kind == "oversize":
        return _header(MessageType.BATCH, 0, a, a)
    if kind == "bomb":
        return _header(MessageType.BATCH, 1, 1000, a)
    return _semantic(a, b, seq)


def _snapshot(store_path: str, vm: str) -> dict[str, bytes]:
    out = {}
    root = os.path.join(store_path, vm)
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


async def _example(path: str, case: tuple) -> None:
    store = await Store.open(path, role="secondary", create=True)
    try:
        if "fuzz" not in store.vms:
            for d in FUZZ_DISKS:
                await store.create_disk("fuzz", d.name, d.size, block_size=d.block_size)
            await store.create_disk("other", "d0", 64 << 10)
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(serve_secondary, config=CFG, nonces=NonceRegistry()),
                store, ("127.0.0.1", 0), None)
            other = await RawPrimary.connect(server.port, "other", OTHER_DISKS)
            bad = await RawPrimary.connect(server.port, "fuzz", FUZZ_DISKS)
            fvm = store.vm("fuzz")
            before_files = _snapshot(store.path, "fuzz")
            before_state = (fvm.state.last_applied, fvm.state.last_checkpoint, fvm.state.gen, fvm.state.epoch)
            before_view = {n: bytes(await d.read(0, d.size)) for n, d in fvm.disks.items()}

            await bad.stream.send_all(_materialise(case, fvm.state.last_applied))
            if case[0] == "truncate":
                await bad.stream.send_eof()
            # A short first look: a frame cut short keeps the secondary waiting for the rest until
            # we close our side, and either way the connection must end (the deadline decides).
            closed, _err = await bad.until_closed(0.2)
            if not closed:
                await bad.stream.send_eof()
                closed, _err = await bad.until_closed(DEADLINE)
            assert closed, f"the secondary kept the connection open after {case[0]}"
            await wait_until(lambda: "fuzz" not in server.sessions, what="the fuzzed session to end")
            await bad.aclose()

            assert (fvm.state.last_applied, fvm.state.last_checkpoint, fvm.state.gen,
                    fvm.state.epoch) == before_state
            assert _snapshot(store.path, "fuzz") == before_files
            assert {n: bytes(await d.read(0, d.size)) for n, d in fvm.disks.items()} == before_view

            # The other VM's connection is unaffected.
            seq = store.vm("other").state.last_applied + 1
            await other.send(Batch(seq, (Write(0, (seq * 512) % (60 << 10), b"ok" * 64),)))
            with trio.fail_after(DEADLINE):
                ack = await other.receive()
            assert isinstance(ack, Ack) and ack.seq == seq
            await other.aclose()
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


@settings(max_examples=250, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases)
def test_hostile_frames_change_nothing(tmp_path, case) -> None:
    trio.run(_example, os.path.join(tmp_path, "store"), case)
