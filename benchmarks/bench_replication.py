"""The replication benchmark (store level, no network yet): how fast a secondary's store
absorbs the primary's oplog, and how long a snapshot of a whole store takes.

    python benchmarks/bench_replication.py [--rows N] [--keys N] [--batch N] [--rounds N]

- apply: a clustered primary writes ``--rows`` sets (a 32-byte str value each); its oplog
  is read in batches of ``--batch`` and applied to an empty plain store, with and without
  the msgpack frame round trip (encode on the primary, decode with full validation on the
  secondary); then the same keys written again are applied to a secondary holding the
  older versions (updates). Rows/s is the median over ``--rounds`` fresh secondaries.
  Target (issue 9): >= 50,000 rows/s in batches of 500.
- snapshot: ``--keys`` live rows read in chunks of 1,000 (``snapshot_begin`` then
  ``snapshot_chunks``), framed, decoded and applied to an empty store; seconds, median.

Later this file grows the HTTP parts (lag p50/p99, forwarded writes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

try:
    from hypercacheio.store import Store
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from hypercacheio.store import Store

from hypercacheio.codec import TAG_STR
from hypercacheio.replication import Record
from hypercacheio.replication.frames import (
    decode_batch,
    decode_snapshot_chunk,
    encode_batch,
    encode_snapshot_chunk,
)


def _fill(store: Store, count: int) -> None:
    step = 5000
    for base in range(0, count, step):
        store.set_many([(f"key:{i:08}", TAG_STR, f"value-{i:026}", None)
                        for i in range(base, min(count, base + step))])


def _median_of(rounds: int, work: Callable[[str], float], root: str) -> float:
    times = []
    for r in range(rounds):
        directory = os.path.join(root, f"secondary-{r}")
        times.append(work(directory))
        shutil.rmtree(directory, ignore_errors=True)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    args.keys = max(args.keys, args.rows)  # the snapshot covers every key the primary holds
    root = tempfile.mkdtemp(prefix="hcio-bench-repl-")
    try:
        primary = Store(os.path.join(root, "primary"), clustered=True)
        _fill(primary, args.keys)
        since, batches = 0, list[list[Record]]()
        while len(batches) * args.batch < args.rows:
            records = primary.oplog_since(since, args.batch)
            if not records:
                break
            batches.append(records)
            since = records[-1].seq
        rows = sum(len(b) for b in batches)
        frames = [encode_batch(primary.node_id, b) for b in batches]
        base = primary.oplog_position()
        _fill(primary, args.rows)  # every key written again: newer versions
        updates = [primary.oplog_since(base + i, args.batch)
                   for i in range(0, args.rows, args.batch)]

        def apply_only(directory: str) -> float:
            secondary = Store(directory)
            began = time.perf_counter()
            for batch in batches:
                secondary.apply(batch)
            elapsed = time.perf_counter() - began
            secondary.close()
            return elapsed

        def apply_updates(directory: str) -> float:
            secondary = Store(directory)
            for batch in batches:
                secondary.apply(batch)
            began = time.perf_counter()
            for batch in updates:
                secondary.apply(batch)
            elapsed = time.perf_counter() - began
            secondary.close()
            return elapsed

        def apply_frames(directory: str) -> float:
            secondary = Store(directory)
            began = time.perf_counter()
            for frame in frames:
                secondary.apply(decode_batch(frame).records)
            elapsed = time.perf_counter() - began
            secondary.close()
            return elapsed

        def encode_only(directory: str) -> float:
            began = time.perf_counter()
            since = 0
            while True:
                records = primary.oplog_since(since, args.batch)
                if not records or since >= rows:
                    break
                encode_batch(primary.node_id, records)
                since = records[-1].seq
            return time.perf_counter() - began

        def snapshot(directory: str) -> float:
            secondary = Store(directory)
            began = time.perf_counter()
            start = primary.snapshot_begin()
            for chunk in primary.snapshot_chunks(start, limit=1000):
                secondary.apply_snapshot(decode_snapshot_chunk(encode_snapshot_chunk(chunk)))
            elapsed = time.perf_counter() - began
            assert secondary.live_digest()[0] == args.keys
            secondary.close()
            return elapsed

        def snapshot_read(directory: str) -> float:
            began = time.perf_counter()
            start = primary.snapshot_begin()
            for chunk in primary.snapshot_chunks(start, limit=1000):
                encode_snapshot_chunk(chunk)
            return time.perf_counter() - began

        t_apply = _median_of(args.rounds, apply_only, root)
        t_updates = _median_of(args.rounds, apply_updates, root)
        t_frames = _median_of(args.rounds, apply_frames, root)
        t_read = _median_of(args.rounds, encode_only, root)
        t_snap = _median_of(args.rounds, snapshot, root)
        t_snap_read = _median_of(args.rounds, snapshot_read, root)
        print(f"replication, store level ({rows:,} rows, batches of {args.batch}, "
              f"median of {args.rounds}; python {sys.version.split()[0]})")
        print(f"{'what':<52}{'figure':>16}")
        print(f"{'apply (Store.apply), new keys, rows/s':<52}{rows / t_apply:>16,.0f}")
        print(f"{'apply, newer versions of held keys, rows/s':<52}{rows / t_updates:>16,.0f}")
        print(f"{'decode frame + apply, new keys, rows/s':<52}{rows / t_frames:>16,.0f}")
        print(f"{'read oplog + encode frame (primary), rows/s':<52}{rows / t_read:>16,.0f}")
        print(f"{f'snapshot of {args.keys:,} keys, read + encode, s':<52}{t_snap_read:>16.2f}")
        print(f"{f'snapshot of {args.keys:,} keys, end to end, s':<52}{t_snap:>16.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
