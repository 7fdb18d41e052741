"""End-to-end tests: two daemons on loopback; they skip with the reason where nothing can be mounted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mountable import skip_mount_tests

TOOLS = ("fusermount3", "qemu-img", "qemu-io")
HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without /dev/fuse, root or the tools, these tests skip with the reason (they cannot mount)."""
    skip_mount_tests(items, HERE, TOOLS)
