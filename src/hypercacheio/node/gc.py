"""Background upkeep of the node: collection of what expired, and a watch on the L1 token file.

Collection (expired entries, expired locks and tombstones, then a WAL checkpoint) runs in
its own thread (with its own SQLite connection) so that the event loop keeps answering
while a large batch of expired rows goes. The watch checks the token file a few times a
second, so that a file truncated by another process is repaired before most processes of
the host touch it (see l1.py). Both depend on the Store only.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor

from ..errors import StorageError
from ..store import Store

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.2  # seconds between two checks of the token file


def collect_once(store: Store) -> int:
    """Remove what has expired and checkpoint the WAL; returns how many entries went."""
    removed = store.purge_expired()
    store.checkpoint("PASSIVE")
    return removed


class Collector:
    """Runs ``collect_once`` every ``interval`` seconds until stopped; counts its runs."""

    def __init__(self, store: Store, interval: float,
                 watch_interval: float = WATCH_INTERVAL) -> None:
        self.store = store
        self.interval = interval
        self.watch_interval = watch_interval
        self.runs = 0
        self.removed = 0
        self.failures = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hypercacheio-gc")
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name="hypercacheio-gc"),
                       loop.create_task(self._watch(), name="hypercacheio-l1-watch")]

    async def run_once(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            removed = await loop.run_in_executor(self._executor, collect_once, self.store)
        except (sqlite3.Error, StorageError) as exc:
            self.failures += 1
            log.warning("background collection failed (will retry in %g s): %s",
                        self.interval, exc)
            return 0
        self.runs += 1
        self.removed += removed
        if removed:
            log.info("background collection removed %d expired entries", removed)
        return removed

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.run_once()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval)
            self.store.tokens.check(writing=False)  # repairs; logs when it cannot

    async def stop(self) -> None:
        """Stop the timers, let a running collection finish, close the thread's connection."""
        for task in self._tasks:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.store.close)
        self._executor.shutdown(wait=True)
