"""Functions run in child processes by the store tests (importable by ``spawn`` children)."""

from __future__ import annotations

from typing import Any

from hypercacheio.codec import TAG_INT
from hypercacheio.store import Store


class FrozenClock:
    """A wall clock stuck at one instant: every write of every process in one millisecond."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def stamp_writer(directory: str, barrier: Any, me: int, rounds: int, now: float) -> list[int]:
    """Write this writer's own keys by every write kind; the hlc each write stamped, in order."""
    store = Store(directory, clock=FrozenClock(now))
    key = f"w{me}"
    hlc_of = "SELECT hlc FROM entries WHERE key = ?"
    stamps: list[int] = []
    barrier.wait()
    for i in range(rounds):
        kind = i % 4
        if kind == 0:
            store.set(key, TAG_INT, i, None)  # the one-statement shortcut
        elif kind == 1:
            store.incr(key, 1, None)
        elif kind == 2:
            store.set_many([(key, TAG_INT, i, None), (key + "b", TAG_INT, i, None)])
        else:
            store.touch(key, None)
        stamps.append(int(store.conn().execute(hlc_of, (key,)).fetchone()[0]))
    store.close()
    return stamps


def mark_clustered(directory: str, clustered: bool) -> bool:
    store = Store(directory)
    store.mark_clustered(clustered)
    store.close()
    return clustered


def plain_writes(directory: str) -> tuple[bool, bool]:
    """A process opened without ``clustered=``: set, delete, incr; (delete result, clustered)."""
    store = Store(directory)
    store.set("p", TAG_INT, 1, None)
    deleted = store.delete("p")
    store.incr("n", 1, None)
    store.close()
    return deleted, store.clustered
