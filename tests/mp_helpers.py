"""Functions run in child processes by the multi-process and crash tests.

They live in a plain module (on pytest's ``pythonpath``) so that ``spawn`` children can
import them. Each returns plain data or raises; the parent asserts.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

from hypercacheio import Cache

JOIN_TIMEOUT = 60.0


def _report(queue: Any, index: int, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        queue.put((index, True, target(*args)))
    except BaseException as exc:
        queue.put((index, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise


def run_all(ctx: Any, target: Callable[..., Any], args_list: list[tuple[Any, ...]]) -> list[Any]:
    """Run ``target(*args)`` in one process per args; return results in order, raise on error.

    Processes rather than a Pool, so that barriers and values pass by inheritance (and under
    spawn by the Process pickling that supports them).
    """
    queue = ctx.Queue()
    procs = [start(ctx, _report, queue, i, target, args) for i, args in enumerate(args_list)]
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            index, ok, value = queue.get(timeout=JOIN_TIMEOUT)
            if not ok:
                raise AssertionError(f"child {index} failed: {value}")
            results[index] = value
    finally:
        for proc in procs:
            proc.join(JOIN_TIMEOUT)
            if proc.is_alive():
                proc.kill()
    join_ok(*procs)
    return [results[i] for i in range(len(procs))]


def start(ctx: Any, target: Callable[..., Any], *args: Any) -> multiprocessing.process.BaseProcess:
    proc = ctx.Process(target=target, args=args)
    proc.start()
    return proc


def join_ok(*procs: multiprocessing.process.BaseProcess) -> None:
    for proc in procs:
        proc.join(JOIN_TIMEOUT)
        assert proc.exitcode == 0, f"{proc.name} exited with {proc.exitcode}"


# ---- incr, add ------------------------------------------------------------------------------


def incr_many(directory: str, key: str, times: int, l1: int) -> int:
    cache = Cache(directory, l1_max_items=l1)
    last = 0
    for _ in range(times):
        value = cache.incr(key)
        assert value > last  # each process sees its own increments in order
        last = value
    return last


def add_race(directory: str, barrier: Any, me: int, keys: list[str]) -> list[str]:
    cache = Cache(directory)
    barrier.wait()
    return [k for k in keys if cache.add(k, me)]


# ---- locks ------------------------------------------------------------------------------


def locked_counter(directory: str, counter_path: str, rounds: int,
                   me: int) -> list[tuple[int, int]]:
    """Increment a number in a plain file under the lock; return (number read, fence) pairs.

    Overlap is detected with an O_EXCL marker file: creating it fails if another process is
    inside the critical section at the same moment.
    """
    cache = Cache(directory)
    marker = counter_path + ".inside"
    grants: list[tuple[int, int]] = []
    for _ in range(rounds):
        with cache.lock("counter", ttl=30) as lock:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # FileExistsError: overlap
            os.close(fd)
            with open(counter_path) as fh:
                number = int(fh.read())
            time.sleep(0.0005)
            with open(counter_path, "w") as fh:
                fh.write(str(number + 1))
            assert lock.fence is not None
            grants.append((number, lock.fence))
            os.unlink(marker)
    return grants


def remember_once(directory: str, barrier: Any, key: str) -> Any:
    cache = Cache(directory)

    def compute() -> dict[str, int]:
        calls = cache.incr("remember-calls")
        time.sleep(0.2)  # long enough for the others to arrive and wait on the lock
        return {"pid": os.getpid(), "calls": calls}

    barrier.wait()
    return cache.remember(key, 60, compute)


# ---- coherence ----------------------------------------------------------------------------


def lockstep_writer(directory: str, conn: Any, rounds: int) -> None:
    """Write round i, then tell the reader; wait for its answer before the next round."""
    cache = Cache(directory)
    for i in range(1, rounds + 1):
        if i % 3 == 0:
            cache.set_many({"a": i, "b": [i]})
        elif i % 3 == 1:
            cache.set("a", i)
            cache.set("b", [i])
        else:
            cache.incr("a")
            cache.set("b", [i])
        conn.send(i)
        assert conn.recv() == "ok"
    conn.send(None)


def lockstep_reader(directory: str, conn: Any) -> int | str:
    """After each notice, the values read must be those of that round (L1 is warm)."""
    cache = Cache(directory)
    rounds = 0
    cache.get("a")
    cache.get("b")
    while True:
        i = conn.recv()
        if i is None:
            return rounds
        got = (cache.get("a"), cache.get("b"), cache.get_many(["a"]).get("a"))
        if got != (i, [i], i):
            conn.send(f"round {i}: read {got}")
            return f"round {i}: read {got}"
        for _ in range(3):  # warm L1 again for the next round
            cache.get("a")
            cache.get("b")
        conn.send("ok")
        rounds += 1


def racing_writer(directory: str, published: Any, rounds: int, barrier: Any) -> None:
    cache = Cache(directory)
    barrier.wait()
    for i in range(1, rounds + 1):
        cache.set("seq", i)
        published.value = i  # only after set() returned: the write is committed


def racing_reader(directory: str, published: Any, final: int, barrier: Any) -> tuple[int, int]:
    """Read continuously; a value below what was published before the read is a violation."""
    cache = Cache(directory)
    cache.get("seq")
    barrier.wait()
    violations = reads = 0
    deadline = time.monotonic() + JOIN_TIMEOUT
    while time.monotonic() < deadline:
        floor = published.value
        value = cache.get("seq", 0)
        reads += 1
        if value < floor:
            violations += 1
        if floor == final and value == final:
            break
    return violations, reads


def read_key(directory: str, key: str) -> Any:
    return Cache(directory).get(key)


# ---- opening at once ------------------------------------------------------------------------


def open_at_once(directory: str, barrier: Any, me: int, n: int) -> list[Any]:
    barrier.wait()
    cache = Cache(directory)
    cache.set(f"p{me}", me)
    cache.incr("opened")
    barrier.wait()  # everyone has written
    return [cache.get(f"p{i}") for i in range(n)] + [cache.get("opened")]


# ---- crashes --------------------------------------------------------------------------------


def acking_writer(directory: str, conn: Any, kind: str) -> None:
    """Write forever; after each write returns, send its sequence number (the ack)."""
    cache = Cache(directory)
    i = 0
    while True:
        i += 1
        if kind == "set":
            cache.set(f"k{i}", {"seq": i, "pad": "x" * (i % 200)})
        elif kind == "incr":
            cache.incr("counter")
        else:
            cache.set_many({f"m{i}a": i, f"m{i}b": [i]})
        conn.send(i)


def hold_lock_forever(directory: str, conn: Any) -> None:
    cache = Cache(directory)
    lock = cache.lock("crashy", ttl=1000)
    assert lock.acquire(blocking=False)
    conn.send(lock.fence)
    while True:
        time.sleep(0.05)
