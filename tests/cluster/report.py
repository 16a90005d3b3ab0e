"""The verdict, a short text report and a PNG timeline (faults, throughput, latency, lag)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .checker import CheckResult, stale_summary
from .nemesis import Event
from .workload import OK, Op

BUCKET = 0.5  # seconds per point of the timeline


def text_report(title: str, result: CheckResult, events: Sequence[Event],
                history: Sequence[Op], extra: Mapping[str, Any] | None = None) -> str:
    lines = [f"{title}: {'VALID' if result.valid else 'INVALID'}",
             f"checked: {', '.join(result.checked)}"]
    for key, value in (extra or {}).items():
        lines.append(f"{key}: {value}")
    lines.append(f"operations: {len(history)}")
    for f, counts in result.stats.get("ops", {}).items():
        lines.append(f"  {f:7s} " + "  ".join(f"{s}={n}" for s, n in counts.items()))
    lines.append("faults:")
    for e in events:
        end = "-" if e.end is None else f"{e.end:.2f}"
        skew = f" ({e.offset:+.3f} s)" if e.offset else ""
        lines.append(f"  {e.start:7.2f} .. {end:>7s}  {e.kind} {e.target}{skew}")
    lines.append("stale reads (measured, not failed: a host reads its own store, stale during "
                 "faults):")
    for host, s in stale_summary(result.stale).items():
        lines.append(f"  {host:12s} reads={s['reads']:.0f} stale={s['stale']:.0f} "
                     f"window p50={s['p50_s'] * 1000:.0f} ms p99={s['p99_s'] * 1000:.0f} ms "
                     f"max={s['max_s'] * 1000:.0f} ms")
    if result.failures:
        lines.append(f"failures ({len(result.failures)}):")
        lines += [f"  - {f}" for f in result.failures[:20]]
    return "\n".join(lines) + "\n"


def timeline_png(path: str, title: str, history: Sequence[Op], events: Sequence[Event],
                 lag: Sequence[tuple[float, Mapping[str, float]]]) -> str:
    """Draw the run: fault spans over throughput, latency (p50/p99) and replication lag."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max([op.complete for op in history] + [e.end or e.start for e in events] + [1.0])
    n = int(end / BUCKET) + 1
    xs = [i * BUCKET for i in range(n)]
    ok = [0] * n
    bad = [0] * n
    lat: list[list[float]] = [[] for _ in range(n)]
    for op in history:
        i = min(n - 1, max(0, int(op.complete / BUCKET)))
        if op.status == OK:
            ok[i] += 1
            lat[i].append((op.complete - op.invoke) * 1000)
        else:
            bad[i] += 1

    def q(values: list[float], p: float) -> float:
        if not values:
            return float("nan")
        values = sorted(values)
        return values[min(len(values) - 1, int(p * len(values)))]

    fig, axes = plt.subplots(3, 1, figsize=(11, 7.5), sharex=True)
    colors = {"kill": "tab:red", "pause": "tab:purple", "partition": "tab:orange",
              "isolate": "tab:orange", "slow": "tab:olive", "drop_answers": "tab:brown",
              "full_disk": "tab:gray", "wipe": "black"}
    for ax in axes:
        for e in events:
            ax.axvspan(e.start, e.end if e.end and e.end > e.start else e.start + 0.2,
                       color=colors.get(e.kind, "tab:pink"), alpha=0.15)
    for e in events:
        axes[0].text(e.start, 0, f"{e.kind} {e.target}", rotation=90, fontsize=7,
                     va="bottom", ha="right")
    axes[0].plot(xs, [v / BUCKET for v in ok], label="ok ops/s")
    axes[0].plot(xs, [v / BUCKET for v in bad], label="fail+unknown ops/s", color="tab:red")
    axes[0].set_ylabel("throughput")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].plot(xs, [q(v, 0.5) for v in lat], label="p50")
    axes[1].plot(xs, [q(v, 0.99) for v in lat], label="p99")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("latency ms")
    axes[1].legend(loc="upper right", fontsize=8)
    hosts = sorted({h for _, row in lag for h in row})
    for host in hosts:
        axes[2].plot([t for t, row in lag if host in row], [row[host] for t, row in lag
                                                           if host in row], label=host)
    axes[2].set_ylabel("backlog rows")
    axes[2].set_xlabel("seconds")
    if hosts:
        axes[2].legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_all(directory: str, title: str, result: CheckResult, events: Sequence[Event],
              history: Sequence[Op], lag: Sequence[tuple[float, Mapping[str, float]]],
              extra: Mapping[str, Any] | None = None) -> tuple[str, str, str]:
    """report.txt, timeline.png and history.jsonl in ``directory``; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    text = os.path.join(directory, "report.txt")
    with open(text, "w") as fh:
        fh.write(text_report(title, result, events, history, extra))
    png = timeline_png(os.path.join(directory, "timeline.png"), title, history, events, lag)
    hist = os.path.join(directory, "history.jsonl")
    with open(hist, "w") as fh:
        for op in history:
            fh.write(json.dumps(op.to_json(), default=repr) + "\n")
    return text, png, hist
