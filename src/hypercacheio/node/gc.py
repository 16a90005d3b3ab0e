"""Background collection: expired entries, expired locks and tombstones, then a WAL checkpoint.

It runs in its own thread (with its own SQLite connection) so that the event loop keeps
answering while a large batch of expired rows goes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor

from ..errors import StorageError
from ..store import Store
from .api import NodeState

log = logging.getLogger(__name__)


def collect_once(store: Store) -> int:
    """Remove what has expired and checkpoint the WAL; returns how many entries went."""
    removed = store.purge_expired()
    store.checkpoint("PASSIVE")
    return removed


class Collector:
    """Runs ``collect_once`` every ``interval`` seconds until stopped."""

    def __init__(self, state: NodeState, interval: float) -> None:
        self.state = state
        self.interval = interval
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hypercacheio-gc")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hypercacheio-gc")

    async def run_once(self) -> int:
        loop = asyncio.get_running_loop()
        state = self.state
        try:
            removed = await loop.run_in_executor(self._executor, collect_once, state.store)
        except (sqlite3.Error, StorageError) as exc:
            state.gc_failures += 1
            log.warning("background collection failed (will retry in %g s): %s",
                        self.interval, exc)
            return 0
        state.gc_runs += 1
        state.gc_removed += removed
        if removed:
            log.info("background collection removed %d expired entries", removed)
        return removed

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.run_once()

    async def stop(self) -> None:
        """Stop the timer, let a running collection finish, close the thread's connection."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.state.store.close)
        self._executor.shutdown(wait=True)
