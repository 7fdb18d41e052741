"""One way for tests to wait for an outcome: poll a predicate until it holds or a deadline passes.

Deadlines are generous (they only bound a hang, never decide a result), and a timeout fails with
what was awaited and the last value seen, so a red run says what was missing.

A predicate may return any value: a truthy one ends the wait and is returned; a falsy one is kept
as "last seen" for the failure message. A predicate that raises is treated as not yet true, and its
exception is reported if the deadline passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")

DEADLINE = 60.0
"""Default deadline in seconds: long enough for a machine three times slower than usual."""

_POLL = 0.01


class _Last:
    def __init__(self) -> None:
        self.value: object = None

    def probe(self, pred: Callable[[], T], catch: tuple[type[BaseException], ...]) -> T | None:
        try:
            got = pred()
        except catch as e:
            self.value = e
            return None
        self.value = got
        return got if got else None

    def fail(self, what: str, timeout: float) -> AssertionError:
        return AssertionError(f"timed out after {timeout} s waiting for {what}; last seen: {self.value!r}")


def wait_until_sync(
    pred: Callable[[], T],
    timeout: float = DEADLINE,
    what: str = "condition",
    catch: tuple[type[BaseException], ...] = (),
) -> T:
    """Block until ``pred()`` is truthy and return its value; exceptions in ``catch`` count as false."""
    last = _Last()
    deadline = time.monotonic() + timeout
    delay = _POLL
    while True:
        got = last.probe(pred, catch)
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise last.fail(what, timeout)
        time.sleep(delay)  # polling pace, not an outcome: the deadline bounds the wait
        delay = min(delay * 1.5, 0.1)


async def wait_until(
    pred: Callable[[], T],
    timeout: float = DEADLINE,
    what: str = "condition",
    catch: tuple[type[BaseException], ...] = (),
) -> T:
    """The trio form of :func:`wait_until_sync`: other tasks run between polls."""
    last = _Last()
    deadline = trio.current_time() + timeout
    delay = _POLL
    while True:
        got = last.probe(pred, catch)
        if got is not None:
            return got
        if trio.current_time() > deadline:
            raise last.fail(what, timeout)
        await trio.sleep(delay)  # polling pace, not an outcome: the deadline bounds the wait
        delay = min(delay * 1.5, 0.1)
