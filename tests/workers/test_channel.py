"""The supervisor–worker channel: requests and replies, errors, descriptors, and the other end going away."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import pytest
import trio

from colofs.core.errors import NotFound
from colofs.workers.channel import (
    MAX_MESSAGE,
    Channel,
    ChannelClosed,
    RemoteError,
    WorkerArgs,
    channel_pair,
    encode,
)


async def _serve(ch: Channel, nursery: trio.Nursery, handler: Any) -> None:
    nursery.start_soon(ch.run, handler)


async def test_call_gets_its_reply_and_errors_keep_their_errno() -> None:
    a, b = channel_pair()
    sup, wrk = Channel(a, label="sup"), Channel(b, label="wrk")

    async def handler(msg: dict[str, Any], fds: list[int]) -> dict[str, Any] | None:
        if msg["op"] == "echo":
            return {"value": msg["value"] * 2}
        if msg["op"] == "missing":
            raise NotFound("VM vm9 does not exist")
        if msg["op"] == "refused":
            raise RemoteError("no room", errno.ENOSPC)
        raise ValueError("boom")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run, handler)
        nursery.start_soon(wrk.run, handler)
        assert (await sup.call("echo", timeout=30, value=21))["value"] == 42
        assert (await wrk.call("echo", timeout=30, value=1))["value"] == 2  # both directions
        with pytest.raises(RemoteError) as ei:
            await sup.call("missing", timeout=30)
        assert ei.value.errno == errno.ENOENT and "vm9" in ei.value.message
        with pytest.raises(RemoteError) as ei:
            await sup.call("refused", timeout=30)
        assert ei.value.errno == errno.ENOSPC
        with pytest.raises(RemoteError) as ei:
            await sup.call("other", timeout=30)
        assert ei.value.errno == errno.EIO and "boom" in ei.value.message
        sup.close()
        wrk.close()


async def test_a_descriptor_crosses_and_works_on_the_other_side() -> None:
    a, b = channel_pair()
    sup, wrk = Channel(a), Channel(b)
    got: list[int] = []
    arrived = trio.Event()

    async def handler(msg: dict[str, Any], fds: list[int]) -> None:
        assert msg == {"op": "connection", "peer": "127.0.0.1:1"}
        got.extend(fds)
        arrived.set()

    left, right = socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wrk.run, handler)
        await sup.notify("connection", fds=[right.fileno()], peer="127.0.0.1:1")
        right.close()  # the receiver has its own copy now
        await arrived.wait()
        assert len(got) == 1
        mine = socket.socket(fileno=got[0])
        left.sendall(b"hello")
        assert mine.recv(5) == b"hello"
        mine.close()
        left.close()
        sup.close()
        wrk.close()


async def test_a_pending_call_fails_when_the_other_end_exits() -> None:
    a, b = channel_pair()
    sup = Channel(a)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run, lambda msg, fds: None)

        async def worker_dies() -> None:
            await trio.testing.wait_all_tasks_blocked()
            b.close()  # as a killed worker's end is closed by the kernel

        nursery.start_soon(worker_dies)
        with pytest.raises(ChannelClosed):
            await sup.call("ping", timeout=60)
        await sup.closed.wait()
        with pytest.raises(ChannelClosed):
            await sup.notify("ping")
    sup.close()


async def test_a_slow_request_does_not_hold_up_a_ping() -> None:
    a, b = channel_pair()
    sup, wrk = Channel(a), Channel(b)
    release = trio.Event()

    async def handler(msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        if msg["op"] == "slow":
            await release.wait()
        return {"op_was": msg["op"]}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run, handler)
        nursery.start_soon(wrk.run, handler)
        result: dict[str, Any] = {}

        async def slow() -> None:
            result.update(await sup.call("slow", timeout=60))

        nursery.start_soon(slow)
        assert (await sup.call("ping", timeout=60))["op_was"] == "ping"
        assert not result
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert result["op_was"] == "slow"
        sup.close()
        wrk.close()


def test_oversized_messages_are_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="limit"):
        encode({"op": "x", "blob": "y" * MAX_MESSAGE})


def test_worker_args_survive_json() -> None:
    args = WorkerArgs(vm="vm1", argv=["--role", "primary", "/mnt"], restarts=2, create_vm="primary",
                      extra={"max_retained_total_bytes": 1 << 20})
    import json
    assert WorkerArgs.from_json(json.loads(json.dumps(args.to_json()))) == args


def test_channel_pair_ends_are_not_inherited_by_exec() -> None:
    a, b = channel_pair()
    try:
        assert not os.get_inheritable(a.fileno()) and not os.get_inheritable(b.fileno())
    finally:
        a.close()
        b.close()
