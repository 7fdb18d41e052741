"""A TCP proxy on 127.0.0.1 that cuts connections at chosen byte counts, or holds one direction.

It sits between the primary and the secondary: ``budget()`` is asked, per
connection, how many bytes (both directions together) may pass before the
connection is cut abruptly -- possibly in the middle of a frame -- and
``hold_down`` stops the secondary-to-primary direction (acknowledgements)
while set.
"""

from __future__ import annotations

from collections.abc import Callable

import trio


class FaultProxy:
    def __init__(self, target_port: int, budget: Callable[[], int | None] = lambda: None) -> None:
        self.target_port = target_port
        self.budget = budget
        self.port = 0
        self.cuts = 0
        self.connections = 0
        self.hold_down = False
        self._release = trio.Event()
        self._scopes: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def release(self) -> None:
        self.hold_down = False
        self._release.set()
        self._release = trio.Event()

    def cut_all(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        left = [self.budget()]
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server, left, scope, False)
                    nursery.start_soon(self._pump, server, client, left, scope, True)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                self._scopes.discard(scope)
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, left: list[int | None],
                    scope: trio.CancelScope, down: bool) -> None:
        while True:
            data = await src.receive_some(65536)
            if not data:
                scope.cancel()
                return
            while down and self.hold_down:
                await self._release.wait()
            budget = left[0]
            if budget is not None:
                if len(data) >= budget:
                    if budget:
                        await dst.send_all(data[:budget])
                    self.cuts += 1
                    scope.cancel()
                    return
                left[0] = budget - len(data)
            await dst.send_all(data)
