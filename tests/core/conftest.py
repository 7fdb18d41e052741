"""Fixtures for the core tests: a fresh store per test, closed or abandoned afterwards."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable

import pytest

from colofs.core import Store
from colofs.core.ioctx import IOContext


@pytest.fixture
async def open_store(tmp_path) -> AsyncIterator[Callable]:
    """``await open_store(role=...)`` opens (creating) the store under tmp_path; all are abandoned at the end."""
    opened: list[Store] = []

    async def _open(role: str = "secondary", create: bool = True, io: IOContext | None = None) -> Store:
        store = await Store.open(os.path.join(tmp_path, "store"), role=role, create=create, io=io)
        opened.append(store)
        return store

    yield _open
    for s in opened:
        s.abandon()


def snapshot_tree(path: str) -> dict[str, bytes]:
    """Every file under ``path`` with its content, to prove that nothing was written."""
    out: dict[str, bytes] = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out
