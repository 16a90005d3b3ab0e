"""The latency histograms of ``/metrics`` in Prometheus' text format.

``hypercacheio_request_duration_seconds`` is a histogram per operation (label ``op``, the
same as ``hypercacheio_requests_total``'s): ``_bucket`` lines cumulative up to ``le="+Inf"``,
then ``_sum`` and ``_count``. ``hypercacheio top`` and the Grafana dashboard in
``examples/grafana`` compute p50/p99 from them.
"""

from __future__ import annotations

from .guard import LATENCY_BOUNDS, latencies
from .state import NodeState

LATENCY_METRIC = "hypercacheio_request_duration_seconds"
LE_LABELS: tuple[str, ...] = (*(f"{bound:g}" for bound in LATENCY_BOUNDS), "+Inf")


def latency_lines(state: NodeState) -> list[str]:
    """The histogram lines of every operation the node has a route for."""
    lines = [f"# HELP {LATENCY_METRIC} Time from a request's arrival at the guard to its "
             "answer, by operation.",
             f"# TYPE {LATENCY_METRIC} histogram"]
    for op, latency in sorted(latencies(state).items()):
        running = 0
        for le, count in zip(LE_LABELS, latency.counts, strict=True):
            running += count
            lines.append(f'{LATENCY_METRIC}_bucket{{op="{op}",le="{le}"}} {running}')
        lines.append(f'{LATENCY_METRIC}_sum{{op="{op}"}} {latency.total:.6f}')
        lines.append(f'{LATENCY_METRIC}_count{{op="{op}"}} {running}')
    return lines


__all__ = ["LATENCY_METRIC", "latency_lines"]
