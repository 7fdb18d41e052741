"""Fixtures of the end-to-end tests: a mounted pair under the test's directory, always cleaned up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.pair import Pair
from tests.mountable import skip_mount_tests

TOOLS = ("fusermount3", "qemu-img", "qemu-io")
HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without /dev/fuse, root or the tools, these tests skip with the reason (they cannot mount)."""
    skip_mount_tests(items, HERE, TOOLS)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """A primary and a secondary mount (not yet mounted: call ``start``)."""
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()
