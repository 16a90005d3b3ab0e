"""Several real processes on one real SQLite file: atomicity, locks, coherence, fork, first open."""

from __future__ import annotations

import gc
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

import mp_helpers as mp
from hypercacheio import Cache

pytestmark = pytest.mark.timeout(120)

FORK = multiprocessing.get_context("fork")
SPAWN = multiprocessing.get_context("spawn")


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("l1", [10_000, 0], ids=["l1", "no-l1"])
def test_incr_is_atomic(cache_dir: str, method: str, l1: int) -> None:
    Cache(cache_dir).set("unrelated", 1)
    ctx = multiprocessing.get_context(method)
    lasts = mp.run_all(ctx, mp.incr_many, [(cache_dir, "n", 500, l1)] * 4)
    assert Cache(cache_dir).get("n") == 2000
    assert max(lasts) == 2000


def test_add_has_one_winner_per_key(cache_dir: str) -> None:
    keys = [f"k{i}" for i in range(150)]
    barrier = FORK.Barrier(4)
    won = mp.run_all(FORK, mp.add_race, [(cache_dir, barrier, me, keys) for me in range(4)])
    winners: dict[str, int] = {}
    for me, mine in enumerate(won):
        for key in mine:
            assert key not in winners, f"{key} won by {winners[key]} and {me}"
            winners[key] = me
    assert sorted(winners) == sorted(keys)
    cache = Cache(cache_dir)
    assert {k: cache.get(k) for k in keys} == winners  # the stored value is the winner's


def test_lock_mutual_exclusion_and_fences(tmp_path: Path) -> None:
    directory = str(tmp_path / "cache")
    counter = tmp_path / "counter"
    counter.write_text("0")
    rounds = 25
    results = mp.run_all(FORK, mp.locked_counter,
                         [(directory, str(counter), rounds, me) for me in range(4)])
    assert int(counter.read_text()) == 4 * rounds
    grants = sorted(g for per_process in results for g in per_process)
    assert [n for n, _f in grants] == list(range(4 * rounds))  # every read saw the last write
    fences = [f for _n, f in grants]
    assert fences == sorted(set(fences)), "fencing numbers must grow with every grant"
    for per_process in results:
        own = [f for _n, f in per_process]
        assert own == sorted(set(own))
    assert not os.path.exists(str(counter) + ".inside")


def test_remember_computes_once(cache_dir: str) -> None:
    barrier = FORK.Barrier(4)
    got = mp.run_all(FORK, mp.remember_once, [(cache_dir, barrier, "expensive")] * 4)
    assert Cache(cache_dir).get("remember-calls") == 1
    assert all(g == got[0] for g in got)
    assert got[0]["calls"] == 1


@pytest.mark.parametrize("l1", [10_000, 0], ids=["l1", "no-l1"])
def test_l1_coherence_lockstep(cache_dir: str, l1: int) -> None:
    Cache(cache_dir).set_many({"a": 0, "b": [0]})
    writer_end, reader_end = FORK.Pipe()
    writer = mp.start(FORK, mp.lockstep_writer, cache_dir, writer_end, 300)
    [rounds] = mp.run_all(FORK, mp.lockstep_reader, [(cache_dir, reader_end)])
    if rounds != 300:
        writer.kill()
    assert rounds == 300
    mp.join_ok(writer)


def test_l1_coherence_racing(cache_dir: str) -> None:
    Cache(cache_dir).set("seq", 0)
    published = SPAWN.Value("q", 0, lock=False)
    final = 500
    barrier = FORK.Barrier(3)
    writer = mp.start(FORK, mp.racing_writer, cache_dir, published, final, barrier)
    results = mp.run_all(FORK, mp.racing_reader, [(cache_dir, published, final, barrier)] * 2)
    mp.join_ok(writer)
    for violations, reads in results:
        assert violations == 0
        assert reads > 1


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_fresh_directory_opened_at_once(tmp_path: Path, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    n = 8
    for attempt in range(3 if method == "fork" else 1):
        directory = str(tmp_path / f"fresh{attempt}" / "nested")
        barrier = ctx.Barrier(n)
        results = mp.run_all(ctx, mp.open_at_once, [(directory, barrier, me, n)
                                                    for me in range(n)])
        for seen in results:
            assert seen == [*range(n), n]
        conn = Cache(directory).store.conn()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM meta WHERE name='node_id'").fetchone()[0] == 1


def test_fork_after_use(cache_dir: str) -> None:
    """gunicorn --preload: the parent used the cache (open connection, warm L1), then forks."""
    cache = Cache(cache_dir)
    cache.set("before", "parent")
    cache.set("shared", 0)
    assert cache.get("before") == "parent"
    assert cache.get("shared") == 0  # both in the parent's L1
    with cache.lock("held-by-parent", ttl=60):
        pass
    to_child, child_end = FORK.Pipe()

    def child(conn: Any) -> None:
        try:
            assert cache.get("before") == "parent"  # inherited L1 entry, still valid
            conn.send("ready")
            assert conn.recv() == "parent wrote"
            assert cache.get("shared") == 1, "child served a stale inherited L1 entry"
            for i in range(200):
                cache.incr("counter")
                cache.set(f"child{i}", i)
            cache.set("shared", 2)
            with cache.lock("from-child", ttl=10) as lock:
                assert lock.owned()
            cache.close()
            conn.send("child wrote")
            conn.close()
        except BaseException as exc:  # report to the parent, which asserts
            conn.send(f"error: {exc!r}")
            raise

    proc = mp.start(FORK, child, child_end)
    assert to_child.recv() == "ready"
    cache.set("shared", 1)
    to_child.send("parent wrote")
    for _ in range(200):
        cache.incr("counter")  # parent keeps writing while the child writes
    assert to_child.recv() == "child wrote"
    mp.join_ok(proc)
    assert cache.get("shared") == 2
    assert cache.get("counter") == 400
    assert cache.get_many([f"child{i}" for i in range(200)]) == {f"child{i}": i
                                                                 for i in range(200)}
    cache.set("after", 1)  # the parent's connection still works
    assert Cache(cache_dir).get("after") == 1
    assert cache.store.conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_fork_children_of_children(cache_dir: str) -> None:
    cache = Cache(cache_dir)
    cache.incr("n")

    def grandchild() -> None:
        cache.incr("n")

    def child() -> None:
        cache.incr("n")
        mp.join_ok(mp.start(FORK, grandchild))
        cache.incr("n")

    mp.join_ok(mp.start(FORK, child))
    assert cache.get("n") == 4


def test_child_writes_survive_parent_closing(cache_dir: str) -> None:
    """Regression: a child forked while the parent had a connection open shared SQLite's
    per-file lock tables; when the parent then closed its connection it deleted the -wal
    file the child kept writing into, and the child's later writes were lost to everyone."""
    cache = Cache(cache_dir)
    cache.set("x", 0)  # the parent's connection is open now
    parent_end, child_end = FORK.Pipe()

    def child(conn: Any) -> None:
        mine = Cache(cache_dir)
        mine.set("x", 1)
        conn.send("wrote 1")
        assert conn.recv() == "go"
        mine.set("x", 2)
        conn.send("wrote 2")
        assert conn.recv() == "bye"

    proc = mp.start(FORK, child, child_end)
    assert parent_end.recv() == "wrote 1"
    cache.close()  # the parent's last connection goes
    del cache
    gc.collect()
    parent_end.send("go")
    assert parent_end.recv() == "wrote 2"
    [seen] = mp.run_all(FORK, mp.read_key, [(cache_dir, "x")])  # a process forked now
    fresh = Cache(cache_dir)
    parent_end.send("bye")
    mp.join_ok(proc)
    assert (seen, fresh.get("x")) == (2, 2)


FORK_WHILE_THREADS_WORK = r"""
import os, sys, threading
from hypercacheio import Cache

cache = Cache(sys.argv[1], l1_max_items=0)
errors, stop = [], threading.Event()

def work(n):
    i = 0
    while not stop.is_set():
        try:
            cache.set(f"t{n}:{i % 50}", i)
            cache.get(f"t{n}:{(i + 7) % 50}")
            cache.incr("count")
            with cache.lock(f"l{n}", 5):
                pass
        except Exception as exc:
            errors.append(repr(exc))
        i += 1

threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
for t in threads:
    t.start()
for round_ in range(int(sys.argv[2])):
    pid = os.fork()
    if pid == 0:  # the child writes through its own fresh connection, then leaves
        code = 0
        try:
            Cache(sys.argv[1], l1_max_items=0).set(f"child:{round_}", round_)
        except Exception:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        errors.append(f"child {round_} exited with {status}")
stop.set()
for t in threads:
    t.join()
missing = [r for r in range(int(sys.argv[2])) if cache.get(f"child:{r}") != r]
print(len(errors), sorted(set(errors))[:3], "missing", missing[:5])
sys.exit(1 if errors or missing else 0)
"""


def test_fork_while_other_threads_use_the_store(tmp_path: Path) -> None:
    # fork() closes every connection of the process first (a connection inherited by a
    # child makes SQLite's locks lie); it must wait for threads inside SQLite instead of
    # closing their connection under them, which crashed the process.
    import subprocess
    import sys

    script = tmp_path / "fork_threads.py"
    script.write_text(FORK_WHILE_THREADS_WORK)
    proc = subprocess.run([sys.executable, "-X", "faulthandler", str(script),
                           str(tmp_path / "store"), "150"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert proc.stdout.startswith("0 [] missing []"), proc.stdout
