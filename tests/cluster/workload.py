"""Clients on every host recording a history: each operation's invoke and completion times
(monotonic seconds since the run's start) and its outcome, ``ok``, ``fail`` (it certainly did
not happen) or ``unknown`` (it may have happened, now or later: a timeout, a lost answer).

Operations (each client draws them from its own seeded ``random.Random``):
- ``set`` of a unique value (``client:n``) on a key of ``KEYS`` and ``get`` of one;
- ``delete`` of one of those keys;
- ``incr`` by 1 of a counter of ``COUNTERS``;
- ``add`` on the key of the current period (``a<n>``, a new one every ``ADD_PERIOD`` s), so
  the clients of every host race on the same keys;
- ``lock``: acquire ``LOCK_NAME`` (ttl ``LOCK_TTL``), hold it a few ms, release it; the
  fence of the grant and the moment the release was sent are recorded.

Every client talks to its own host's node (``RemoteCache``): a secondary's node reads
locally and forwards writes and locks to the primary.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from hypercacheio import RemoteCache
from hypercacheio.errors import AuthError, RequestRejected

from .harness import ClusterHarness

KEYS = 16
COUNTERS = 4
ADD_PERIOD = 0.25
LOCK_NAME = "fenced"
LOCK_TTL = 3.0
LOCK_HOLD = 0.005
CLIENT_TIMEOUT = 1.0
WEIGHTS = {"set": 30, "get": 30, "delete": 8, "incr": 14, "add": 10, "lock": 8}

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"


@dataclass
class Op:
    """One operation of the history."""

    client: str
    host: str
    f: str
    key: str
    value: Any  # set/add: the value written; incr: the delta
    invoke: float
    complete: float
    status: str
    result: Any = None  # get: value read; incr: new value; add/delete: bool; lock: fence
    error: str | None = None
    end: float | None = None  # lock: when the release was sent
    end_status: str | None = None  # lock: the release's outcome

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def classify(exc: BaseException) -> str:
    """``fail`` only when the node certainly refused before doing anything (4xx, a wrong
    token); every other error may hide a write that happened."""
    if isinstance(exc, AuthError):
        return FAIL
    if isinstance(exc, RequestRejected) and 400 <= exc.status < 500 and exc.status != 408:
        return FAIL
    return UNKNOWN


class Client(threading.Thread):
    def __init__(self, name: str, host: str, connect: Callable[[], RemoteCache],
                 rng: random.Random, t0: float, stop: threading.Event,
                 history: list[Op], pace: float, weights: dict[str, int]) -> None:
        super().__init__(name=f"client {name}", daemon=True)
        self.client_name = name
        self.host = host
        self.connect = connect
        self.rng = rng
        self.t0 = t0
        self.stop_event = stop
        self.history = history
        self.pace = pace
        self.n = 0
        self.kinds = [k for k, w in weights.items() if w > 0]
        self.weights = [weights[k] for k in self.kinds]

    def now(self) -> float:
        return time.monotonic() - self.t0

    def run(self) -> None:
        cache = self.connect()
        try:
            while not self.stop_event.is_set():
                f = self.rng.choices(self.kinds, self.weights)[0]
                self.history.append(self.one(cache, f))
                if self.pace:
                    time.sleep(self.pace * self.rng.uniform(0.5, 1.5))
        finally:
            cache.close()

    def one(self, cache: RemoteCache, f: str) -> Op:
        self.n += 1
        rng = self.rng
        if f in ("set", "get", "delete"):
            key = f"k{rng.randrange(KEYS)}"
        elif f == "incr":
            key = f"c{rng.randrange(COUNTERS)}"
        elif f == "add":
            key = f"a{int(self.now() / ADD_PERIOD)}"
        else:
            key = LOCK_NAME
        value: Any = f"{self.client_name}:{self.n}" if f in ("set", "add") else None
        if f == "incr":
            value = 1
        op = Op(self.client_name, self.host, f, key, value, self.now(), 0.0, OK)
        try:
            if f == "set":
                cache.set(key, value)
            elif f == "get":
                op.result = cache.get(key)
            elif f == "delete":
                op.result = cache.delete(key)
            elif f == "incr":
                op.result = cache.incr(key, 1)
            elif f == "add":
                op.result = cache.add(key, value)
            else:
                self.lock(cache, op)
                return op
        except Exception as exc:
            op.status = FAIL if f == "get" else classify(exc)
            op.error = f"{type(exc).__name__}: {exc}"[:200]
        op.complete = self.now()
        return op

    def lock(self, cache: RemoteCache, op: Op) -> None:
        lock = cache.lock(LOCK_NAME, ttl=LOCK_TTL)
        try:
            got = lock.acquire(blocking=True, timeout=0.2)
        except Exception as exc:
            op.status = classify(exc)
            op.error = f"{type(exc).__name__}: {exc}"[:200]
            op.complete = self.now()
            return
        op.complete = self.now()
        if not got:
            op.status = FAIL
            op.error = "not acquired within 0.2 s"
            return
        op.result = lock.fence
        time.sleep(LOCK_HOLD)
        op.end = self.now()
        try:
            op.end_status = OK if lock.release() else FAIL
        except Exception:
            op.end_status = UNKNOWN


class Workload:
    """``clients_per_host`` clients on each host of ``harness``, recording into ``history``."""

    def __init__(self, harness: ClusterHarness, seed: int, t0: float,
                 clients_per_host: int = 2, pace: float = 0.004,
                 weights: dict[str, int] | None = None) -> None:
        self.harness = harness
        self.stop_event = threading.Event()
        self.history: list[Op] = []
        self.clients: list[Client] = []
        for h, host in enumerate(harness.hosts):
            for c in range(clients_per_host):
                name = f"{host.name}/{c}"
                rng = random.Random(seed * 1000 + h * 10 + c)
                self.clients.append(Client(
                    name, host.name, partial(host.client, CLIENT_TIMEOUT), rng, t0,
                    self.stop_event, self.history, pace, weights or WEIGHTS))

    def start(self) -> None:
        for client in self.clients:
            client.start()

    def stop(self) -> list[Op]:
        self.stop_event.set()
        for client in self.clients:
            client.join(30)
        return sorted(self.history, key=lambda op: op.invoke)
