"""docs/control.md against the daemon's own tables, so the reference cannot drift from the code.

The attribute table in docs/control.md names, per ``user.colofs.*`` attribute,
the node kinds it can be read, set and removed on. It must say exactly what
``READABLE``, ``WRITABLE``, ``REMOVABLE`` and ``PAGED`` (lists read in pages, ``NAME.N``) in
``colofs/fs/control.py`` say:
every attribute of the tables is documented with the same kinds, and every
documented attribute exists. A failure names the attribute and what to change.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from colofs.fs.control import PAGED, READABLE, REMOVABLE, WRITABLE
from colofs.fs.inodes import Kind

DOC = Path(__file__).resolve().parent.parent / "docs" / "control.md"
HEADER = "| attribute | read on | set on | remove on |"
DIRECTIONS = ("read", "set", "remove")
Access = dict[str, dict[str, set[str]]]  # attribute -> direction -> node kinds


def documented(text: str) -> Access:
    """The attribute table of docs/control.md: ``user.colofs.NAME`` -> direction -> kinds."""
    lines = text.splitlines()
    try:
        start = lines.index(HEADER)
    except ValueError:
        pytest.fail(f"{DOC} has no attribute table (a line exactly {HEADER!r})")
    out: Access = {}
    known = {k.value for k in Kind}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, f"{DOC}: a row of the attribute table needs 4 cells: {line!r}"
        m = re.fullmatch(r"`user\.colofs\.([a-z_]+(?:\.N)?)`", cells[0])
        assert m, f"{DOC}: the first cell must be `user.colofs.NAME` (or NAME.N for pages): {line!r}"
        name = m.group(1)
        assert name not in out, f"{DOC}: user.colofs.{name} has two rows in the attribute table"
        out[name] = {}
        for direction, cell in zip(DIRECTIONS, cells[1:], strict=True):
            kinds = set() if cell in ("—", "-", "") else {k.strip() for k in cell.split(",")}
            unknown = kinds - known
            assert not unknown, (f"{DOC}: user.colofs.{name}, {direction} on: {sorted(unknown)} are not node kinds "
                                 f"(use {', '.join(k.value for k in Kind)})")
            out[name][direction] = kinds
    return out


def in_code() -> Access:
    """The same, from the daemon's tables; a list read in pages is the readable name ``NAME.N``."""
    out: Access = {}
    paged = {kind: tuple(f"{name}.N" for name in names) for kind, names in PAGED.items()}
    for direction, table in (("read", READABLE), ("read", paged), ("set", WRITABLE), ("remove", REMOVABLE)):
        for kind, names in table.items():
            for name in names:
                out.setdefault(name, {d: set() for d in DIRECTIONS})[direction].add(kind.value)
    return out


def differences(doc: Access, code: Access) -> list[str]:
    """What docs/control.md must change to say what the code does, one line per attribute."""
    problems = []
    for name in sorted(code.keys() - doc.keys()):
        ways = "; ".join(f"{d} on {', '.join(sorted(k))}" for d, k in code[name].items() if k)
        problems.append(f"user.colofs.{name} is missing from docs/control.md ({ways}): add a row to the "
                        "attribute table and a section saying what it does")
    for name in sorted(doc.keys() - code.keys()):
        problems.append(f"user.colofs.{name} is documented in docs/control.md but the daemon has no such "
                        "attribute (colofs/fs/control.py): remove it from the docs")
    for name in sorted(doc.keys() & code.keys()):
        for direction in DIRECTIONS:
            want, have = code[name][direction], doc[name][direction]
            if want != have:
                problems.append(f"user.colofs.{name}: docs/control.md says {direction} on "
                                f"{', '.join(sorted(have)) or '—'}, the daemon allows "
                                f"{', '.join(sorted(want)) or '—'}")
    return problems


def test_control_reference_matches_the_daemons_tables():
    problems = differences(documented(DOC.read_text()), in_code())
    assert not problems, "\n".join(problems)


def test_every_documented_attribute_has_a_section():
    text = DOC.read_text()
    for name in documented(text):
        assert re.search(rf"^### .*`{re.escape(name)}`", text, re.MULTILINE), (
            f"docs/control.md: user.colofs.{name} is in the attribute table but has no '### ... `{name}`' "
            "section saying what it does")


def test_a_new_attribute_is_reported_by_name():
    """The failure message names exactly the attribute that is missing, or extra, or documented wrongly."""
    code, doc = in_code(), in_code()  # two copies agreeing, then each drifts one way
    code["example_new"] = {"read": set(), "set": {"vm"}, "remove": set()}
    doc["example_gone"] = {"read": {"root"}, "set": set(), "remove": set()}
    doc["mode"] = {**doc["mode"], "set": {"vm", "disk"}}
    problems = differences(doc, code)
    assert problems == [
        "user.colofs.example_new is missing from docs/control.md (set on vm): add a row to the attribute table "
        "and a section saying what it does",
        "user.colofs.example_gone is documented in docs/control.md but the daemon has no such attribute "
        "(colofs/fs/control.py): remove it from the docs",
        "user.colofs.mode: docs/control.md says set on disk, vm, the daemon allows vm",
    ]
