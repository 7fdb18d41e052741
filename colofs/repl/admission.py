"""Which connections a secondary holds: strangers are bounded apart from authenticated sessions.

Before its handshake completes a connection could be anyone, so those are
counted on their own: at most ``per_source`` from one address and
``total`` altogether. A newcomer past its address's limit is turned away at
accept, before a byte is read. When only the total is reached, a newcomer
from an address holding no pending connection (or two fewer than the
busiest address) takes the place of the busiest address's oldest one;
otherwise it is turned away. That way strangers from other addresses can
never keep the primary out: its address gets a slot, and a pending
handshake lasts one round trip for a peer with the key. Strangers whose
addresses hold about as many as each other are not swapped back and forth.
Authenticated connections count against ``sessions`` only, so they always
have room whatever the strangers hold.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import trio

# Why a connection was turned away or dropped; the keys of ``Admission.refused``.
SOURCE_LIMIT = "source_limit"
PENDING_LIMIT = "pending_limit"
EVICTED = "evicted"
SESSION_LIMIT = "session_limit"
HANDSHAKE_FAILED = "handshake_failed"
HANDSHAKE_TIMEOUT = "handshake_timeout"
REASONS = (SOURCE_LIMIT, PENDING_LIMIT, EVICTED, SESSION_LIMIT, HANDSHAKE_FAILED, HANDSHAKE_TIMEOUT)


@dataclass(eq=False)
class Ticket:
    """One admitted connection; its handshake runs inside ``scope`` so that it can be displaced."""

    source: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    authenticated: bool = False
    evicted: bool = False
    released: bool = False


class Admission:
    """Counts pending (unauthenticated) connections per address and in total, and sessions apart."""

    def __init__(self, *, total: int, per_source: int, sessions: int) -> None:
        self.total = total
        self.per_source = per_source
        self.sessions = sessions
        self._pending: dict[str, list[Ticket]] = {}
        self._npending = 0
        self._nsessions = 0
        self.refused: Counter[str] = Counter({r: 0 for r in REASONS})

    @property
    def pending(self) -> int:
        return self._npending

    @property
    def open_sessions(self) -> int:
        return self._nsessions

    def admit(self, source: str) -> Ticket | str:
        """A ticket for a new connection from ``source``, or the reason to close it unread."""
        mine = self._pending.get(source, [])
        if len(mine) >= self.per_source:
            self.refused[SOURCE_LIMIT] += 1
            return SOURCE_LIMIT
        if self._npending >= self.total:
            busiest = max(self._pending.values(), key=len)
            if mine and len(mine) + 2 > len(busiest):
                self.refused[PENDING_LIMIT] += 1
                return PENDING_LIMIT
            self._evict(busiest[0])
        ticket = Ticket(source)
        self._pending.setdefault(source, []).append(ticket)
        self._npending += 1
        return ticket

    def _evict(self, ticket: Ticket) -> None:
        self._drop_pending(ticket)
        ticket.evicted = True
        ticket.scope.cancel()
        self.refused[EVICTED] += 1

    def _drop_pending(self, ticket: Ticket) -> None:
        mine = self._pending[ticket.source]
        mine.remove(ticket)
        if not mine:
            del self._pending[ticket.source]
        self._npending -= 1

    def authenticated(self, ticket: Ticket) -> bool:
        """Move a connection that proved the key from pending to sessions; False if sessions are full."""
        assert not ticket.authenticated and not ticket.evicted and not ticket.released
        self._drop_pending(ticket)
        if self._nsessions >= self.sessions:
            ticket.released = True
            self.refused[SESSION_LIMIT] += 1
            return False
        ticket.authenticated = True
        self._nsessions += 1
        return True

    def release(self, ticket: Ticket) -> None:
        """The connection closed (idempotent)."""
        if ticket.released or ticket.evicted:
            ticket.released = True
            return
        ticket.released = True
        if ticket.authenticated:
            self._nsessions -= 1
        else:
            self._drop_pending(ticket)

    def count(self, reason: str) -> None:
        """Count a refusal decided elsewhere (a failed or timed-out handshake)."""
        self.refused[reason] += 1

    def status(self) -> dict[str, object]:
        return {"pending": self._npending, "pending_sources": len(self._pending),
                "refused_by_reason": dict(self.refused)}
