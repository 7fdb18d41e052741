"""Admission of connections before their handshake, and rate-limited log lines: the rules on their own."""

from __future__ import annotations

import logging

from colofs.repl.admission import (
    EVICTED,
    PENDING_LIMIT,
    SESSION_LIMIT,
    SOURCE_LIMIT,
    Admission,
    Ticket,
)
from colofs.repl.ratelog import RateLimitedLog


def test_strangers_are_bounded_per_address_and_in_total_and_sessions_always_have_room() -> None:
    adm = Admission(total=6, per_source=3, sessions=2)
    a = [adm.admit("10.0.0.1") for _ in range(3)]
    assert all(isinstance(t, Ticket) for t in a)
    assert adm.admit("10.0.0.1") == SOURCE_LIMIT
    b = [adm.admit("10.0.0.2") for _ in range(3)]
    assert adm.pending == 6
    # Full: an address holding as many as the busiest is turned away ...
    assert adm.admit("10.0.0.2") == SOURCE_LIMIT
    # ... one holding fewer takes the place of the busiest address's oldest connection.
    p = adm.admit("10.0.0.9")
    assert isinstance(p, Ticket) and a[0].evicted and a[0].scope.cancel_called
    assert adm.pending == 6
    q = adm.admit("10.0.0.9")  # 10.0.0.2 is now the busiest
    assert isinstance(q, Ticket) and b[0].evicted and adm.refused[EVICTED] == 2
    assert adm.admit("10.0.0.9") == PENDING_LIMIT  # every address holds 2: nobody is fairer to drop
    adm.release(a[1])
    s = adm.admit("10.0.0.8")  # a free slot
    assert isinstance(s, Ticket) and adm.pending == 6
    assert adm.admit("10.0.0.1") == PENDING_LIMIT  # 1 against 2: strangers are not swapped back and forth
    # The primary proves the key: it leaves the pending count and holds a session.
    assert adm.authenticated(p)
    assert adm.authenticated(q)
    assert (adm.open_sessions, adm.pending) == (2, 4)
    r = adm.admit("10.0.0.8")
    assert isinstance(r, Ticket)
    assert not adm.authenticated(r)  # sessions full
    assert adm.refused[SESSION_LIMIT] == 1
    for t in [*a, *b, p, q, r, s]:
        assert isinstance(t, Ticket)
        adm.release(t)
        adm.release(t)  # idempotent
    assert (adm.pending, adm.open_sessions, adm.status()["pending_sources"]) == (0, 0, 0)


def test_rate_limited_log_says_how_many_lines_it_dropped(caplog) -> None:
    caplog.set_level(logging.INFO, logger="colofs.test")
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("colofs.test"), interval=1.0, clock=lambda: now[0])
    assert rl.warning("refused", "refused %s", "a")
    for i in range(500):
        assert not rl.warning("refused", "refused %s", i)
    assert rl.info("other", "another kind")  # kinds are limited apart
    assert rl.suppressed() == {"refused": 500}
    now[0] = 1.0
    assert rl.warning("refused", "refused %s", "b")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused a", "another kind", "refused b (500 more like this suppressed)"]
    assert rl.suppressed() == {}
