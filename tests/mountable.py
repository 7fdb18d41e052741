"""Whether this host can run the tests that mount file systems, and why not.

Mount tests need a FUSE device, root (they mount, unmount and kill daemons), and the tools they
drive. Where any is missing they skip with the reason, and every other test still runs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest

FUSE_TOOLS = ("fusermount3",)


def mount_skip_reason(tools: Iterable[str] = FUSE_TOOLS) -> str | None:
    """None when mounts can run here; otherwise what is missing, for the skip message."""
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse (this host or container has no FUSE device)"
    if os.geteuid() != 0:
        return f"needs root to mount and unmount (running as uid {os.geteuid()})"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "needs read-write access to /dev/fuse"
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} on PATH"
    return None


def root_skip_reason() -> str | None:
    """None when running as root (a test mounts a kernel file system such as tmpfs)."""
    if os.geteuid() != 0:
        return f"needs root to mount (running as uid {os.geteuid()})"
    return None


def skip_mount_tests(items: list[pytest.Item], under: Path, tools: Iterable[str]) -> None:
    """Mark the collected tests below ``under`` to skip, with the reason, if mounts cannot run.

    Called from a conftest's ``pytest_collection_modifyitems``, which sees every collected item
    (a conftest's ``pytestmark`` is not applied to anything), hence the filter on the path.
    """
    reason = mount_skip_reason(tools)
    if reason is None:
        return
    mark = pytest.mark.skip(reason=f"mount test {reason}")
    for item in items:
        if item.path.is_relative_to(under):
            item.add_marker(mark)
