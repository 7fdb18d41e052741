"""Test-wide settings and fixtures: one hypothesis profile for CI and local runs alike, one mounted pair."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.e2e.pair import Pair

settings.register_profile(
    "colofs",
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("colofs")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """A primary and a secondary mount under the test's directory (call ``start``); always cleaned up."""
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()
