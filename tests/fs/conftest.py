from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fs.mounts import Mount
from tests.mountable import skip_mount_tests

TOOLS = ("fusermount3", "qemu-img", "qemu-io", "fio")
HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without /dev/fuse, root or the tools, these tests skip with the reason (they cannot mount)."""
    skip_mount_tests(items, HERE, TOOLS)


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Make mounts under the test's directory; each is unmounted (or killed and detached) at the end."""
    made: list[Mount] = []

    def make(role: str = "secondary", name: str = "m", mount: bool = True) -> Mount:
        m = Mount(tmp_path, role, name)
        made.append(m)
        if mount:
            m.mount()
        return m

    try:
        yield make
    finally:
        for m in made:
            m.cleanup()


@pytest.fixture
def sec(mounts: Callable[..., Mount]) -> Mount:
    return mounts("secondary")


@pytest.fixture
def pri(mounts: Callable[..., Mount]) -> Mount:
    return mounts("primary")


@pytest.fixture
def wsec(mounts: Callable[..., Mount]) -> Mount:
    """A secondary with a worker per VM, whatever COLOFS_TEST_WORKERS asks of the other mounts."""
    m = mounts(mount=False)
    m.mount("--workers")
    return m


def random_image(path: Path, size: int, seed: int) -> bytes:
    """A raw image with reproducible random content (plus a zero stretch, to stay sparse-friendly)."""
    import random

    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(size))
    data[size // 4 : size // 4 + size // 8] = bytes(size // 8)
    path.write_bytes(data)
    return bytes(data)
