"""The primary's online verify of one VM: the pass, rechecks, the optional repair, and its report.

A :class:`VerifyRun` goes over every block of the chosen disks with
VERIFY_QUERY (the decisions are in :mod:`colofs.repl.verify`), at most
``rate`` bytes a second, on whatever connection the VM's link has:

1. **compare**: each answer settles its blocks as equal or differing, except
   mismatching blocks the primary wrote after the answer's checkpoint;
2. **recheck** those live (the primary's blocks as of a write, the
   secondary's base once it applied that write), a few rounds; what is
   still unsettled is reported as unverified (a block the VM rewrites all
   the time), never as differing;
3. with ``resync``, the differing blocks are marked dirty and the link's
   digest-compared resync sends them; after the next checkpoint a **final
   pass** compares them again, which proves them equal.

A connection cut does not restart the pass: what was answered stays valid
(each answer was exact at its own checkpoint), and the unanswered queries
are asked again on the next connection. The report stays in status until
the next verify of the VM.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import deque
from itertools import count as _counter

import trio

from colofs.core.disk import Disk
from colofs.core.store import Store
from colofs.repl.blockset import BlockSet
from colofs.repl.errors import ReplProtocolError
from colofs.repl.primary import PrimaryReplicator
from colofs.repl.sender import VMLink
from colofs.repl.verify import (
    RECHECK_ROUNDS,
    WINDOW,
    Pacer,
    Query,
    VerifyError,
    VerifyOptions,
    add_blocks,
    check_answer,
    classify,
    count,
    digests_now,
    plan_queries,
    queries_for,
    ranges,
)
from colofs.wire.messages import VerifyDigests, VerifyLiveQuery, VerifyQuery

log = logging.getLogger(__name__)

RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"


class _Lost(Exception):
    """The connection the queries went out on is gone (or not streaming): ask again on the next."""


class VerifyRun:
    """One verify of one VM; :meth:`as_dict` is what status and ``user.colofs.verify`` show."""

    def __init__(self, ident: int, link: VMLink, opts: VerifyOptions) -> None:
        self.id = ident
        self.link = link
        self.vm = link.vm
        self.opts = opts
        names = list(opts.disks) if opts.disks is not None else sorted(self.vm.disks)
        missing = [n for n in names if n not in self.vm.disks]
        if missing:
            raise VerifyError(f"verify: VM {self.vm.name} has no disk {', '.join(missing)} "
                              f"(disks: {', '.join(sorted(self.vm.disks)) or 'none'})", errno.ENOENT)
        self.disks = names
        self.nblocks = {n: self.vm.disks[n].nblocks for n in names}
        self.block_size = {n: self.vm.disks[n].block_size for n in names}
        self.state = RUNNING
        self.phase = "starting"
        self.error: str | None = None
        self.started_at = time.time()
        self.t0 = time.monotonic()
        self.t1: float | None = None
        self.blocks_total = sum(self.nblocks.values())
        self.blocks_done = 0
        """Blocks answered in the first pass (progress)."""
        self.blocks_compared = 0
        self.bytes_read = 0
        self.differing: dict[str, BlockSet] = {}
        self.recheck: dict[str, BlockSet] = {}
        self.unverified: dict[str, BlockSet] = {}
        self.rechecked = 0
        self.recheck_rounds = 0
        self.interruptions = 0
        self.checkpoints: list[int] = []
        self.resync: dict[str, object] | None = None
        self.done = trio.Event()
        self._pacer = Pacer(opts.rate)
        self._tokens = _counter(1)
        self._last_token = 0
        self._expected: dict[int, object] = {}
        self._answers: dict[int, VerifyDigests] = {}

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> None:
        link = self.link
        link.verify_sink = self._on_answer
        try:
            self.phase = "comparing"
            await self._compare(plan_queries((n, self.nblocks[n], self.block_size[n]) for n in self.disks),
                                progress=True)
            await self._rechecks()
            if self.opts.resync and self.differing:
                await self._repair()
            self.state = DONE
        except trio.Cancelled:
            self.state, self.error = CANCELLED, "cancelled"
            raise
        except (VerifyError, ReplProtocolError) as e:
            self.state, self.error = FAILED, str(e)
        except Exception as e:  # a bug: the VM goes on, the verify says so
            log.exception("VM %s: verify %d failed", self.vm.name, self.id)
            self.state, self.error = FAILED, f"internal error: {e!r}"
        finally:
            if link.verify_sink == self._on_answer:
                link.verify_sink = None
            self.t1 = time.monotonic()
            self.phase = self.state
            self.done.set()
            log.info("VM %s: verify %d %s: %d blocks compared, %d differing, %d unverified in %.1f s%s",
                     self.vm.name, self.id, self.state, self.blocks_compared, count(self.differing),
                     count(self.unverified), self.t1 - self.t0, f" ({self.error})" if self.error else "")

    async def _rechecks(self) -> None:
        """Mismatches the primary wrote after their checkpoint: compared live, base to base, a few rounds."""
        rounds = 0
        while self.recheck and rounds < RECHECK_ROUNDS:
            rounds += 1
            self.recheck_rounds += 1
            blocks, self.recheck = self.recheck, {}
            self.rechecked += count(blocks)
            self.phase = "rechecking"
            await self._compare(queries_for(blocks, self.block_size), live=True)
        for name, bits in self.recheck.items():
            self.unverified.setdefault(name, BlockSet(self.nblocks[name])).update(bits)
        self.recheck = {}

    async def _repair(self) -> None:
        """Resync the differing blocks through the link, then prove them equal after a checkpoint."""
        link = self.link
        found = self.differing
        self.phase = "resyncing"
        before = link.stats["resyncs"]
        sent0 = link.progress.blocks_sent if link.progress.active else 0
        link.repair({n: list(b.runs()) for n, b in found.items()})
        log.info("VM %s: verify %d: resyncing %d differing blocks", self.vm.name, self.id, count(found))
        with trio.move_on_after(self.opts.wait) as scope:
            while link.stats["resyncs"] <= before or link.verify_conn() is None:
                await link.wait_changed()
        if scope.cancelled_caught:
            raise VerifyError(f"verify: the resync of {count(found)} differing blocks did not finish within "
                              f"{self.opts.wait:g} s (link {link.state}; last error: {link.last_error or 'none'})")
        self.resync = {"blocks": count(found), "ranges": ranges(found, self.block_size),
                       "resync_blocks_sent": link.progress.blocks_sent - sent0, "upto_seq": link.progress.upto_seq}
        # The repaired blocks are in the secondary's base now, and in its checkpoint image from the
        # next checkpoint on: the final pass compares that image (base to base if none comes).
        checkpointed = await self._next_checkpoint()
        self.differing = {}
        self.phase = "final pass"
        compared = self.blocks_compared
        unsettled = count(self.unverified)
        await self._compare(queries_for(found, self.block_size), live=not checkpointed)
        await self._rechecks()
        still = count(self.differing)
        unsettled = count(self.unverified) - unsettled
        self.resync.update(
            final_pass="after a checkpoint" if checkpointed else
            f"live: no checkpoint came within {self.opts.checkpoint_wait:g} s",
            final_compared=self.blocks_compared - compared, repaired=count(found) - still - unsettled,
            still_differing=still, unsettled=unsettled)
        self.blocks_compared = compared

    async def _next_checkpoint(self) -> bool:
        """Wait for the next checkpoint the secondary confirms; False after ``checkpoint_wait``."""
        link = self.link
        seen = link.stats["checkpoints"]
        self.phase = "waiting for a checkpoint"
        with trio.move_on_after(self.opts.checkpoint_wait):
            while link.stats["checkpoints"] <= seen:
                await link.wait_changed()
            return True
        return False

    # -- comparing ----------------------------------------------------------------------------

    async def _compare(self, queries: list[Query], *, progress: bool = False, live: bool = False) -> None:
        done = [0]  # queries settled so far: a cut resumes after them
        while done[0] < len(queries):
            conn = await self._connection()
            try:
                await self._compare_on(conn, queries, done, progress, live)
            except _Lost:
                self.interruptions += 1
                self._expected.clear()
                self._answers.clear()
                if self.link.verify_conn() is conn:  # still streaming there: a disk not announced yet
                    with trio.move_on_after(self.opts.wait):
                        await self.link.wait_changed()

    async def _connection(self) -> object:
        link = self.link
        conn = link.verify_conn()
        if conn is not None:
            return conn
        phase = self.phase
        self.phase = "waiting for the secondary"
        with trio.move_on_after(self.opts.wait):
            while (conn := link.verify_conn()) is None:
                await link.wait_changed()
            self.phase = phase
            return conn
        raise VerifyError(f"verify: no streaming connection to the secondary for {self.opts.wait:g} s "
                          f"(link {link.state}; last error: {link.last_error or 'none'})")

    async def _compare_on(self, conn: object, queries: list[Query], done: list[int], progress: bool,
                          live: bool) -> None:
        """Go on from query ``done[0]`` on ``conn``, up to WINDOW paced queries in flight; or raise _Lost.

        ``live``: our blocks are read first, as of write P, and the secondary
        reads its base once it has applied P (VERIFY_LIVE_QUERY).
        """
        link = self.link
        index = conn.disk_index  # type: ignore[attr-defined]
        inflight: deque[tuple[int, Query, int, list[int]]] = deque()
        nxt = done[0]
        while done[0] < len(queries):
            if inflight and inflight[0][0] in self._answers:
                token, q, at, ours = inflight.popleft()
                ans = self._answers.pop(token)
                self._expected.pop(token, None)
                await self._judge(q, index[q.disk], ans, (at, ours) if live else None)
                done[0] += 1
                if progress:
                    self.blocks_done += q.count
                self.bytes_read += q.count * self.block_size[q.disk]
            elif nxt < len(queries) and len(inflight) < WINDOW:
                q = queries[nxt]
                if q.disk not in index:
                    raise _Lost  # the link announces it (DISK_ADD) before it streams again
                # The pace bounds what the secondary reads (and the primary right after it).
                await trio.sleep(self._pacer.delay(q.count * self.block_size[q.disk], trio.current_time()))
                at, ours = 0, []
                if live:
                    at, ours = await digests_now(self.vm, self._disk(q.disk), q.first, q.count,
                                                 mark=link.dirty.cut)
                    if link.verify_conn() is not conn:
                        raise _Lost
                token = next(self._tokens)
                self._last_token = token
                self._expected[token] = conn
                idx = index[q.disk]
                msg = (VerifyLiveQuery(token, idx, q.first, q.count, at) if live
                       else VerifyQuery(token, idx, q.first, q.count))
                try:
                    await conn.sender.send(msg)  # type: ignore[attr-defined]
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    raise _Lost from None
                inflight.append((token, q, at, ours))
                nxt += 1
            else:
                if link.verify_conn() is not conn:
                    raise _Lost
                await link.wait_changed()

    def _on_answer(self, conn: object, msg: VerifyDigests) -> None:
        """The link's reader hands over each VERIFY_DIGESTS (no await)."""
        if msg.token > self._last_token or msg.token <= 0:
            raise ReplProtocolError(f"VERIFY_DIGESTS for query {msg.token}, which was never asked")
        if self._expected.get(msg.token) is conn:
            self._answers[msg.token] = msg
        # else: an answer to a query given up on after a cut or a resync; nothing waits for it

    def _disk(self, name: str) -> Disk:
        disk = self.vm.disks.get(name)
        if disk is None:
            raise VerifyError(f"verify: disk {name} of VM {self.vm.name} went away during the verify")
        return disk

    async def _judge(self, q: Query, want_index: int, ans: VerifyDigests,
                     live: tuple[int, list[int]] | None) -> None:
        """Settle an answer's blocks. ``since`` is the seq after which a write makes a mismatch unsettled:
        the secondary's checkpoint, or (live) the seq our blocks were read at, if the secondary had
        applied it when it read its base."""
        vm = self.vm
        check_answer(q, want_index, ans.disk, ans.first_block, len(ans.digests), ans.seq, vm.state.last_applied)
        since: int | None
        if live is None:
            _, ours = await digests_now(vm, self._disk(q.disk), q.first, q.count)
            self._note_checkpoint(ans.seq)
            since = ans.seq
        else:
            at, ours = live
            since = at if ans.seq >= at else None
        if ours == list(ans.digests):
            self.blocks_compared += q.count
            return
        # Looked at after both reads: a write either read saw had marked the map before its lock was released.
        dirty = self.link.dirty
        after: BlockSet | None = None  # unknown (the map no longer reaches back that far): all unsettled
        if since is not None and since >= dirty.since:
            after = dirty.union_since(since).get(q.disk) or BlockSet(self.nblocks[q.disk])
        differ, recheck = classify(q.first, ours, ans.digests, after)
        self.blocks_compared += q.count - len(recheck)
        n = self.nblocks[q.disk]
        add_blocks(self.differing, q.disk, n, differ)
        add_blocks(self.recheck, q.disk, n, recheck)
        if differ:
            log.warning("VM %s: verify %d: disk %s: %d blocks from block %d differ from the secondary's copy "
                        "(as of seq %d)", vm.name, self.id, q.disk, len(differ), differ[0], ans.seq)

    def _note_checkpoint(self, seq: int) -> None:
        if not self.checkpoints:
            self.checkpoints = [seq, seq]
        else:
            self.checkpoints = [min(self.checkpoints[0], seq), max(self.checkpoints[1], seq)]

    # -- status --------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, object]:
        end = self.t1 if self.t1 is not None else time.monotonic()
        elapsed = end - self.t0
        pct = 100.0 * self.blocks_done / self.blocks_total if self.blocks_total else 100.0
        eta = None
        if self.state == RUNNING and self.phase == "comparing" and self.blocks_done and elapsed > 0:
            eta = round(elapsed * (self.blocks_total - self.blocks_done) / self.blocks_done, 1)
        return {
            "id": self.id, "vm": self.vm.name, "state": self.state, "phase": self.phase,
            "disks": self.disks, "options": self.opts.as_dict(), "started_at": self.started_at,
            "duration_s": round(elapsed, 3), "percent": round(pct, 1), "eta_s": eta,
            "blocks_total": self.blocks_total, "blocks_done": self.blocks_done,
            "blocks_compared": self.blocks_compared, "bytes_read": self.bytes_read,
            "blocks_differing": count(self.differing), "differing": ranges(self.differing, self.block_size),
            "blocks_unverified": count(self.unverified), "unverified": ranges(self.unverified, self.block_size),
            "blocks_rechecking": count(self.recheck), "blocks_rechecked": self.rechecked,
            "recheck_rounds": self.recheck_rounds, "interruptions": self.interruptions,
            "checkpoints": self.checkpoints or None, "resync": self.resync, "error": self.error,
        }


class Verifications:
    """The verifies of a primary's VMs: at most one running per VM, the last one kept for status."""

    def __init__(self, store: Store, replicator: PrimaryReplicator) -> None:
        self.store = store
        self.replicator = replicator
        self.runs: dict[str, VerifyRun] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._ids = _counter(1)
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the verifies until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def start(self, vm_name: str, opts: VerifyOptions) -> VerifyRun:
        """Start a verify of ``vm_name`` (no await); raises :class:`VerifyError` if it cannot run."""
        if vm_name not in self.store.vms:
            raise VerifyError(f"verify: no VM {vm_name!r}", errno.ENOENT)
        link = self.replicator.links.get(vm_name)
        if link is None or self._nursery is None:
            raise VerifyError(f"verify: VM {vm_name} is not replicated from this node; run the verify on "
                              "its primary", errno.EPERM)
        cur = self.runs.get(vm_name)
        if cur is not None and cur.state == RUNNING:
            raise VerifyError(f"verify: verify {cur.id} of VM {vm_name} is running ({cur.phase}, "
                              f"{cur.as_dict()['percent']}%); cancel it first", errno.EBUSY)
        run = VerifyRun(0, link, opts)
        run.id = next(self._ids)  # numbered once it is sure to run
        self.runs[vm_name] = run
        scope = trio.CancelScope()
        self._scopes[vm_name] = scope

        async def go() -> None:
            with scope:
                await run.run()

        self._nursery.start_soon(go, name=f"colofs-verify-{vm_name}")
        log.info("VM %s: verify %d started (disks %s, %.0f MB/s%s)", vm_name, run.id, ", ".join(run.disks),
                 opts.rate / 1e6, ", then resync" if opts.resync else "")
        return run

    def cancel(self, vm_name: str) -> VerifyRun:
        run = self.runs.get(vm_name)
        if run is None or run.state != RUNNING:
            raise VerifyError(f"verify: no verify of VM {vm_name} is running", errno.EINVAL)
        self._scopes[vm_name].cancel()
        return run

    def status(self, vm_name: str) -> dict[str, object] | None:
        run = self.runs.get(vm_name)
        return run.as_dict() if run is not None else None
