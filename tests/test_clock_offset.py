"""The test-only clock offset of a node (``HYPERCACHEIO_TEST_CLOCK_OFFSET``, read by
``node/daemon.py``): the clock skew of the cluster fault suite (``tests/cluster/nemesis.py``).
A node started with +5 s stamps versions (and expiry) 5 s ahead, like a host whose clock is
5 s fast; a value that is not a number stops the start with a ConfigError naming it."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hypercacheio.errors import ConfigError
from hypercacheio.node.daemon import TEST_CLOCK_OFFSET_ENV, clock_for_tests
from hypercacheio.store import DB_NAME
from node_helpers import Node, node_env


def _row(directory: Path, key: str) -> tuple[int, float]:
    """The version (hlc) and expire_at of ``key``'s row, read from the database file."""
    conn = sqlite3.connect(f"file:{directory / DB_NAME}?mode=ro", uri=True, timeout=10)
    try:
        hlc, expire_at = conn.execute("SELECT hlc, expire_at FROM entries WHERE key = ?",
                                      (key,)).fetchone()
    finally:
        conn.close()
    return int(hlc), float(expire_at)


@pytest.mark.parametrize("offset", [5.0, 0.0])
def test_a_node_with_an_offset_stamps_versions_that_far_ahead(tmp_path: Path,
                                                             offset: float) -> None:
    directory = tmp_path / "node"
    with Node(str(directory), extra_env={TEST_CLOCK_OFFSET_ENV: str(offset)}) as node:
        client = node.client()
        client.set("k", "v", ttl=60)
        client.close()
        hlc, expire_at = _row(directory, "k")
        ahead = (hlc >> 16) / 1000 - time.time()
    # the version is the node's wall clock in ms; the expiry follows the same clock
    assert offset - 1.0 < ahead <= offset + 0.01, ahead
    assert offset + 58 < expire_at - time.time() <= offset + 60.01


@pytest.mark.parametrize("raw", ["soon", "nan", "inf", "1e400"])
def test_an_offset_that_is_not_a_number_is_a_config_error(raw: str) -> None:
    with pytest.raises(ConfigError, match=TEST_CLOCK_OFFSET_ENV):
        clock_for_tests({TEST_CLOCK_OFFSET_ENV: raw})


def test_unset_or_zero_is_the_wall_clock() -> None:
    assert clock_for_tests({}) is time.time
    assert clock_for_tests({TEST_CLOCK_OFFSET_ENV: " 0 "}) is time.time
    assert -2.6 < clock_for_tests({TEST_CLOCK_OFFSET_ENV: "-2.5"})() - time.time() < -2.4


def test_a_node_with_an_invalid_offset_does_not_start(tmp_path: Path) -> None:
    env = node_env(str(tmp_path / "node"), 0, extra={TEST_CLOCK_OFFSET_ENV: "soon"})
    done = subprocess.run([sys.executable, "-m", "hypercacheio.cli", "node", "run", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert TEST_CLOCK_OFFSET_ENV in done.stderr + done.stdout, done
