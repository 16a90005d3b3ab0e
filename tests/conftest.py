"""Shared fixtures: a fresh cache directory, caches with L1 on and off, an injectable clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from disk_helpers import mounted_tmpfs
from hypercacheio import Cache


class FakeClock:
    """A wall clock that moves only when told (for expiry tests without sleeps)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=[10_000, 0], ids=["l1", "no-l1"])
def cache(request: pytest.FixtureRequest, cache_dir: str, clock: FakeClock) -> Iterator[Cache]:
    c = Cache(cache_dir, l1_max_items=request.param, clock=clock)
    yield c
    c.close()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test (root only; skipped elsewhere)."""
    yield from mounted_tmpfs(tmp_path)
