"""Fixtures of the end-to-end tests: a mounted pair under the test's directory, always cleaned up."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.pair import Pair

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

for tool in ("fusermount3", "qemu-img", "qemu-io"):
    if shutil.which(tool) is None:
        raise RuntimeError(f"the e2e tests need {tool} on PATH")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """A primary and a secondary mount (not yet mounted: call ``start``)."""
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()
