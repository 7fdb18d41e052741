"""The worker table's decisions: restart backoff, failing for good, liveness, the budget split."""

from __future__ import annotations

from colofs.workers.table import (
    CRASHED,
    FAILED,
    HUNG,
    SERVING,
    STOPPED,
    Table,
    describe_exit,
    hang_kill_after,
)


def _serving(table: Table, vm: str, now: float, pid: int = 100) -> None:
    w = table.add(vm)
    table.started(w, pid, now)
    table.ready(w, now)


def test_exit_descriptions() -> None:
    assert describe_exit(1) == "exit 1"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(-200) == "killed by signal 200"


def test_first_crash_restarts_at_once_and_quick_ones_back_off_then_fail() -> None:
    t = Table()
    now = 1000.0
    _serving(t, "vm0", now)
    w = t.workers["vm0"]
    assert t.exited(w, -9, now + 5) == 0.0  # the first crash: at once
    assert w.state == CRASHED and w.last_exit == "killed by SIGKILL" and w.pid is None
    delays = []
    for _ in range(3):
        assert t.restarting(w)
        now += 10
        t.started(w, 101, now)
        delays.append(t.exited(w, 1, now + 1))
    assert delays == [1.0, 2.0, 4.0]
    assert t.restarting(w)
    t.started(w, 102, now + 20)
    assert t.exited(w, 1, now + 21) is None
    assert w.state == FAILED and w.restarts == 4
    assert not t.restarting(w)  # a failed VM is left alone


def test_a_long_run_resets_the_streak() -> None:
    t = Table()
    w = t.add("vm0")
    w.quick_crashes = 3
    t.started(w, 1, 0.0)
    assert t.exited(w, 1, 61.0) == 0.0  # it ran past a minute: the streak is over
    assert w.quick_crashes == 0
    t.restarting(w)
    t.started(w, 2, 100.0)
    w.quick_crashes = 4
    assert t.exited(w, 1, 101.0) is None  # the fifth quick one in a row fails
    assert w.state == FAILED


def test_a_stopped_worker_is_not_restarted() -> None:
    t = Table()
    _serving(t, "vm0", 0.0)
    w = t.workers["vm0"]
    assert t.stopping(w)
    assert t.exited(w, 0, 1.0) is None
    assert w.state == STOPPED and w.last_exit == "exit 0"


def test_hung_after_the_timeout_back_when_it_answers() -> None:
    t = Table(kill_after=0)
    _serving(t, "vm0", 0.0)
    w = t.workers["vm0"]
    assert t.check(w, 10.0) is None
    assert t.check(w, 15.5) == "hung"
    assert w.state == HUNG
    assert t.check(w, 10_000.0) is None  # kill_after 0: never killed
    assert t.answered(w, 10_001.0)
    assert w.state == SERVING
    assert t.check(w, 10_002.0) is None


def test_hung_worker_is_killed_after_kill_after() -> None:
    t = Table(kill_after=120)
    _serving(t, "vm0", 0.0)
    w = t.workers["vm0"]
    assert t.check(w, 16.0) == "hung"
    assert t.check(w, 100.0) is None
    assert t.check(w, 136.0) == "kill"


def test_hang_kill_after_from_the_environment() -> None:
    assert hang_kill_after({}) == 120.0
    assert hang_kill_after({"COLOFS_HANG_KILL_AFTER": "0"}) == 0.0
    assert hang_kill_after({"COLOFS_HANG_KILL_AFTER": "2.5"}) == 2.5
    assert hang_kill_after({"COLOFS_HANG_KILL_AFTER": "soon"}) == 120.0


def test_budget_is_split_among_serving_primaries_and_resent_on_change() -> None:
    t = Table()
    for i, role in enumerate(("primary", "primary", "secondary")):
        _serving(t, f"vm{i}", 0.0, pid=10 + i)
        t.workers[f"vm{i}"].role = role
    assert t.budgets(100) == {"vm0": 50, "vm1": 50}
    assert t.budgets(100) == {}  # unchanged: nothing to send
    _serving(t, "vm3", 1.0, pid=13)
    t.workers["vm3"].role = "primary"
    assert t.budgets(99) == {"vm0": 33, "vm1": 33, "vm3": 33}
    t.exited(t.workers["vm3"], -9, 2.0)
    assert t.budgets(99) == {"vm0": 49, "vm1": 49}


def test_counts_per_state() -> None:
    t = Table()
    _serving(t, "a", 0.0)
    t.add("b")
    _serving(t, "c", 0.0)
    t.exited(t.workers["c"], 1, 1.0)
    assert t.counts() == {"serving": 1, "starting": 1, "crashed": 1, "hung": 0, "failed": 0}


def test_a_worker_still_starting_past_the_deadline_is_hung_until_ready() -> None:
    t = Table(kill_after=120, start_timeout=60)
    w = t.add("vm0")
    t.started(w, 100, 0.0)
    assert t.check(w, 59.0) is None
    assert t.check(w, 61.0) == "hung"
    assert w.state == HUNG and w.error == "still starting after 60 s"
    assert not t.answered(w, 62.0)  # its channel answers, but it still does not serve
    assert w.state == HUNG
    t.answered(w, 175.0)
    assert t.check(w, 181.0) is None  # past kill_after, but it answers: slow, not hung
    assert t.check(w, 191.0) == "kill"  # silent for more than the liveness timeout as well
    t.ready(w, 100.0)
    assert w.state == SERVING and w.error is None
    w2 = t.add("vm1")
    t.started(w2, 101, 0.0)
    t.ready(w2, 1.0)
    t.answered(w2, 55.0)
    assert t.check(w2, 61.0) is None  # ready in time: only the pings count
