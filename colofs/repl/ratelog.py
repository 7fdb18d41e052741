"""Log lines that strangers can trigger, at most one per kind per interval.

A peer that opens connections as fast as it can must not be able to fill
the store's file system with our log: each kind of line (a fixed, small set
chosen by the code, never a peer-supplied string) is written at most once
per ``interval``; the lines dropped meanwhile are counted, and the next one
let through says how many there were.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Kind:
    last: float
    suppressed: int = 0


class RateLimitedLog:
    """One logger's lines, rate-limited per kind; hand one to each part that logs on a stranger's behalf."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}

    def log(self, kind: str, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless a line of ``kind`` went out less than ``interval`` ago; True if logged."""
        now = self._clock()
        k = self._kinds.get(kind)
        if k is not None and now - k.last < self.interval:
            k.suppressed += 1
            return False
        dropped = k.suppressed if k is not None else 0
        self._kinds[kind] = _Kind(now)
        if dropped:
            msg = f"{msg} ({dropped} more like this suppressed)"
        self.logger.log(level, msg, *args)
        return True

    def warning(self, kind: str, msg: str, *args: object) -> bool:
        return self.log(kind, logging.WARNING, msg, *args)

    def info(self, kind: str, msg: str, *args: object) -> bool:
        return self.log(kind, logging.INFO, msg, *args)

    def suppressed(self) -> dict[str, int]:
        """Lines dropped per kind and not yet reported by a later line."""
        return {kind: k.suppressed for kind, k in self._kinds.items() if k.suppressed}
