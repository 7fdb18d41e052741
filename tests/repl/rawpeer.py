"""A hand-driven primary for tests: handshake and ATTACH done, then any bytes the test likes."""

from __future__ import annotations

import trio

from colofs.repl.handshake import handshake
from colofs.wire import FrameStream, NonceRegistry
from colofs.wire.messages import Attach, Attached, DiskInfo, Error, Message, Role


class RawPrimary:
    def __init__(self, stream: trio.SocketStream, fs: FrameStream, attached: Attached) -> None:
        self.stream = stream
        self.fs = fs
        self.attached = attached

    @classmethod
    async def connect(cls, port: int, vm: str, disks: list[DiskInfo], *, epoch: int = 1,
                      key: bytes | None = None) -> RawPrimary:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        fs = FrameStream(stream)
        await handshake(fs, key, f"raw-{vm}", Role.PRIMARY, initiator=True, nonces=NonceRegistry(), timeout=5)
        await fs.send(Attach(vm, epoch, 1, tuple(disks)))
        msg = await fs.receive()
        if not isinstance(msg, Attached):
            raise AssertionError(f"attach refused: {msg}")
        return cls(stream, fs, msg)

    async def send(self, msg: Message) -> None:
        await self.fs.send(msg)

    async def receive(self) -> Message:
        return await self.fs.receive()

    async def until_closed(self, timeout: float) -> tuple[bool, Error | None]:
        """Read until the peer closes (True) or ``timeout`` passes (False); the ERROR seen, if any."""
        err = None
        with trio.move_on_after(timeout):
            try:
                while True:
                    msg = await self.fs.receive()
                    if isinstance(msg, Error):
                        err = msg
            except Exception:
                return True, err
        return False, err

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
