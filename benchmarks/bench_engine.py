"""The engine benchmark: hypercacheio next to its anchors, measured side by side in one run.

    python benchmarks/bench_engine.py [--quick] [--rounds N] [--duration S] [--output FILE]

Every single-process figure is the median over interleaved rounds (each round measures every
operation once, in a shuffled order), so a neighbour's burst of CPU use hits all rows alike.
Ratios are the median of the per-round ratios. Harness: a plain ``for`` loop over a
precomputed list of 1,000 hot keys calling a bound method (``for k in keys: f(k)``), timed
with ``time.perf_counter``; the time of the same loop with an empty body is subtracted, so
the figure is the cost of the call alone, for hypercacheio and the reference alike.

The multi-process row runs 4 processes for a fixed duration, 90% get / 10% set on the same
1,000 keys, once for hypercacheio and once for diskcache per round, and counts exceptions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing as mp
import os
import pickle
import platform
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    from hypercacheio import Cache
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from hypercacheio import Cache

N_KEYS = 1000
PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
INSTALL_HINT = {
    "diskcache": "pip install diskcache  (or: pip install -e '.[bench]')",
    "redis": "pip install redis  (or: pip install -e '.[bench]')",
    "redis-server": "apt-get install -y redis-server  (macOS: brew install redis)",
    "django": "pip install Django  (or: pip install -e '.[bench]')",
}

# The raw-SQLite baseline: the same pragmas as the store, the leanest fitting table.
RAW_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA cache_size=-16384",
    "PRAGMA temp_store=MEMORY",
)
RAW_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB) WITHOUT ROWID"
RAW_GET = "SELECT value FROM kv WHERE key = ?"
RAW_SET = "INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)"


def make_keys() -> list[str]:
    return [f"user:{i:04d}:profile" for i in range(N_KEYS)]


def small_value(i: int) -> dict[str, Any]:
    """A small value of the kind apps cache (pickled by every backend, about 70 bytes)."""
    return {"id": i, "name": f"user-{i}", "active": True, "score": i * 0.5}


# ---- timing ------------------------------------------------------------------------------


def loop1(f: Callable[[Any], Any], args: Sequence[Any]) -> float:
    t0 = time.perf_counter()
    for a in args:
        f(a)
    return time.perf_counter() - t0


def empty1(f: Callable[[Any], Any], args: Sequence[Any]) -> float:
    t0 = time.perf_counter()
    for _a in args:
        pass
    return time.perf_counter() - t0


def loop2(f: Callable[[Any, Any], Any], pairs: Sequence[tuple[Any, Any]]) -> float:
    t0 = time.perf_counter()
    for a, b in pairs:
        f(a, b)
    return time.perf_counter() - t0


def empty2(f: Callable[[Any, Any], Any], pairs: Sequence[tuple[Any, Any]]) -> float:
    t0 = time.perf_counter()
    for _a, _b in pairs:
        pass
    return time.perf_counter() - t0


@dataclass
class Op:
    """One measured operation: ``fn`` called on every item of ``args``, ``repeat`` times.

    ``others``: further argument lists used in turn (writes alternate between two values per
    key, so that no backend ever rewrites identical bytes, which SQLite can shortcut).
    """

    name: str
    fn: Callable[..., Any]
    args: Sequence[Any]
    repeat: int = 1
    pairs: bool = False
    others: list[Sequence[Any]] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)  # seconds per call, one per round
    calls: int = 0

    def measure(self) -> None:
        loop, empty = (loop2, empty2) if self.pairs else (loop1, empty1)
        choices = [self.args, *self.others]
        total = base = 0.0
        for _ in range(self.repeat):
            args = choices[self.calls % len(choices)]
            self.calls += 1
            total += loop(self.fn, args)
            base += empty(self.fn, args)
        self.samples.append(max(total - base, 0.0) / (self.repeat * len(self.args)))

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def ratio(a: Op, b: Op) -> float:
    """Median of the per-round ratios a/b (robust to a slow round)."""
    return statistics.median(x / y for x, y in zip(a.samples, b.samples, strict=True) if y > 0)


# ---- the anchors -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(notes: list[str]) -> Iterator[Any]:
    """A redis-py client to a throwaway local redis-server, or None with a note why not."""
    try:
        import redis
    except ImportError:
        notes.append(f"redis rows skipped: redis-py is missing ({INSTALL_HINT['redis']})")
        yield None
        return
    exe = shutil.which("redis-server")
    if exe is None:
        notes.append("redis rows skipped: redis-server is not installed "
                      f"({INSTALL_HINT['redis-server']})")
        yield None
        return
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    notes.append("redis rows skipped: redis-server did not start")
                    yield None
                    return
                time.sleep(0.05)
        yield client
        client.close()
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def django_locmem(notes: list[str]) -> Any:
    try:
        import django
        from django.conf import settings
    except ImportError:
        notes.append(f"Django locmem rows skipped: Django is missing ({INSTALL_HINT['django']})")
        return None
    if not settings.configured:
        settings.configure(CACHES={"default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache"}})
        django.setup()
    from django.core.cache.backends.locmem import LocMemCache

    return LocMemCache("bench", {"TIMEOUT": None, "OPTIONS": {"MAX_ENTRIES": 100_000}})


# ---- multi-process workload ---------------------------------------------------------------


def _mp_worker(kind: str, directory: str, seed: int, duration: float, start: Any,
               out: Any) -> None:
    keys = make_keys()
    values = [small_value(i) for i in range(N_KEYS)]
    rng = random.Random(seed)
    plan = [(rng.random() < 0.1, rng.randrange(N_KEYS)) for _ in range(10_000)]
    errors = ops = 0
    try:
        if kind == "hypercacheio":
            cache: Any = Cache(directory)
        else:
            import diskcache

            cache = diskcache.Cache(directory)
        get, put = cache.get, cache.set
        start.wait()
        t_end = time.monotonic() + duration
        while time.monotonic() < t_end:
            for is_set, i in plan[(ops % 10_000):(ops % 10_000) + 200]:
                try:
                    if is_set:
                        put(keys[i], values[i])
                    else:
                        get(keys[i])
                except Exception:
                    errors += 1
                ops += 1
        cache.close()
    except Exception:
        errors += 1
    out.put((ops, errors))


def run_processes(kind: str, directory: str, procs: int, duration: float) -> tuple[float, int]:
    """Aggregate ops/s of ``procs`` processes for ``duration`` s, and the exceptions seen."""
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(procs + 1)
    out = ctx.Queue()
    workers = [ctx.Process(target=_mp_worker, args=(kind, directory, seed, duration, start, out))
               for seed in range(procs)]
    for w in workers:
        w.start()
    start.wait()
    results = [out.get(timeout=duration + 120) for _ in workers]
    for w in workers:
        w.join()
    return sum(r[0] for r in results) / duration, sum(r[1] for r in results)


# ---- the run ------------------------------------------------------------------------------


@dataclass
class Row:
    operation: str
    ours: str
    reference: str
    ratio: str
    target: str
    met: str


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.3f} us" if seconds < 1e-6 else f"{seconds * 1e6:.2f} us"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter runs")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 7, quick 3)")
    parser.add_argument("--duration", type=float,
                        help="seconds of each multi-process run (default 3, quick 1.5)")
    parser.add_argument("--procs", type=int, default=4, help="processes of the mixed run")
    parser.add_argument("--output", help="also write the table as markdown to this file")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    duration = args.duration or (1.5 if args.quick else 3.0)
    mp_rounds = 1 if args.quick else 3
    scale = 1 if args.quick else 2
    notes: list[str] = []

    root = tempfile.mkdtemp(prefix="hypercacheio-bench-")
    try:
        keys = make_keys()
        values = [small_value(i) for i in range(N_KEYS)]
        strings = [f"value-{i}" for i in range(N_KEYS)]
        pairs = list(zip(keys, values, strict=True))
        pairs_b = [(k, {**v, "rev": 2}) for k, v in pairs]  # the second value of each key
        order = list(range(N_KEYS))
        random.Random(7).shuffle(order)
        hot = [keys[i] for i in order]  # the same 1,000 keys in a scattered order

        # L1: str values (immutable, kept as they are) against a dict of the same items.
        l1 = Cache(os.path.join(root, "l1"))
        for k, v in zip(keys, strings, strict=True):
            l1.set(k, v)
        for k in hot:
            l1.get(k)
        plain = dict(zip(keys, strings, strict=True))

        l2 = Cache(os.path.join(root, "l2"), l1_max_items=0)
        for k, v in pairs:
            l2.set(k, v)

        raw = sqlite3.connect(os.path.join(root, "raw.sqlite"), isolation_level=None)
        for pragma in RAW_PRAGMAS:
            raw.execute(pragma)
        raw.execute(RAW_SCHEMA)
        for k, v in pairs:
            raw.execute(RAW_SET, (k, pickle.dumps(v, PICKLE_PROTOCOL)))
        raw_execute, loads, dumps = raw.execute, pickle.loads, pickle.dumps

        def raw_get(key: str) -> Any:
            row = raw_execute(RAW_GET, (key,)).fetchone()
            return None if row is None else loads(row[0])

        def raw_set(key: str, value: Any) -> None:
            raw_execute(RAW_SET, (key, dumps(value, PICKLE_PROTOCOL)))

        counters = [f"counter:{i:04d}" for i in range(N_KEYS)]
        for k in counters:
            l2.set(k, 0)
        locks = [l2.lock(f"job:{i:04d}", ttl=30) for i in range(N_KEYS)]

        def lock_cycle(lock: Any) -> None:
            lock.acquire(blocking=False)
            lock.release()

        ops: dict[str, Op] = {
            "dict.get": Op("dict.get", plain.get, hot, repeat=200),
            "l1.get": Op("l1.get", l1.get, hot, repeat=200),
            "l2.get": Op("l2.get", l2.get, hot, repeat=2 * scale),
            "raw.get": Op("raw.get", raw_get, hot, repeat=2 * scale),
            "set": Op("set", l2.set, pairs, repeat=scale, pairs=True, others=[pairs_b]),
            "raw.set": Op("raw.set", raw_set, pairs, repeat=scale, pairs=True,
                          others=[pairs_b]),
            "incr": Op("incr", l2.incr, counters, repeat=scale),
            "lock": Op("lock", lock_cycle, locks, repeat=scale),
        }
        try:
            import diskcache
        except ImportError:
            diskcache = None
            notes.append(f"diskcache rows skipped: diskcache is missing "
                         f"({INSTALL_HINT['diskcache']})")
        if diskcache is not None:
            dc = diskcache.Cache(os.path.join(root, "diskcache"))
            for k, v in pairs:
                dc.set(k, v)
            ops["dc.get"] = Op("dc.get", dc.get, hot, repeat=2 * scale)
            ops["dc.set"] = Op("dc.set", dc.set, pairs, pairs=True, others=[pairs_b])
        locmem = django_locmem(notes)
        if locmem is not None:
            for k, v in zip(keys, strings, strict=True):
                locmem.set(k, v)
            ops["locmem.get"] = Op("locmem.get", locmem.get, hot, repeat=20)
            ops["locmem.set"] = Op("locmem.set", locmem.set, pairs, repeat=5, pairs=True,
                                   others=[pairs_b])

        with redis_server(notes) as rclient:
            if rclient is not None:
                for k, v in pairs:
                    rclient.set(k, dumps(v, PICKLE_PROTOCOL))
                rget_raw, rset_raw = rclient.get, rclient.set

                def redis_get(key: str) -> Any:
                    data = rget_raw(key)
                    return None if data is None else loads(data)

                def redis_set(key: str, value: Any) -> None:
                    rset_raw(key, dumps(value, PICKLE_PROTOCOL))

                ops["redis.get"] = Op("redis.get", redis_get, hot)
                ops["redis.set"] = Op("redis.set", redis_set, pairs, pairs=True,
                                      others=[pairs_b])

            shuffler = random.Random(11)
            names = list(ops)
            for r in range(rounds):
                shuffler.shuffle(names)
                for name in names:
                    ops[name].measure()
                print(f"  round {r + 1}/{rounds} done", file=sys.stderr)

        mixed: dict[str, list[tuple[float, int]]] = {"hypercacheio": []}
        if diskcache is not None:
            mixed["diskcache"] = []
        for r in range(mp_rounds):
            for kind in mixed:
                directory = os.path.join(root, f"mp-{kind}-{r}")
                mixed[kind].append(run_processes(kind, directory, args.procs, duration))
            print(f"  mixed round {r + 1}/{mp_rounds} done", file=sys.stderr)

        rows = build_rows(ops, mixed, args.procs)
        table = render(rows)
        how = (f"Harness: `for k in keys: f(k)` over 1,000 hot keys with a bound method, "
               f"timed by perf_counter, minus the same loop with an empty body; median of "
               f"{rounds} interleaved rounds; ratio = median of per-round ratios. L1 rows use "
               f"short str values; other rows a small dict (pickled). Raw SQLite: table "
               f"`kv(key TEXT PRIMARY KEY, value BLOB) WITHOUT ROWID`, the store's pragmas, "
               f"autocommit. Mixed: {args.procs} spawned processes x {duration:g} s, "
               f"{mp_rounds} round(s) each, default Cache (L1 on) vs diskcache.Cache.")
        env = (f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
               f"{os.cpu_count()} CPUs, {platform.system()} {platform.machine()}")
        print()
        print(table)
        print()
        print(how)
        print(env)
        for note in notes:
            print(f"Note: {note}")
        if args.output:
            write_results(args.output, argv, table, how, env, notes)
        unmet = [r.operation for r in rows if r.met == "no"]
        return 1 if unmet else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def build_rows(ops: dict[str, Op], mixed: dict[str, list[tuple[float, int]]],
               procs: int) -> list[Row]:
    rows: list[Row] = []

    def compare(label: str, ours: str, ref: str, ref_label: str, limit: float | None,
                better: float | None = None) -> None:
        """limit: ours/ref must be <= limit; better: ref/ours must be >= better."""
        if ours not in ops or ref not in ops:
            return
        a, b = ops[ours], ops[ref]
        r = ratio(a, b)
        if limit is not None:
            target, met = f"<= {limit:g}x", "yes" if r <= limit else "no"
        elif better is not None:
            target, met = (f">= {better:g}x faster" if better > 1 else ">= 1x faster",
                           "yes" if 1 / r >= better else "no")
        else:
            target, met = "reference", "-"
        shown = f"{1 / r:.2f}x faster" if better is not None else f"{r:.2f}x"
        rows.append(Row(label, us(a.median), f"{us(b.median)} ({ref_label})", shown,
                        target, met))

    compare("L1 hit `get`", "l1.get", "dict.get", "dict.get", 6)
    compare("L2 `get` (l1_max_items=0)", "l2.get", "raw.get", "sqlite3 SELECT + pickle.loads",
            1.25)
    compare("L2 `get` (l1_max_items=0)", "l2.get", "dc.get", "diskcache.Cache.get", None, 1)
    compare("`set`", "set", "raw.set", "sqlite3 INSERT OR REPLACE + pickle.dumps", 1.5)
    compare("`set`", "set", "dc.set", "diskcache.Cache.set", None, 3)
    compare("`incr`", "incr", "set", "hypercacheio `set`", 1.5)
    compare("lock acquire+release", "lock", "set", "hypercacheio `set`", 3)
    compare("L1 hit `get`", "l1.get", "locmem.get", "Django locmem get", None)
    compare("`set`", "set", "locmem.set", "Django locmem set", None)
    compare("L2 `get` (l1_max_items=0)", "l2.get", "redis.get", "redis-py GET + pickle.loads",
            None)
    compare("`set`", "set", "redis.set", "redis-py SET + pickle.dumps", None)
    if "diskcache" in mixed:
        ours_rate = statistics.median(r[0] for r in mixed["hypercacheio"])
        ref_rate = statistics.median(r[0] for r in mixed["diskcache"])
        errors = sum(r[1] for r in mixed["hypercacheio"])
        ref_errors = sum(r[1] for r in mixed["diskcache"])
        runs = zip(mixed["hypercacheio"], mixed["diskcache"], strict=True)
        speedup = statistics.median(a[0] / b[0] for a, b in runs if b[0])
        ok = speedup >= 1.5 and errors == 0
        rows.append(Row(
            f"{procs} processes, 90% get / 10% set",
            f"{ours_rate:,.0f} ops/s, {errors} errors",
            f"{ref_rate:,.0f} ops/s, {ref_errors} errors (diskcache)",
            f"{speedup:.2f}x", ">= 1.5x, 0 errors", "yes" if ok else "no",
        ))
    return rows


def render(rows: list[Row]) -> str:
    head = ["operation", "hypercacheio", "reference", "ratio", "target", "met?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append(f"| {r.operation} | {r.ours} | {r.reference} | {r.ratio} | {r.target} "
                     f"| {r.met} |")
    return "\n".join(lines)


def write_results(path: str, argv: list[str] | None, table: str, how: str, env: str,
                  notes: list[str]) -> None:
    command = "python benchmarks/bench_engine.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    today = datetime.date.today().isoformat()
    parts = [
        "# Engine benchmark results", "",
        f"Measured {today} with `{command.strip()}`", "", env, "", table, "", how, "",
    ]
    parts += [f"Note: {note}" for note in notes]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(parts).rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(main())
