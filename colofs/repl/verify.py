"""Online verify: what each side computes, and the pure decisions that make a comparison exact.

A verify compares the primary's disk with the secondary's copy *at a
checkpoint*, by xxh3 digests per block, while the VM runs::

    primary                                        secondary
    VERIFY_QUERY(token, disk, first, count)  ->    under the blocks' shared range lock:
                                                   C = last checkpoint, image = hidden over base
                                             <-    VERIFY_DIGESTS(token, disk, first, C, digests)
    reads its blocks under their range lock,
    compares; a mismatch is a difference only
    if the block was not written after C

The secondary digests its checkpoint image, not raw base: base already holds
primary writes made after ``C``, and hidden holds what they replaced, so
``hidden[b] if b in hidden else base[b]`` is the disk at ``C``. Its range lock
keeps an apply (which writes hidden, then base) and a checkpoint (which
takes every block's lock) out while it reads, so ``C`` and the image agree.

The primary has no image of its disk at ``C``, but it knows which blocks it
wrote after ``C`` (the dirty map: every write is marked, in segments cut at
checkpoints). A block it did not write after ``C`` holds now what it held
at ``C``, so its digest must equal the secondary's; if not, the copies
differ. A mismatching block written after ``C`` proves nothing yet: it is
*rechecked* live, base against base::

    reads its blocks under their lock as of
    write P, cuts the dirty map at P
    VERIFY_LIVE_QUERY(token, disk, first, count, P) ->  waits until it applied P, reads base
                                             <-    VERIFY_DIGESTS(..., A = its last applied, ...)
    a mismatch differs if A >= P and the
    block was not written after P

A block the VM rewrites between our read and the answer stays unsettled; a
few rounds later it is reported as unverified, never as differing. Each
side reads under the blocks' range lock, and a write holds that lock until
its seq is taken (primary) or recorded (secondary), so a seq read under the
lock covers exactly the writes the read saw.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import trio

from colofs.core.disk import Disk
from colofs.core.layers import read_layers
from colofs.core.vm import VM
from colofs.repl.blockset import BlockSet
from colofs.repl.errors import ReplProtocolError
from colofs.repl.resync import block_digests, read_and_digest, read_blocks

MB = 1_000_000
DEFAULT_RATE_MB = 100.0
"""Bytes each side reads a second by default: well under a disk's bandwidth, so the VM keeps its I/O."""
MAX_RATE_MB = 100_000.0
QUERY_BYTES = 1 << 20
"""Blocks per VERIFY_QUERY: small enough that pacing is smooth and a range lock is held briefly."""
WINDOW = 4
"""Queries in flight: hides the round trip without running ahead of the pace."""
RECHECK_ROUNDS = 5
DEFAULT_CHECKPOINT_WAIT = 60.0
DEFAULT_WAIT = 120.0
MAX_SECONDS = 3600.0
MAX_RANGES = 256
"""Ranges listed in a report (the counts are always whole)."""


class VerifyError(Exception):
    """A verify cannot go on; the message says why (shown in status and by ``mountctl verify``)."""

    def __init__(self, message: str, code: int = errno.EIO) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class VerifyOptions:
    """What an operator asked for: which disks, at what pace, and whether to repair."""

    disks: tuple[str, ...] | None = None
    resync: bool = False
    rate: float = DEFAULT_RATE_MB * MB
    """Bytes a second each side reads for the comparison."""
    checkpoint_wait: float = DEFAULT_CHECKPOINT_WAIT
    """Seconds to wait, after a resync, for the checkpoint the final pass compares against."""
    wait: float = DEFAULT_WAIT
    """Seconds to wait for a streaming connection to the secondary (after a cut, during a resync)."""

    def as_dict(self) -> dict[str, object]:
        return {"disks": list(self.disks) if self.disks is not None else None, "resync": self.resync,
                "rate_mb": round(self.rate / MB, 3), "checkpoint_wait": self.checkpoint_wait, "wait": self.wait}


def parse_options(req: dict[str, object]) -> VerifyOptions:
    """Options from the JSON of ``user.colofs.verify``; raises :class:`VerifyError` (EINVAL) on a bad one."""
    known = {"disk", "disks", "resync", "rate", "checkpoint_wait", "wait", "cancel"}
    extra = sorted(set(req) - known)
    if extra:
        raise VerifyError(f"verify: unknown option(s) {', '.join(extra)} (known: {', '.join(sorted(known))})",
                          errno.EINVAL)
    disks: tuple[str, ...] | None = None
    one = req.get("disk")
    many = req.get("disks")
    if one is not None and many is not None:
        raise VerifyError("verify: give 'disk' or 'disks', not both", errno.EINVAL)
    if one is not None:
        many = [one]
    if many is not None:
        if not isinstance(many, list) or not many or not all(isinstance(d, str) and d for d in many):
            raise VerifyError("verify: 'disks' must be a non-empty list of disk names", errno.EINVAL)
        disks = tuple(dict.fromkeys(d.removesuffix(".raw") for d in many))
    resync = req.get("resync", False)
    if not isinstance(resync, bool):
        raise VerifyError("verify: 'resync' must be true or false", errno.EINVAL)
    return VerifyOptions(
        disks=disks, resync=resync,
        rate=_number(req, "rate", DEFAULT_RATE_MB, MAX_RATE_MB, "MB/s") * MB,
        checkpoint_wait=_number(req, "checkpoint_wait", DEFAULT_CHECKPOINT_WAIT, MAX_SECONDS, "seconds"),
        wait=_number(req, "wait", DEFAULT_WAIT, MAX_SECONDS, "seconds"),
    )


def _number(req: dict[str, object], key: str, default: float, limit: float, unit: str) -> float:
    value = req.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= limit \
            or not math.isfinite(value):
        raise VerifyError(f"verify: {key!r} must be a number of {unit} above 0 and at most {limit:g}", errno.EINVAL)
    return float(value)


# -- pure decisions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    disk: str
    first: int
    count: int


def plan_queries(disks: Iterable[tuple[str, int, int]], query_bytes: int = QUERY_BYTES) -> list[Query]:
    """Queries covering whole disks ``(name, nblocks, block_size)``, in name order."""
    out = []
    for name, nblocks, bs in sorted(disks):
        per = max(1, query_bytes // bs)
        out += [Query(name, f, min(per, nblocks - f)) for f in range(0, nblocks, per)]
    return out


def queries_for(blocks: dict[str, BlockSet], block_sizes: dict[str, int], query_bytes: int = QUERY_BYTES) -> list[Query]:
    """Queries covering exactly the runs of ``blocks`` (a recheck, the final pass)."""
    out = []
    for name in sorted(blocks):
        per = max(1, query_bytes // block_sizes[name])
        for lo, hi in blocks[name].runs():
            out += [Query(name, f, min(per, hi - f)) for f in range(lo, hi, per)]
    return out


def check_answer(q: Query, want_index: int, index: int, first: int, n: int, checkpoint: int,
                 last_seq: int) -> None:
    """An answer must be for the query asked, at a checkpoint the primary has reached."""
    if (index, first, n) != (want_index, q.first, q.count):
        raise ReplProtocolError(f"VERIFY_DIGESTS for disk {index} blocks {first}+{n} does not answer the "
                                f"query for disk {want_index} ({q.disk}) blocks {q.first}+{q.count}")
    if checkpoint > last_seq:
        raise ReplProtocolError(f"VERIFY_DIGESTS at checkpoint {checkpoint}, beyond the primary's last "
                                f"write {last_seq}")


def classify(first: int, ours: Sequence[int], theirs: Sequence[int],
             written_after: BlockSet | None) -> tuple[list[int], list[int]]:
    """``(differing, recheck)`` blocks of one answer.

    ``written_after``: the blocks the primary wrote after the answer's
    checkpoint (``None``: unknown, every mismatch is rechecked). Equal
    digests settle a block whatever was written.
    """
    differ: list[int] = []
    recheck: list[int] = []
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            blk = first + i
            (recheck if written_after is None or blk in written_after else differ).append(blk)
    return differ, recheck


class Pacer:
    """Bounds the bytes read a second: each chunk is due ``nbytes / rate`` after the previous one.

    No credit builds up while the verify waits (for a checkpoint, after a
    cut), so it never bursts to catch up.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = -math.inf

    def delay(self, nbytes: int, now: float) -> float:
        """Seconds to wait, from ``now``, before asking for the next ``nbytes``."""
        start = max(self._next, now)
        self._next = start + nbytes / self.rate
        return start - now


def ranges(blocks: dict[str, BlockSet], block_sizes: dict[str, int], limit: int = MAX_RANGES) -> list[dict[str, object]]:
    """Runs of blocks as the report lists them, at most ``limit``."""
    out: list[dict[str, object]] = []
    for name in sorted(blocks):
        bs = block_sizes[name]
        for lo, hi in blocks[name].runs():
            if len(out) >= limit:
                return out
            out.append({"disk": name, "first_block": lo, "blocks": hi - lo, "offset": lo * bs,
                        "bytes": (hi - lo) * bs})
    return out


def count(blocks: dict[str, BlockSet]) -> int:
    return sum(b.count() for b in blocks.values())


def add_blocks(into: dict[str, BlockSet], name: str, nblocks: int, blocks: Iterable[int]) -> None:
    s = into.get(name)
    for b in blocks:
        if s is None:
            s = into[name] = BlockSet(nblocks)
        s.add(b, b + 1)


# -- reading either side -----------------------------------------------------------------------


async def digests_now(vm: VM, disk: Disk, first: int, n: int,
                      mark: Callable[[int], None] | None = None) -> tuple[int, list[int]]:
    """``(seq, digests)`` of base's blocks as of write ``seq``, read under their shared range lock.

    Every write to these blocks numbered up to ``seq`` is in what was read,
    and any later one comes after: a write holds the blocks' lock from its
    change to base until its seq is taken (primary) or recorded (secondary).
    ``mark(seq)`` runs under the lock with no await after ``seq`` was read
    (the primary cuts its dirty map there).
    """
    stop = min(first + n, disk.nblocks)
    async with disk.lock.range(first, stop, exclusive=False):
        digests, _ = await trio.to_thread.run_sync(
            read_and_digest, disk.base_fd, disk.size, disk.block_size, first, n)
        seq = vm.state.last_applied
        if mark is not None:
            mark(seq)
    return seq, digests


async def checkpoint_digests(vm: VM, disk: Disk, first: int, n: int) -> tuple[int, list[int]]:
    """The secondary's ``(checkpoint, digests)`` of its image at its last checkpoint (hidden over base)."""
    stop = min(first + n, disk.nblocks)
    async with disk.lock.range(first, stop, exclusive=False):
        seq = vm.state.last_checkpoint  # a checkpoint takes every block's lock: it cannot move now
        bs = disk.block_size
        buf = await trio.to_thread.run_sync(read_blocks, disk.base_fd, disk.size, bs, first, n)
        held = disk.hidden.map
        if held:
            mv = memoryview(buf)
            saved = [b for b in range(first, stop) if b in held]
            for lo, hi in _runs(saved):
                start = lo * bs
                end = min(disk.size, hi * bs)
                await read_layers(disk.io, [disk.hidden], disk.base_fd, disk.shift, start,
                                  mv[start - first * bs : end - first * bs], disk.label)
    digests = await trio.to_thread.run_sync(block_digests, buf, bs)
    return seq, digests


def _runs(blocks: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], b + 1)
        else:
            out.append((b, b + 1))
    return out
