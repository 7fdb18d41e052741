"""``--metrics`` with ``--workers``: the supervisor gathers its workers' figures into one ``/metrics``.

Each worker snapshots its one VM with :class:`colofs.fs.metrics.FigureSource`
and answers the channel's ``metrics`` request with the snapshot as rows
(:func:`colofs.fs.metrics.to_rows`), a page at a time so that a VM with
many disks still fits the channel's datagrams (:func:`page`). The
supervisor's :class:`WorkerFigures` asks every running worker at once at
each scrape, under a short timeout: a hung or dead worker's VM is simply
absent from that scrape, and ``colofs_worker_up{vm} 0`` says so. It merges
the answers with its own figures (each worker's state, restarts and memory;
the connections its router refused) with :func:`colofs.fs.metrics.merge`.

Nothing is counted twice: a worker's rows that name another VM are dropped
(each VM's series come from its own worker only), the supervisor counts no
checkpoint or failover itself (its event bus re-emits the workers' events),
and a connection is refused either by the router or by the worker it was
handed to. The only series several processes add to are the store-wide
counters (refused connections); for those the supervisor keeps each
worker's last answer while it is silent, and carries a dead worker's last
answer over its restart, so the sum never goes backwards (what a worker
counted after its last scrape and before it died is lost).

The supervisor starts it once its fleet and (on a secondary) its router exist::

    source = WorkerFigures(fleet, refused=None if router is None else lambda: refusals(router.status()))
    await nursery.start(serve_metrics, source, cfg.metrics.host, cfg.metrics.port)

(``refusals`` and ``serve_metrics`` from :mod:`colofs.fs.metrics`; an
``OSError`` from the start is the ``--metrics`` startup error, as in the daemon.)
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import trio

from colofs.fs.metrics import (
    COUNTER,
    SPEC,
    WORKER_SPEC,
    Figures,
    Value,
    from_rows,
    merge,
    to_rows,
)
from colofs.workers.channel import MAX_MESSAGE, Channel, ChannelClosed, RemoteError
from colofs.workers.memory import memory_of
from colofs.workers.table import (
    CRASHED,
    FAILED,
    HUNG,
    RESTARTING,
    SERVING,
    STARTING,
    STOPPED,
    STOPPING,
    Table,
)

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 2.0
"""How long a scrape waits for a worker's figures; a worker slower than that is absent from the scrape."""
PAGE_BYTES = MAX_MESSAGE - 4096
"""A ``metrics`` reply's rows stay under this many bytes of JSON (the rest of the datagram: its framing)."""
MAX_PAGES = 64
"""Pages asked of one worker per scrape at most (a page holds a hundred disks or so)."""
STATES = (STARTING, SERVING, HUNG, STOPPING, STOPPED, CRASHED, RESTARTING, FAILED)
MEMORY = ("rss", "pss", "uss")


# -- the worker's side -------------------------------------------------------------------------

def page(figures: Figures, after: Any, limit: int = PAGE_BYTES) -> dict[str, Any]:
    """The reply to a ``metrics`` request: the rows sorted after the cursor ``after``, up to ``limit`` bytes.

    ``next`` is the cursor to ask with for the rest (``[name, labels]`` of the
    last row sent), or None when this was the last page. The cursor is a
    position in the sorted rows, not in one snapshot, so each page may come
    from a fresh snapshot without any row being sent twice.
    """
    cursor = _cursor(after)
    rows: list[list[Any]] = []
    size = 0
    for row in to_rows(figures):
        if cursor is not None and (row[0], row[1]) <= cursor:
            continue
        cost = len(_dumps(row)) + 1
        if rows and size + cost > limit:
            return {"rows": rows, "next": [rows[-1][0], rows[-1][1]]}
        rows.append(row)
        size += cost
    return {"rows": rows, "next": None}


def _cursor(after: Any) -> tuple[str, list[str]] | None:
    if after is None:
        return None
    if (not isinstance(after, list) or len(after) != 2 or not isinstance(after[0], str)
            or not isinstance(after[1], list) or not all(isinstance(x, str) for x in after[1])):
        raise RemoteError(f"metrics: bad cursor {after!r}", errno.EINVAL)
    return after[0], after[1]


def _dumps(row: list[Any]) -> str:
    return json.dumps(row, separators=(",", ":"))


# -- the supervisor's side -------------------------------------------------------------------------

class Fleet(Protocol):
    """What the gathering reads of the supervisor (:class:`colofs.workers.fleet.Fleet`)."""

    @property
    def table(self) -> Table: ...

    @property
    def channels(self) -> Mapping[str, Channel]:
        """Each VM's channel to its latest worker (closed once that worker is gone)."""
        ...


class Answer:
    """One worker's answer to a scrape: its VM's figures, its store-wide counters, its pid."""

    def __init__(self, pid: int, own: Figures, shared: Figures) -> None:
        self.pid = pid
        self.own = own
        self.shared = shared


class WorkerFigures:
    """The supervisor's :class:`colofs.fs.metrics.Source`: its workers' figures and its own, merged."""

    def __init__(self, fleet: Fleet, *, refused: Callable[[], Mapping[str, int]] | None = None,
                 timeout: float = SCRAPE_TIMEOUT) -> None:
        self.fleet = fleet
        self.refused = refused
        """The connections the supervisor's router refused, by reason (a secondary's), or None."""
        self.timeout = timeout
        self._shared: dict[str, tuple[int, Figures]] = {}  # per VM: its worker's pid and last store-wide counters
        self._carried = Figures()  # the store-wide counters of workers that are gone

    async def gather(self) -> Figures:
        table = self.fleet.table
        answers: dict[str, Answer] = {}
        memory: dict[str, dict[str, int]] = {}
        async with trio.open_nursery() as nursery:
            for w in list(table.workers.values()):
                channel = self.fleet.channels.get(w.vm)
                if w.pid is None:
                    continue
                nursery.start_soon(self._memory, w.vm, w.pid, memory)
                if channel is not None and not channel.closed.is_set():
                    nursery.start_soon(self._ask, w.vm, channel, answers)
        own_rows: dict[str, list[tuple[tuple[str, ...], Value]]] = {name: [] for name in WORKER_SPEC}
        for w in sorted(table.workers.values(), key=lambda w: w.vm):
            own_rows["colofs_worker_up"].append(((w.vm,), 1.0 if w.vm in answers else 0.0))
            for state in sorted({*STATES, w.state}):
                own_rows["colofs_worker_state"].append(((w.vm, state), 1.0 if state == w.state else 0.0))
            own_rows["colofs_worker_restarts"].append(((w.vm,), float(w.restarts)))
            for kind in MEMORY if w.vm in memory else ():
                own_rows["colofs_worker_memory_bytes"].append(((w.vm, kind), float(memory[w.vm][kind])))
        own = Figures({name: tuple(rows) for name, rows in own_rows.items()})
        for vm, answer in answers.items():
            self._remember(vm, answer)
        for vm in [vm for vm in self._shared if vm not in table.workers]:
            self._forget(vm)  # a VM the supervisor no longer has
        parts = [own, self._carried, *(f for _, f in self._shared.values()), *(a.own for a in answers.values())]
        if self.refused is not None:
            parts.append(Figures({"colofs_refused_connections": tuple(
                ((str(reason),), float(n)) for reason, n in sorted(self.refused().items()))}))
        return merge(parts)

    async def _ask(self, vm: str, channel: Channel, answers: dict[str, Answer]) -> None:
        """Ask one worker for its figures, page by page; no answer in time leaves its VM out."""
        rows: list[Any] = []
        after: Any = None
        with trio.move_on_after(self.timeout):
            try:
                for _ in range(MAX_PAGES):
                    reply = await channel.call("metrics", timeout=self.timeout, after=after)
                    got, after, pid = reply.get("rows"), reply.get("next"), reply.get("pid")
                    if not isinstance(got, list) or not isinstance(pid, int):
                        log.error("metrics: VM %s's worker answered a malformed reply; its VM is left out", vm)
                        return
                    rows.extend(got)
                    if after is None:
                        answers[vm] = self._split(vm, pid, rows)
                        return
                log.error("metrics: VM %s's worker has more than %d pages of figures; its VM is left out",
                          vm, MAX_PAGES)
            except (ChannelClosed, RemoteError, trio.TooSlowError) as e:
                log.debug("metrics: VM %s's worker did not answer: %s", vm, e)
                return
        log.debug("metrics: VM %s's worker did not answer within %.1f s", vm, self.timeout)

    def _split(self, vm: str, pid: int, rows: list[Any]) -> Answer:
        """The worker's rows: those of its VM, and the store-wide counters; anything else is dropped (logged)."""
        figures, bad = from_rows(rows)
        own: dict[str, tuple[tuple[tuple[str, ...], Value], ...]] = {}
        shared: dict[str, tuple[tuple[tuple[str, ...], Value], ...]] = {}
        for name, series in figures.series.items():
            kind, _, labels = SPEC[name]
            if "vm" in labels:
                at = labels.index("vm")
                mine = tuple(row for row in series if row[0][at] == vm)
                bad += len(series) - len(mine)
                own[name] = mine
            elif kind == COUNTER:
                shared[name] = series
            else:
                own[name] = series
        if bad:
            log.error("metrics: dropped %d malformed or foreign series from VM %s's worker", bad, vm)
        return Answer(pid, Figures(own), Figures(shared))

    def _remember(self, vm: str, answer: Answer) -> None:
        """Keep the worker's store-wide counters; a new worker's predecessor's last ones are carried over."""
        before = self._shared.get(vm)
        if before is not None and before[0] != answer.pid:
            self._carried = merge([self._carried, before[1]])
        self._shared[vm] = (answer.pid, answer.shared)

    def _forget(self, vm: str) -> None:
        _, last = self._shared.pop(vm)
        self._carried = merge([self._carried, last])

    @staticmethod
    async def _memory(vm: str, pid: int, out: dict[str, dict[str, int]]) -> None:
        try:
            out[vm] = await trio.to_thread.run_sync(memory_of, pid)
        except OSError as e:  # exited meanwhile (ProcessLookupError), or not ours to read
            log.debug("metrics: no memory figures for VM %s's worker %d: %s", vm, pid, e)

