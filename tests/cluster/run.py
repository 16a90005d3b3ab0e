"""One run of the suite: build a cluster in a mode, run the workload under a fault schedule,
heal, wait for quiescence, read every store, check, report.

    python -m cluster.run --minutes 3 --seed 1 --mode ps --out DIR   (PYTHONPATH=tests)

is what ``scripts/chaos.sh`` runs: a random schedule drawn from the seed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .checker import Checker, CheckResult, Final, read_final, wiped_unknown
from .harness import MODES, ClusterHarness, Mode, can_mount_tmpfs
from .nemesis import Event, Nemesis, Step, max_skew, random_schedule
from .report import text_report, write_all
from .workload import Op, Workload

LAG_EVERY = 0.25


@dataclass
class RunOutcome:
    result: CheckResult
    history: list[Op]
    events: list[Event]
    finals: list[Final]
    lag: list[tuple[float, dict[str, float]]]
    converged: bool
    heal_seconds: float
    nemesis_errors: list[str] = field(default_factory=list)
    report: str = ""
    paths: tuple[str, ...] = ()


def _sample_lag(mode: Mode, harness: ClusterHarness, t0: float, stop: threading.Event,
                out: list[tuple[float, dict[str, float]]]) -> None:
    while not stop.is_set():
        row = mode.lag(harness)
        if row:
            out.append((time.monotonic() - t0, row))
        stop.wait(LAG_EVERY)


def run(mode: Mode, root: str | Path, steps: Sequence[Step], *, seed: int,
        duration: float, nodes: int = 3, tmpfs: Sequence[str] = (),
        clients_per_host: int = 2, out: str | None = None, title: str = "",
        setup: Callable[[ClusterHarness], None] | None = None,
        env: Mapping[str, str] | None = None, quiesce_timeout: float = 60.0,
        weights: dict[str, int] | None = None) -> RunOutcome:
    """Run ``steps`` against a fresh cluster for ``duration`` seconds of workload."""
    harness = mode.build(root, nodes, tmpfs=tmpfs, env=dict(env or {}))
    with harness:
        if setup is not None:
            setup(harness)
        t0 = time.monotonic()
        workload = Workload(harness, seed, t0, clients_per_host, weights=weights)
        nemesis = Nemesis(harness, t0)
        stop = threading.Event()
        lag: list[tuple[float, dict[str, float]]] = []
        threads = [threading.Thread(target=nemesis.run, args=(steps, stop), daemon=True),
                   threading.Thread(target=_sample_lag, args=(mode, harness, t0, stop, lag),
                                    daemon=True)]
        workload.start()
        for thread in threads:
            thread.start()
        stop.wait(duration)
        stop.set()
        threads[0].join(60)
        history = workload.stop()
        healed_at = time.monotonic()
        harness.heal()
        converged = harness.quiesce(quiesce_timeout)
        heal_seconds = time.monotonic() - healed_at
        threads[1].join(5)
        now = time.time()
        finals = [read_final(h.name, h.directory, now) for h in harness.hosts]
    checked_history = history
    if mode.local_writes:
        wipes = [(e.target, e.start) for e in nemesis.events if e.kind == "wipe"]
        faults = [(e.start, e.end) for e in nemesis.events if e.kind != "wipe"]
        checked_history = wiped_unknown(history, wipes, faults)
    # versions from several clocks (active-active): real-time order holds up to the skew
    skew = max_skew(steps)
    result = Checker.for_run(mode.guarantees, mode.local_writes, skew
                             ).check(checked_history, finals)
    extra = {"mode": mode.name, "seed": seed, "nodes": nodes,
             "workload seconds": f"{duration:.0f}",
             "quiescence": f"{'reached' if converged else 'NOT reached'} "
                           f"{heal_seconds:.1f} s after healing"}
    if skew:
        extra["clock skew bound"] = f"{skew:.3f} s"
    if nemesis.errors:
        extra["nemesis errors"] = "; ".join(nemesis.errors)
    title = title or f"{mode.name} seed {seed}"
    report = text_report(title, result, nemesis.events, history, extra)
    paths: tuple[str, ...] = ()
    if out is not None:
        paths = write_all(out, title, result, nemesis.events, history, lag, extra)
    return RunOutcome(result, history, nemesis.events, finals, lag, converged, heal_seconds,
                      nemesis.errors, report, paths)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chaos", description=__doc__)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mode", default="ps", choices=sorted(MODES))
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2, help="clients per host")
    parser.add_argument("--out", default=None, help="directory for report, PNG, history")
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    out = args.out or tempfile.mkdtemp(prefix=f"chaos-{args.mode}-s{args.seed}-")
    os.makedirs(out, exist_ok=True)
    duration = args.minutes * 60
    rng = random.Random(args.seed)
    hosts = mode.host_names(args.nodes)
    # a full disk needs a tmpfs (root): one host's (not the first's) directory is one when
    # possible
    tmpfs: list[str] = [rng.choice(hosts[1:] or hosts)] if can_mount_tmpfs() is None else []
    steps = random_schedule(rng, hosts, mode.authority, mode.faults, 1.0, duration - 2.0,
                            tmpfs)
    with tempfile.TemporaryDirectory(prefix="chaos-nodes-") as root:
        outcome = run(mode, root, steps, seed=args.seed, duration=duration, nodes=args.nodes,
                      tmpfs=tmpfs, clients_per_host=args.clients, out=out,
                      title=f"chaos {args.mode} seed {args.seed} ({args.minutes:g} min)")
    sys.stdout.write(outcome.report)
    sys.stdout.write(f"report: {outcome.paths[0]}\nPNG: {outcome.paths[1]}\n"
                     f"history: {outcome.paths[2]}\nout: {out}\n")
    return 0 if outcome.result.valid and outcome.converged else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
