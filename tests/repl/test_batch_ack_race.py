"""A batch's ACK may be read before the send of that batch returns: the link must already count it as sent.

trio yields after the last chunk of a frame is in the kernel; a quick
secondary's ACK can be read and handled by the link's reader before the
sender task resumes. The link once recorded the batch as sent only after
the send returned, and took such an ACK for one of a write never sent (a
protocol error, and a reconnection).
"""

from __future__ import annotations

import trio
import trio.testing

from colofs.core import Store
from colofs.core.forward import ForwardedWrite
from colofs.repl.config import ReplConfig
from colofs.repl.framing import FrameSender
from colofs.repl.linkstate import Conn, LinkState
from colofs.repl.sender import VMLink
from colofs.wire import NonceRegistry
from colofs.wire.messages import Ack, Batch, Checkpoint, CheckpointDone
from colofs.wire.stream import FrameStream
from tests.waiting import wait_until

SIZE = 1 << 20


class YieldingStream(trio.abc.Stream):
    """A real socket stream that lets every other task run after each send, as a busy loop may."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data) -> None:  # type: ignore[no-untyped-def]
        await self.inner.send_all(data)
        await trio.testing.wait_all_tasks_blocked()  # the peer answers, the reader reads, before we resume

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _secondary(fs: FrameStream) -> None:
    """Answers each batch with its ACK and each checkpoint marker with its confirmation, at once."""
    while True:
        msg = await fs.receive()
        if isinstance(msg, Batch):
            await fs.send(Ack(msg.last_seq))
        elif isinstance(msg, Checkpoint):
            await fs.send(CheckpointDone(msg.seq, msg.id))


async def test_an_ack_read_before_the_send_returns_is_for_a_sent_batch(tmp_path) -> None:
    store = await Store.open(str(tmp_path / "p"), role="primary", create=True)
    try:
        await store.create_disk("vm", "d0", SIZE)
        vm = store.vm("vm")
        link = VMLink(vm, ("127.0.0.1", 1), None, node_id="p", config=ReplConfig(), nonces=NonceRegistry())
        a, b = trio.socket.socketpair()
        ours = FrameStream(YieldingStream(trio.SocketStream(a)))
        theirs = FrameStream(trio.SocketStream(b))
        conn = Conn(ours, FrameSender(ours), "s")
        conn.disk_index = {"d0": 0}
        conn.next_seq = 1
        link.life.move(LinkState.STREAMING)
        tracking = link.tracking
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_secondary, theirs)
            nursery.start_soon(link._reader, conn)  # raises on an ACK outside what was sent
            for seq in range(1, 9):
                tracking.put_nowait(ForwardedWrite(seq, "d0", seq * 4096, bytes([seq]) * 4096))
            assert await link.batching.send_ready(conn, 4)
            await trio.testing.wait_all_tasks_blocked()
            assert (conn.sent_upto, tracking.acked) == (4, 4)
            vm.state.last_applied = 8  # the core numbered writes 1..8 (handed over by hand above)
            result: list[object] = []

            async def checkpoint_now() -> None:  # its marker goes out right behind write 8
                result.append(await link.checkpoints.replicate_checkpoint(timeout=30))

            nursery.start_soon(checkpoint_now)
            await trio.testing.wait_all_tasks_blocked()
            assert await link.batching.send_ready(conn, None)
            await trio.testing.wait_all_tasks_blocked()
            assert (conn.sent_upto, tracking.acked) == (8, 8)
            await wait_until(lambda: result, what="the checkpoint confirmed")  # its record is written in a thread
            nursery.cancel_scope.cancel()
    finally:
        await store.close()
