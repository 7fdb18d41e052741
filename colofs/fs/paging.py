"""Lists that may outgrow one extended attribute value, served in pages.

The kernel refuses any xattr value over 64 KiB, and a list of VMs or of
snapshots has no natural bound. Such a list is cut into pages of compact
JSON of at most :data:`PAGE_BYTES`; page ``N`` is read from the attribute
``NAME.N`` (``user.colofs.snapshots.2``), and every page says how many
there are. Pages are cut afresh at each read: a list that changes between
two reads may show an item twice or skip one, so a client that must be
exact reads page 0 again and compares ``count``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

PAGE_BYTES = 48 << 10
"""Room for the items of one page, well inside the 64 KiB limit with the page's own fields."""


def compact(obj: object) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()


def page_bounds(items: Sequence[Any], limit: int = PAGE_BYTES) -> list[tuple[int, int]]:
    """``(start, stop)`` of each page: as many items as fit in ``limit`` bytes of JSON, at least one."""
    bounds: list[tuple[int, int]] = []
    start = used = 0
    for i, item in enumerate(items):
        size = len(compact(item))
        if i > start and used + size > limit:
            bounds.append((start, i))
            start, used = i, 0
        used += size
    bounds.append((start, len(items)))
    return bounds


def page(items: Sequence[Any], number: int, key: str, limit: int = PAGE_BYTES) -> dict[str, Any] | None:
    """Page ``number`` as ``{"page", "pages", "count", KEY: [...]}``; None past the last page."""
    bounds = page_bounds(items, limit)
    if not 0 <= number < len(bounds):
        return None
    lo, hi = bounds[number]
    return {"page": number, "pages": len(bounds), "count": len(items), key: list(items[lo:hi])}


def fits(items: Sequence[Any], limit: int = PAGE_BYTES) -> bool:
    return len(page_bounds(items, limit)) == 1


def paged_name(key: str) -> tuple[str, int] | None:
    """``("snapshots", 2)`` for ``"snapshots.2"``; None for a name that is not a page."""
    base, dot, number = key.partition(".")
    if not dot or not number.isdigit() or len(number) > 9:
        return None
    return base, int(number)
