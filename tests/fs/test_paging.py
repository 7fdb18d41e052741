"""Lists served in pages: every page fits one xattr value, and the pages together are the list."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from colofs.fs.paging import compact, fits, page, page_bounds, paged_name

LIMIT = 2000


@given(st.lists(st.text(max_size=300), max_size=60))
def test_pages_cover_the_list_in_order_and_each_fits(items: list[str]) -> None:
    first = page(items, 0, "x", LIMIT)
    assert first is not None and first["count"] == len(items)
    got: list[str] = []
    for n in range(first["pages"]):
        p = page(items, n, "x", LIMIT)
        assert p is not None and p["pages"] == first["pages"] and p["page"] == n
        assert p["x"] or not items
        # A page's items fit the limit (a single item larger than it gets a page of its own).
        assert len(p["x"]) == 1 or sum(len(compact(i)) for i in p["x"]) <= LIMIT
        got += p["x"]
    assert got == items
    assert page(items, first["pages"], "x", LIMIT) is None
    assert fits(items, LIMIT) == (first["pages"] == 1)


def test_a_long_list_takes_several_pages_each_under_64_kib() -> None:
    snaps = [{"name": f"snapshot-{k:05d}", "disk": "d0", "seq": k, "bytes": 1 << 30} for k in range(3000)]
    bounds = page_bounds(snaps)
    assert len(bounds) > 1
    for n in range(len(bounds)):
        p = page(snaps, n, "snapshots")
        assert p is not None and len(compact(p)) < 64 << 10


def test_page_names() -> None:
    assert paged_name("snapshots.0") == ("snapshots", 0)
    assert paged_name("vms.12") == ("vms", 12)
    for bad in ("snapshots", "snapshots.", "snapshots.x", "snapshots.-1", "vms.1234567890"):
        assert paged_name(bad) is None
