"""Many client processes against one node: atomicity, mutual exclusion, clean stops."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from hypercacheio import NodeUnavailable, RemoteCache
from node_helpers import Node

pytestmark = pytest.mark.timeout(180)

WORKERS = 8
ROUNDS = 60
ADD_KEYS = 20


def hammer(url: str, token: str, worker: int, queue: Any) -> None:
    """incr, add and a lock-protected read-modify-write; reports what it saw."""
    rc = RemoteCache(url, token, timeout=10.0)
    increments = 0
    added: list[str] = []
    critical = 0
    for i in range(ROUNDS):
        rc.incr("counter")
        increments += 1
        if i < ADD_KEYS and rc.add(f"add:{i}", worker):
            added.append(f"add:{i}")
        if i % 3 == 0:
            with rc.lock("mutex", ttl=30, blocking_timeout=60):
                # not atomic on its own: only the lock keeps updates from being lost
                inside = rc.incr("inside")
                value = rc.get("plain", 0)
                rc.set("plain", value + 1)
                if rc.decr("inside") != 0 or inside != 1:
                    critical = -10**6  # two holders at once
                critical += 1
    queue.put((worker, increments, added, critical))
    rc.close()


def test_eight_processes_lose_nothing(tmp_path: Path) -> None:
    with Node(str(tmp_path / "load")) as node:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        procs = [ctx.Process(target=hammer, args=(node.url, node.token, w, queue))
                 for w in range(WORKERS)]
        for proc in procs:
            proc.start()
        results = [queue.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join(30)
            assert proc.exitcode == 0
        rc = node.client()
        assert rc.get("counter") == sum(r[1] for r in results) == WORKERS * ROUNDS
        winners = [key for r in results for key in r[2]]
        assert sorted(winners) == sorted(f"add:{i}" for i in range(ADD_KEYS))  # one each
        for r in results:
            for key in r[2]:
                assert rc.get(key) == r[0]
        sections = sum(r[3] for r in results)
        assert sections == WORKERS * len(range(0, ROUNDS, 3))  # no overlap seen
        assert rc.get("plain") == sections  # no update lost under the lock


def writer(url: str, token: str, worker: int, acked: list[str], stop: threading.Event) -> None:
    rc = RemoteCache(url, token, timeout=5.0)
    i = 0
    while not stop.is_set() and i < 100_000:
        key = f"w{worker}:{i}"
        try:
            rc.set(key, i)
        except NodeUnavailable:
            return  # the node is going away: this write was not acknowledged
        acked.append(key)
        i += 1


def test_sigterm_under_load_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    node = Node(str(tmp_path / "term")).start()
    acked: list[list[str]] = [[] for _ in range(4)]
    stop = threading.Event()
    threads = [threading.Thread(target=writer, args=(node.url, node.token, w, acked[w], stop))
               for w in range(4)]
    for t in threads:
        t.start()
    try:
        assert _wait_for(lambda: sum(len(a) for a in acked) >= 400)
        assert node.stop(signal.SIGTERM) == 0  # a clean exit while requests are in flight
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        node.kill()
    assert '"node stopped"' in node.log()
    db = os.path.join(node.directory, "hypercacheio.sqlite")
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = dict(conn.execute("SELECT key, value FROM entries").fetchall())
    finally:
        conn.close()
    total = 0
    for keys in acked:
        for key in keys:
            assert stored.get(key) == int(key.split(":")[1]), key
            total += 1
    assert total >= 400
    # and the node comes back on the same data
    with Node(node.directory) as again:
        rc = again.client()
        assert rc.get(acked[0][-1]) == int(acked[0][-1].split(":")[1])


def _wait_for(predicate: Any, timeout: float = 30.0) -> bool:
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        done.wait(0.01)
    return False
