"""What the replication services look like from outside: the ``/ping`` documents and the
``/metrics`` lines of the primary's push (``push.py``) and of the active-active mesh
(``mesh.py``). ``Pusher.status``/``metric_lines`` and ``Mesh.status``/``metric_lines``
call these.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .mesh import Mesh
    from .push import Pusher


def _label(text: str) -> str:
    """``text`` as a Prometheus label value."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---- the primary's push ----------------------------------------------------------------------

def push_status(pusher: Pusher) -> list[dict[str, Any]]:
    """Per secondary: connected, acknowledged position, backlog (rows and seconds of
    the oldest record not acknowledged), last error, what was sent."""
    store = pusher.store
    last = store.oplog_position()
    now = store.clock()
    rows = []
    for link in pusher.links:
        backlog = max(0, last - link.acked)
        seconds = 0.0
        if backlog:
            oldest = store.oplog_since(link.acked, 1)
            if oldest:
                seconds = max(0.0, now - (oldest[0].hlc >> 16) / 1000)
        rows.append({
            "url": link.url,
            "connected": link.connected is True,
            "acked": link.acked,
            "backlog_rows": backlog,
            "backlog_seconds": round(seconds, 3),
            "snapshotting": link.snapshotting or link.need_snapshot,
            "last_error": link.last_error,
            "last_error_at": link.last_error_at,
            "batches_sent": link.batches,
            "rows_sent": link.rows,
            "snapshots_sent": link.snapshots,
            "snapshot_rows_sent": link.snapshot_rows,
            "errors": link.errors,
        })
    return rows

def push_metric_lines(pusher: Pusher) -> list[str]:
    """The Prometheus text of ``status`` (label ``secondary="url"``)."""
    rows = push_status(pusher)
    series = [
        ("connected", "gauge", "1 if the last push to the secondary succeeded.",
         lambda r: int(r["connected"])),
        ("acked_position", "gauge", "Last oplog position the secondary acknowledged.",
         lambda r: r["acked"]),
        ("backlog_rows", "gauge", "Oplog rows the secondary has not acknowledged.",
         lambda r: r["backlog_rows"]),
        ("backlog_seconds", "gauge", "Age of the oldest oplog row the secondary has not "
         "acknowledged.", lambda r: r["backlog_seconds"]),
        ("batches_sent_total", "counter", "Oplog batches the secondary acknowledged.",
         lambda r: r["batches_sent"]),
        ("rows_sent_total", "counter", "Oplog rows the secondary acknowledged.",
         lambda r: r["rows_sent"]),
        ("snapshots_sent_total", "counter", "Full snapshots sent to the secondary.",
         lambda r: r["snapshots_sent"]),
        ("push_errors_total", "counter", "Failed pushes (each retried).",
         lambda r: r["errors"]),
    ]
    lines: list[str] = []
    for name, kind, text, get in series:
        lines += [f"# HELP hypercacheio_replication_{name} {text}",
                  f"# TYPE hypercacheio_replication_{name} {kind}"]
        for row in rows:
            lines.append(f'hypercacheio_replication_{name}{{secondary="{_label(row["url"])}"}}'
                         f" {get(row)}")
    lines += [
        "# HELP hypercacheio_replication_sync_writes_total Writes that waited for the "
        "secondaries (HYPERCACHEIO_ASYNC=false).",
        "# TYPE hypercacheio_replication_sync_writes_total counter",
        f"hypercacheio_replication_sync_writes_total {pusher.sync_writes}",
        "# HELP hypercacheio_replication_sync_short_total Waiting writes that returned "
        "with fewer confirmations than secondaries (one down, or the timeout).",
        "# TYPE hypercacheio_replication_sync_short_total counter",
        f"hypercacheio_replication_sync_short_total {pusher.sync_short}",
        "# HELP hypercacheio_replication_last_sync_replicas Secondaries that confirmed "
        "the last waiting write.",
        "# TYPE hypercacheio_replication_last_sync_replicas gauge",
        f"hypercacheio_replication_last_sync_replicas {pusher.last_sync_replicas or 0}",
    ]
    return lines


# ---- the active-active mesh ------------------------------------------------------------------

def mesh_status(mesh: Mesh) -> dict[str, Any]:
    """Per peer: connected, handshake, lag, backlog, last contact, rates, conflicts."""
    now_mono = time.monotonic()
    try:
        last = mesh.store.oplog_position()
    except Exception:
        last = -1
    peers = []
    for peer in mesh.peers:
        link = peer.link.status()
        t0, f0, b0, fi0, bi0 = peer.rate_mark
        c = peer.link.counters
        span = now_mono - t0
        rates = {"frames_out_per_s": 0.0, "bytes_out_per_s": 0.0}
        if t0 and span > 0:
            rates = {"frames_out_per_s": round((c.frames_out - f0) / span, 1),
                     "bytes_out_per_s": round((c.bytes_out - b0) / span, 1)}
        if not t0 or span > 5.0:
            peer.rate_mark = (now_mono, c.frames_out, c.bytes_out, c.frames_in, c.bytes_in)
        skew = mesh.store.skew_counts.get(peer.peer_id or "", 0)
        peers.append({
            "address": peer.address,
            "node_id": peer.peer_id,
            "connected": bool(link.get("connected")),
            "handshake": peer.handshake,
            "acked": peer.acked,
            "backlog_records": max(0, last - peer.acked) if last >= 0 else None,
            "lag_ms": None if peer.last_lag_ms is None else round(peer.last_lag_ms, 3),
            "last_contact_age": link.get("last_contact_age"),
            "last_received_age": (None if peer.last_received is None
                                  else round(time.time() - peer.last_received, 3)),
            "records_sent": peer.records_sent,
            "records_received": peer.records_received,
            "conflicts_resolved": peer.conflicts,
            "clock_skew_records": skew,
            "snapshots": peer.snapshots,
            "resyncs_asked": peer.resyncs_asked,
            "anti_entropy_buckets": peer.anti_entropy_repairs,
            "frames_out": c.frames_out, "bytes_out": c.bytes_out,
            **rates,
            "last_error": link.get("last_error", ""),
        })
    lags = sorted(mesh.lag_samples)
    lag = ({"p50_ms": round(lags[len(lags) // 2], 3),
            "p99_ms": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))], 3),
            "samples": len(lags)} if lags else None)
    return {"node_id": mesh.own, "configured_nodes": mesh.size,
            "received_lag": lag,
            "majority": mesh.size // 2 + 1,
            "listening": mesh.server.port if mesh.server is not None else None,
            "applied": mesh.applied_total, "conflicts_resolved": mesh.conflicts_total,
            "bootstrapped": mesh.bootstrapped,
            "anti_entropy": {"passes": mesh.anti_entropy_passes,
                             "running": mesh.anti_entropy_running > 0},
            "last_snapshot": (None if mesh.last_snapshot is None else
                              {"rows": mesh.last_snapshot[0],
                               "seconds": round(mesh.last_snapshot[1], 4)}),
            "quorum": mesh.quorum.status() if mesh.quorum is not None else None,
            "handshakes_refused": mesh.counters.handshakes_refused,
            "peers": peers}

def mesh_metric_lines(mesh: Mesh) -> list[str]:
    """Prometheus lines for ``/metrics``."""
    doc = mesh_status(mesh)
    lines = [
        "# HELP hypercacheio_mesh_peer_connected Active-active peer linked (1) or not.",
        "# TYPE hypercacheio_mesh_peer_connected gauge",
    ]
    per_peer = [("connected", "gauge"), ("backlog_records", "gauge"), ("lag_ms", "gauge"),
                ("records_sent", "counter"), ("records_received", "counter"),
                ("conflicts_resolved", "counter"), ("clock_skew_records", "counter"),
                ("bytes_out", "counter"), ("frames_out", "counter")]
    for name, kind in per_peer:
        if name != "connected":
            lines += [f"# HELP hypercacheio_mesh_peer_{name} Active-active, per peer: "
                      f"{name.replace('_', ' ')}.",
                      f"# TYPE hypercacheio_mesh_peer_{name} {kind}"]
        for row in doc["peers"]:
            value = row[name]
            if value is None:
                continue
            lines.append(f'hypercacheio_mesh_peer_{name}{{peer="{row["address"]}"}} '
                         f"{int(value) if isinstance(value, bool) else value}")
    lines += ["# HELP hypercacheio_mesh_handshakes_refused_total Replication "
              "connections refused (wrong token, cluster id, TLS).",
              "# TYPE hypercacheio_mesh_handshakes_refused_total counter",
              f"hypercacheio_mesh_handshakes_refused_total {doc['handshakes_refused']}"]
    quorum = doc["quorum"] or {}
    for name, help_text in (
            ("granted", "Locks and add claims this node obtained from a majority."),
            ("refused", "Locks and add claims refused (held by another owner)."),
            ("unavailable", "Locks and adds refused for want of a majority (503).")):
        lines += [f"# HELP hypercacheio_quorum_{name}_total {help_text}",
                  f"# TYPE hypercacheio_quorum_{name}_total counter",
                  f"hypercacheio_quorum_{name}_total {quorum.get(name, 0)}"]
    return lines


__all__ = ["mesh_metric_lines", "mesh_status", "push_metric_lines", "push_status"]
