"""What a process costs in memory, and which processes a supervisor's tree holds: read from /proc.

Workers are forked from a zygote that imported the code first, so most of
their pages are shared with it and with each other. RSS counts every shared
page in full in every process and so says little about what one more VM
costs; PSS splits each shared page among the processes that map it, and USS
(private clean + private dirty) is what the process alone holds, what would be
freed if it exited. The tests' memory bounds and ``bench.many_vms`` use these.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MEMORY_KEYS", "memory_of", "process_tree", "total"]

MEMORY_KEYS = ("rss", "pss", "uss", "swap_pss")
"""The keys of :func:`memory_of`'s result, all in bytes."""

_FIELDS = {"Rss": "rss", "Pss": "pss", "Private_Clean": "uss", "Private_Dirty": "uss", "SwapPss": "swap_pss"}


def _parse(text: str) -> dict[str, int]:
    """Sum the fields of an smaps or smaps_rollup text (kB values) into bytes per key."""
    out = dict.fromkeys(MEMORY_KEYS, 0)
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        key = _FIELDS.get(name)
        if key is None or not sep:
            continue
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key] += int(parts[0]) * 1024
    return out


def memory_of(pid: int, proc: str | os.PathLike[str] = "/proc") -> dict[str, int]:
    """RSS, PSS, USS and swapped PSS of ``pid`` in bytes.

    smaps_rollup (one pass in the kernel) where the kernel has it, else the sum
    over every mapping in smaps. ProcessLookupError if the process is gone, so
    that a caller racing an exit can tell that from a permission problem.
    """
    base = Path(proc) / str(pid)
    for name in ("smaps_rollup", "smaps"):
        try:
            text = (base / name).read_text()
        except FileNotFoundError:
            if not base.exists():
                raise ProcessLookupError(pid) from None
            continue  # this kernel lacks the file: try the next
        except ProcessLookupError:
            raise
        if not text and not base.exists():
            raise ProcessLookupError(pid)
        return _parse(text)
    raise ProcessLookupError(pid)


def _children_of(pid: int, proc: Path) -> list[int] | None:
    """Children from /proc/PID/task/*/children (CONFIG_PROC_CHILDREN), or None where the kernel lacks it."""
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return []  # gone: no children to report
    kids: list[int] = []
    for task in tasks:
        try:
            text = (task / "children").read_text()
        except FileNotFoundError:
            if task.exists():
                return None
            continue  # the thread exited meanwhile
        except OSError:
            continue
        kids.extend(int(x) for x in text.split())
    return kids


def _parents(proc: Path) -> dict[int, list[int]]:
    """Every process's children by its parent, from the PPID field of /proc/*/stat (the fallback)."""
    by_parent: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1].isdigit():
            by_parent.setdefault(int(fields[1]), []).append(int(entry.name))
    return by_parent


def process_tree(pid: int, proc: str | os.PathLike[str] = "/proc") -> list[int]:
    """``pid`` first, then every descendant (breadth first); [] if ``pid`` does not exist."""
    root = Path(proc)
    if not (root / str(pid)).exists():
        return []
    by_parent: dict[int, list[int]] | None = None
    out: list[int] = []
    queue = [pid]
    seen: set[int] = set()
    while queue:
        p = queue.pop(0)
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
        kids = _children_of(p, root) if by_parent is None else None
        if kids is None:
            if by_parent is None:
                by_parent = _parents(root)
            kids = by_parent.get(p, [])
        queue.extend(sorted(kids))
    return out


def total(pids: list[int], key: str = "uss", proc: str | os.PathLike[str] = "/proc") -> int:
    """The sum of one figure over ``pids``, skipping processes that exited meanwhile."""
    if key not in MEMORY_KEYS:
        raise ValueError(f"unknown memory figure {key!r}; one of {MEMORY_KEYS}")
    got = 0
    for p in pids:
        try:
            got += memory_of(p, proc)[key]
        except ProcessLookupError:
            continue
    return got
