"""The supervisor's table of workers: one record per VM, its state, and the decisions about it.

Everything here is pure: the clock is passed in, nothing is sent or killed.
The supervisor (:mod:`colofs.workers.fleet`) does the I/O the decisions call for.

States: ``starting`` → ``serving`` → (``stopping`` → ``stopped``) | ``crashed``
→ ``restarting`` → ``starting`` ... A serving worker that leaves pings
unanswered for :data:`LIVENESS_TIMEOUT` is ``hung``; it is ``serving`` again
once it answers, or it is killed (``SIGKILL``) and restarted after
``hang_kill_after`` seconds (0: never). A worker still ``starting`` after
:data:`START_TIMEOUT` (opening a damaged VM, a mount that does not come) is
``hung`` too, with an ``error`` saying so; answering pings does not end that,
only its ``ready`` does; it is killed only if it also leaves pings unanswered
(a long crash recovery is slow, not hung). A crash is restarted at once; crashes
within :data:`QUICK_CRASH` seconds of starting back off 1, 2, 4 … 60 s, and
after :data:`MAX_QUICK_CRASHES` of those in a row the VM is ``failed``.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any

STARTING = "starting"
SERVING = "serving"
STOPPING = "stopping"
STOPPED = "stopped"
CRASHED = "crashed"
RESTARTING = "restarting"
HUNG = "hung"
FAILED = "failed"
COUNTED = (SERVING, STARTING, CRASHED, HUNG, FAILED)
"""The states the root's status counts (``restarting`` counts as ``crashed``, ``stopping`` as ``serving``)."""

PING_INTERVAL = 5.0
LIVENESS_TIMEOUT = 15.0
HANG_KILL_AFTER = 120.0
START_TIMEOUT = 60.0
"""How long a worker may take from its fork to ``ready`` before it is reported hung."""
QUICK_CRASH = 60.0
MAX_QUICK_CRASHES = 5
MAX_BACKOFF = 60.0


def hang_kill_after(environ: dict[str, str] | None = None) -> float:
    """``COLOFS_HANG_KILL_AFTER`` seconds (0: never kill a hung worker), else the default."""
    env = os.environ if environ is None else environ
    text = env.get("COLOFS_HANG_KILL_AFTER")
    if text is None:
        return HANG_KILL_AFTER
    try:
        value = float(text)
    except ValueError:
        return HANG_KILL_AFTER
    return max(0.0, value)


def describe_exit(returncode: int) -> str:
    """``exit 1``, ``killed by SIGKILL``: a worker's end as status and the log show it."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


@dataclass
class Worker:
    """What the supervisor knows of one VM's worker."""

    vm: str
    state: str = STARTING
    pid: int | None = None
    restarts: int = 0
    started_at: float = 0.0
    last_exit: str | None = None
    quick_crashes: int = 0
    last_answer: float = 0.0
    hung_since: float | None = None
    restart_at: float | None = None
    role: str | None = None
    phase: str | None = None
    link: str | None = None
    mountpoint: str | None = None
    error: str | None = None
    budget_sent: int | None = None
    opened: bool = False
    stuck_starting: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        """The ``worker`` object of the VM's status."""
        out: dict[str, Any] = {"state": self.state, "pid": self.pid, "restarts": self.restarts,
                               "last_exit": self.last_exit}
        if self.error:
            out["error"] = self.error
        return out


class Table:
    """The workers by VM name, with the decisions the supervisor acts on."""

    def __init__(self, *, kill_after: float = HANG_KILL_AFTER, liveness_timeout: float = LIVENESS_TIMEOUT,
                 start_timeout: float = START_TIMEOUT) -> None:
        self.workers: dict[str, Worker] = {}
        self.kill_after = kill_after
        self.liveness_timeout = liveness_timeout
        self.start_timeout = start_timeout

    def __contains__(self, vm: str) -> bool:
        return vm in self.workers

    def get(self, vm: str) -> Worker | None:
        return self.workers.get(vm)

    def names(self) -> list[str]:
        return sorted(self.workers)

    def by_pid(self, pid: int) -> Worker | None:
        for w in self.workers.values():
            if w.pid == pid:
                return w
        return None

    def add(self, vm: str) -> Worker:
        w = self.workers.get(vm)
        if w is None:
            w = self.workers[vm] = Worker(vm)
        return w

    # -- life ---------------------------------------------------------------------------

    def started(self, w: Worker, pid: int, now: float) -> None:
        w.state, w.pid, w.started_at, w.last_answer = STARTING, pid, now, now
        w.hung_since = w.restart_at = None
        w.opened = False
        w.stuck_starting = False
        w.error = None
        w.budget_sent = None

    def ready(self, w: Worker, now: float) -> None:
        if w.state in (STARTING, HUNG):
            w.state = SERVING
            w.hung_since = None
        if w.stuck_starting:
            w.stuck_starting, w.error = False, None
        w.last_answer = now

    def exited(self, w: Worker, returncode: int, now: float) -> float | None:
        """Record an exit; the delay before the restart, or None when there is to be none."""
        w.last_exit = describe_exit(returncode)
        w.pid = None
        w.hung_since = None
        if w.state in (STOPPING, STOPPED):
            w.state = STOPPED
            return None
        if now - w.started_at < QUICK_CRASH:
            w.quick_crashes += 1
        else:
            w.quick_crashes = 0
        if w.quick_crashes >= MAX_QUICK_CRASHES:
            w.state = FAILED
            w.restart_at = None
            return None
        w.state = CRASHED
        delay = 0.0 if w.quick_crashes <= 1 else min(MAX_BACKOFF, 2.0 ** (w.quick_crashes - 2))
        w.restart_at = now + delay
        return delay

    def restarting(self, w: Worker) -> bool:
        """A crashed worker's restart is due: True, and counted, unless the VM was stopped meanwhile."""
        if w.state != CRASHED:
            return False
        w.state = RESTARTING
        w.restarts += 1
        return True

    def stopping(self, w: Worker) -> bool:
        """The supervisor is stopping this worker: True if it runs (a stop is to be sent)."""
        running = w.pid is not None
        w.state = STOPPING if running else STOPPED
        w.restart_at = None
        return running

    # -- liveness -------------------------------------------------------------------------

    def answered(self, w: Worker, now: float) -> bool:
        """A ping was answered; True if the worker was hung until now."""
        w.last_answer = now
        if w.state == HUNG and not w.stuck_starting:
            w.state = SERVING
            w.hung_since = None
            return True
        return False

    def check(self, w: Worker, now: float) -> str | None:
        """What a liveness tick calls for: ``"hung"`` (report it), ``"kill"``, or None."""
        if w.state == STARTING and self.start_timeout > 0 and now - w.started_at > self.start_timeout:
            w.state, w.hung_since, w.stuck_starting = HUNG, now, True
            w.error = f"still starting after {self.start_timeout:.0f} s"
            return "hung"
        if w.state == SERVING and now - w.last_answer > self.liveness_timeout:
            w.state = HUNG
            w.hung_since = now
            return "hung"
        if w.state == HUNG and w.hung_since is not None and self.kill_after > 0 \
                and now - w.hung_since >= self.kill_after:
            if w.stuck_starting and now - w.last_answer <= self.liveness_timeout:
                return None  # slow (a long recovery), not hung: it answers its pings
            return "kill"
        return None

    # -- what the root shows and shares -----------------------------------------------------

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(COUNTED, 0)
        for w in self.workers.values():
            state = {RESTARTING: CRASHED, STOPPING: SERVING}.get(w.state, w.state)
            if state in out:
                out[state] += 1
        return out

    def roles(self) -> dict[str, int]:
        roles = [w.role for w in self.workers.values() if w.role]
        return {r: roles.count(r) for r in sorted(set(roles))}

    def budgets(self, total: int) -> dict[str, int]:
        """The retained-writes budget each primary worker is to be sent (only where it changed).

        The host's ``max_retained_total_bytes`` is split evenly among the
        workers serving a primary VM; recorded as sent.
        """
        primaries = [w for w in self.workers.values() if w.role == "primary" and w.state in (SERVING, HUNG)]
        if not primaries:
            return {}
        share = max(1, total // len(primaries))
        out = {}
        for w in primaries:
            if w.budget_sent != share:
                w.budget_sent = share
                out[w.vm] = share
        return out
