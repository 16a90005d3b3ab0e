"""Django cache backends side by side, through Django's API (``caches[alias]``), in one run.

    python benchmarks/bench_django.py [--rounds N] [--budget SECONDS] [--no-redis]

Rows: our backend; the engine it wraps, called directly; Django's locmem, filebased and
database (SQLite) backends; diskcache's DjangoCache; django-redis against a redis-server
started here on a unix socket (skipped, with a note, if redis-server or django-redis is
missing: ``apt-get install -y redis-server``, ``pip install -e '.[bench]'``).

Each figure is the median over interleaved rounds (every round measures every cell once,
in a shuffled order). One cell: calls over 1,000 hot keys in chunks of 100 until the time
budget is spent; the cost of the same loop with an empty body is subtracted. Ratios are
each backend's median over ours: above 1 means ours is faster.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

try:
    import hypercacheio
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    import hypercacheio

import django
from django.conf import settings

N_KEYS = 1000
CHUNK = 100
STR_VALUE = "x" * 100
DICT_VALUE = {"id": 12345, "name": "Ada Lovelace", "tags": ["math", "engines"], "score": 9.5}
OPS = ("get str", "get dict", "set dict")


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes] | None, str]:
    """A private redis-server on a unix socket: (process, location) or (None, reason)."""
    server = shutil.which("redis-server")
    if server is None:
        return None, "redis-server not found (apt-get install -y redis-server)"
    try:
        import django_redis  # noqa: F401
    except ImportError:
        return None, "django-redis not installed (pip install -e '.[bench]')"
    sock = os.path.join(workdir, "redis.sock")
    proc = subprocess.Popen(
        [server, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            return None, "redis-server did not start"
        time.sleep(0.05)
    return proc, f"unix://{sock}?db=0"


def configure(workdir: str, redis_location: str | None) -> list[tuple[str, str]]:
    """Django settings with one alias per row; returns (label, alias) pairs."""
    caches: dict[str, dict[str, Any]] = {
        "hypercacheio": {"BACKEND": "hypercacheio.contrib.django.HyperCacheIOCache",
                         "LOCATION": os.path.join(workdir, "hypercacheio")},
        "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                   "OPTIONS": {"MAX_ENTRIES": 10 * N_KEYS}},
        "filebased": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                      "LOCATION": os.path.join(workdir, "filebased"),
                      "OPTIONS": {"MAX_ENTRIES": 10 * N_KEYS}},
        "db": {"BACKEND": "django.core.cache.backends.db.DatabaseCache",
               "LOCATION": "bench_cache_table", "OPTIONS": {"MAX_ENTRIES": 10 * N_KEYS}},
    }
    rows = [("hypercacheio (Django API)", "hypercacheio"), ("locmem", "locmem"),
            ("filebased", "filebased"), ("db (SQLite)", "db")]
    try:
        import diskcache  # noqa: F401

        caches["diskcache"] = {"BACKEND": "diskcache.DjangoCache",
                               "LOCATION": os.path.join(workdir, "diskcache")}
        rows.append(("diskcache DjangoCache", "diskcache"))
    except ImportError:
        pass
    if redis_location:
        caches["redis"] = {"BACKEND": "django_redis.cache.RedisCache",
                           "LOCATION": redis_location}
        rows.append(("django-redis (unix socket)", "redis"))
    settings.configure(
        CACHES={"default": caches["hypercacheio"], **caches},
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                               "NAME": os.path.join(workdir, "db.sqlite3")}},
        INSTALLED_APPS=[], USE_TZ=True,
    )
    django.setup()
    from django.core.management import call_command

    call_command("createcachetable", verbosity=0)
    return rows


def measure(call: Callable[[str], Any], keys: list[str], budget: float) -> float:
    """Seconds per call, empty-loop cost subtracted."""
    def empty(key: str) -> None:
        return None

    def run(fn: Callable[[str], Any]) -> tuple[float, int]:
        calls = 0
        start = time.perf_counter()
        elapsed = 0.0
        offset = 0
        while elapsed < budget:
            chunk = keys[offset:offset + CHUNK]
            offset = (offset + CHUNK) % len(keys)
            for key in chunk:
                fn(key)
            calls += len(chunk)
            elapsed = time.perf_counter() - start
        return elapsed, calls

    spent, calls = run(call)
    base_spent, base_calls = run(empty)
    return max(0.0, spent / calls - base_spent / base_calls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.15,
                        help="seconds per cell per round (default 0.15)")
    parser.add_argument("--no-redis", action="store_true")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="bench-django-")
    redis_proc, redis_location = (None, "skipped (--no-redis)") if args.no_redis \
        else start_redis(workdir)
    notes = [] if redis_proc else [f"django-redis: {redis_location}"]
    try:
        rows = configure(workdir, redis_location if redis_proc else None)
        from django.core.cache import caches

        keys = [f"bench:key:{i}" for i in range(N_KEYS)]
        str_keys = [k + ":s" for k in keys]
        dict_keys = [k + ":d" for k in keys]
        # A cell: (callable taking one key, the keys it is called with). Bound methods where
        # the call takes only the key, the same one-line lambda for every set.
        cells: dict[tuple[str, str], tuple[Callable[[str], Any], list[str]]] = {}
        labels = [label for label, _ in rows]
        for label, alias in rows:
            backend = caches[alias]
            for s_key, d_key in zip(str_keys, dict_keys, strict=True):
                backend.set(s_key, STR_VALUE, 3600)  # every key present (and in L1, if any)
                backend.set(d_key, DICT_VALUE, 3600)
                backend.get(s_key)
                backend.get(d_key)
            cells[(label, "get str")] = (backend.get, str_keys)
            cells[(label, "get dict")] = (backend.get, dict_keys)
            cells[(label, "set dict")] = (lambda k, b=backend: b.set(k, DICT_VALUE, 3600),
                                          dict_keys)
        ours_backend = caches["hypercacheio"]
        engine = ours_backend.engine
        eng = "hypercacheio engine (direct)"
        labels.insert(1, eng)
        engine_str = [ours_backend.make_key(k) for k in str_keys]
        engine_dict = [ours_backend.make_key(k) for k in dict_keys]
        cells[(eng, "get str")] = (engine.get, engine_str)
        cells[(eng, "get dict")] = (engine.get, engine_dict)
        cells[(eng, "set dict")] = (lambda k: engine.set(k, DICT_VALUE, 3600), engine_dict)

        samples: dict[tuple[str, str], list[float]] = {cell: [] for cell in cells}
        order = list(cells)
        for round_no in range(args.rounds):
            random.shuffle(order)
            for cell in order:
                call, cell_keys = cells[cell]
                samples[cell].append(measure(call, cell_keys, args.budget))
            print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
        medians = {cell: statistics.median(values) for cell, values in samples.items()}
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    ours = "hypercacheio (Django API)"
    print(f"Django {django.get_version()}, hypercacheio {hypercacheio.__version__}, "
          f"Python {platform.python_version()}, {platform.machine()}; "
          f"median of {args.rounds} rounds, {args.budget} s per cell per round")
    head = f"{'backend':<30}" + "".join(f"{op + ' us':>13}" for op in OPS) \
        + "".join(f"{op + ' x':>13}" for op in OPS)
    print(head)
    print("-" * len(head))
    for label in labels:
        figures = "".join(f"{medians[(label, op)] * 1e6:>13.2f}" for op in OPS)
        ratios = "".join(f"{medians[(label, op)] / medians[(ours, op)]:>13.2f}" for op in OPS)
        print(f"{label:<30}{figures}{ratios}")
    print("x = that backend's time / ours (above 1: ours is faster)")
    for note in notes:
        print(f"note: {note}")

    def ratio(label: str, op: str, other_label: str, other_op: str | None = None) -> float:
        return medians[(label, op)] / medians[(other_label, other_op or op)]

    print()
    print(f"ours get dict / engine get dict: {ratio(ours, 'get dict', eng):.2f} (target <= 1.5)")
    print(f"ours get str / engine get str:   {ratio(ours, 'get str', eng):.2f} (target <= 1.5)")
    print(f"locmem get dict / ours:          {ratio('locmem', 'get dict', ours):.2f} "
          f"(target > 1)")
    print(f"filebased set / ours:            {ratio('filebased', 'set dict', ours):.1f} "
          f"(target >= 10)")
    print(f"db set / ours:                   {ratio('db (SQLite)', 'set dict', ours):.1f} "
          f"(target >= 10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
