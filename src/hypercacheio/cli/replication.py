"""What ``stats`` shows of replication: the primary's push per secondary, a secondary's
position, and the active-active mesh per peer; each from the running node's ``/ping`` when
it answers, else from what the store alone keeps (and then it says so)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from ..auth import client_token
from ..config import Settings
from ..errors import HypercacheioError
from ..store import Store
from .common import out

PRIMARY_PEER_PREFIX = "primary:"
"""How a secondary's store names the position it holds per primary (``primary:`` + the
primary's node id; ``node.replica_routes.PEER_PREFIX``, not imported: it needs aiohttp)."""

MESH_PEER_PREFIX = "mesh:"
"""How a mesh node's store names the position each configured peer acknowledged
(``mesh:`` + the peer's address; ``replication.mesh._peer_key``)."""

RunningNode = tuple[str | None, dict[str, Any] | None, str]
"""(url, /ping answer, what to say) of the node running for a storage directory."""


def backlog_seconds(store: Store, acked: int) -> float:
    """Age of the oldest oplog row after ``acked`` (0 when there is none), as the node's
    push computes it."""
    oldest = store.oplog_since(acked, 1)
    if not oldest:
        return 0.0
    return round(max(0.0, store.clock() - (oldest[0].hlc >> 16) / 1000), 3)


def running_node(settings: Settings) -> RunningNode:
    """(url, /ping answer, what to say) of the node running for this storage directory,
    found by its pid file as the other verbs find it; (None, None, why) when none answers."""
    try:
        from ..node.options import NodeOptions
        from ..node.supervise import find_local_node, ping
    except ImportError:
        return None, None, "not running (the server extra is not installed)"
    try:
        found = find_local_node(settings, NodeOptions.from_env())
    except HypercacheioError as exc:
        return None, None, f"unknown ({exc})"
    if found is None:
        return None, None, "not running"
    try:
        doc = ping(found.url, client_token(settings)[0], timeout=settings.timeout)
    except Exception as exc:  # refused token, not answering: say so, show the store's view
        return found.url, None, f"running (pid {found.pid}) but its /ping failed: {exc}"
    return found.url, doc, f"running (pid {found.pid}) on {found.url}"


def replication_state(settings: Settings, store: Store,
                      node: RunningNode | None = None) -> dict[str, Any] | None:
    """What ``stats`` shows of replication: on a primary, per secondary (from the running
    node's ``/ping`` when it answers, else from the store alone); on a secondary, the
    position held per primary. None when this host does not replicate."""
    if settings.role == "secondary":
        sources = [{"source": pos.peer[len(PRIMARY_PEER_PREFIX):], "position": pos.acked,
                    "updated_at": pos.updated_at}
                   for pos in store.peer_positions() if pos.peer.startswith(PRIMARY_PEER_PREFIX)]
        return {"role": "secondary", "primary_url": settings.primary_url, "sources": sources}
    if not settings.secondary_urls:
        return None
    position = store.oplog_position()
    acked = {pos.peer: pos.acked for pos in store.peer_positions()
             if pos.source == store.node_id}
    url, doc, node_state = node or running_node(settings)
    live = {row.get("url"): row
            for row in ((doc or {}).get("replication") or {}).get("secondaries", [])}
    rows = []
    for configured in settings.secondary_urls:
        name = configured.rstrip("/")
        row = live.get(name)
        if row is not None:
            rows.append({"url": name, "connected": bool(row.get("connected")),
                         "acked": row.get("acked", 0),
                         "backlog_rows": row.get("backlog_rows", 0),
                         "backlog_seconds": row.get("backlog_seconds", 0.0),
                         "last_error": row.get("last_error")})
            continue
        mine = acked.get(name, 0)
        rows.append({"url": name, "connected": None, "acked": mine,
                     "backlog_rows": max(0, position - mine),
                     "backlog_seconds": backlog_seconds(store, mine), "last_error": None})
    return {"role": "primary", "node": node_state, "node_running": doc is not None,
            "node_url": url, "oplog_position": position, "secondaries": rows}


# what a mesh peer row holds beyond the store's figures: only the running node knows them
_LIVE_PEER_FIELDS = ("node_id", "connected", "handshake", "lag_ms", "last_contact_age",
                     "last_received_age", "frames_out_per_s", "bytes_out_per_s",
                     "records_sent", "records_received", "conflicts_resolved",
                     "clock_skew_records", "last_error")


def mesh_state(settings: Settings, store: Store,
               node: RunningNode | None = None) -> dict[str, Any] | None:
    """What ``stats`` shows of active-active replication: per configured peer, the oplog
    position it acknowledged and the backlog behind it (kept in the store as
    ``mesh:<address>``), and the version vector (per origin, the writes applied here);
    with the running node's ``/ping``, per peer also the link, handshake, lag, last
    contact, rates, conflicts and clock skew. None when this host is not in a mesh."""
    if not settings.active_active:
        return None
    position = store.oplog_position()
    persisted = {pos.peer[len(MESH_PEER_PREFIX):]: pos for pos in store.peer_positions()
                 if pos.peer.startswith(MESH_PEER_PREFIX)}
    url, doc, node_state = node or running_node(settings)
    mesh = (doc or {}).get("mesh")
    live = {row.get("address"): row for row in (mesh or {}).get("peers") or []}
    peers = []
    for address in settings.peer_addrs:
        saved = persisted.get(address)
        row = live.get(address)
        # the node's acknowledged position runs ahead of the persisted one (written at
        # most every ACK_PERSIST_SECONDS): the larger is the truer
        acked = max(saved.acked if saved is not None else 0,
                    int(row.get("acked") or 0) if row is not None else 0)
        peer: dict[str, Any] = {
            "address": address, "acked": acked,
            "acked_persisted_at": saved.updated_at if saved is not None else None,
            "backlog_records": max(0, position - acked),
            "backlog_seconds": backlog_seconds(store, acked),
        }
        for name in _LIVE_PEER_FIELDS:
            peer[name] = row.get(name) if row is not None else None
        if row is not None:
            peer["connected"] = bool(row.get("connected"))
            peer["last_error"] = row.get("last_error") or None
        peers.append(peer)
    quorum = (mesh or {}).get("quorum") or {}
    return {"node": node_state, "node_running": mesh is not None, "node_url": url,
            "node_id": store.node_id, "oplog_position": position,
            "configured_nodes": len(settings.peer_addrs) + 1,
            "majority": (len(settings.peer_addrs) + 1) // 2 + 1,
            "version_vector": store.version_vector(),
            "received_lag": (mesh or {}).get("received_lag"),
            "conflicts_resolved": (mesh or {}).get("conflicts_resolved"),
            "handshakes_refused": (mesh or {}).get("handshakes_refused"),
            "quorum": quorum or None,
            "peers": peers}


def _cell(value: Any, unit: str = "") -> str:
    """A figure as a table cell: blank when unknown (the node is not running)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{round(value, 3):g}{unit}"
    return f"{value}{unit}"


def _connected(value: bool | None) -> str:
    return {True: "yes", False: "[red]no[/red]", None: "unknown"}[value]


def print_replication(state: dict[str, Any]) -> None:
    console = out()
    if state["role"] == "secondary":
        console.print(f"secondary of {escape(state['primary_url'])}")
        table = Table(title="replication: positions received")
        table.add_column("primary (node id)")
        table.add_column("position", justify="right")
        for row in state["sources"]:
            table.add_row(escape(row["source"]), str(row["position"]))
        if not state["sources"]:
            table.add_row("(none yet)", "0")
        console.print(table)
        return
    console.print(f"node: {escape(state['node'])}"
                  + ("" if state["node_running"] else
                     "; the figures below are what the store alone knows"))
    table = Table(title=f"replication: oplog position {state['oplog_position']}")
    for name, justify in (("secondary", "left"), ("connected", "left"),
                          ("acked", "right"), ("backlog rows", "right"),
                          ("backlog s", "right"), ("last error", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in state["secondaries"]:
        table.add_row(escape(row["url"]), _connected(row["connected"]), str(row["acked"]),
                      str(row["backlog_rows"]), f"{row['backlog_seconds']:g}",
                      escape(row["last_error"] or ""))
    console.print(table)


def print_mesh(state: dict[str, Any]) -> None:
    """Two tables per peer (the link; what it has of ours) and the version vector."""
    console = out()
    console.print(f"active-active node {escape(state['node_id'])}, "
                  f"{state['configured_nodes']} configured nodes (majority "
                  f"{state['majority']}); node: {escape(state['node'])}"
                  + ("" if state["node_running"] else
                     "; the figures below are what the store alone knows"))
    links = Table(title="active-active: links")
    for name, justify in (("peer", "left"), ("node id", "left"), ("connected", "left"),
                          ("handshake", "left"), ("last contact s", "right"),
                          ("frames/s", "right"), ("bytes/s", "right"),
                          ("last error", "left")):
        links.add_column(name, justify=justify)  # type: ignore[arg-type]
    lag = Table(title=f"active-active: oplog position {state['oplog_position']}")
    for name, justify in (("peer", "left"), ("acked", "right"), ("backlog records", "right"),
                          ("backlog s", "right"), ("lag ms", "right"),
                          ("conflicts resolved", "right"), ("clock skew records", "right")):
        lag.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in state["peers"]:
        address = escape(row["address"])
        links.add_row(address, escape(row["node_id"] or ""), _connected(row["connected"]),
                      escape(row["handshake"] or ""), _cell(row["last_contact_age"]),
                      _cell(row["frames_out_per_s"]), _cell(row["bytes_out_per_s"]),
                      escape(row["last_error"] or ""))
        lag.add_row(address, str(row["acked"]), str(row["backlog_records"]),
                    f"{row['backlog_seconds']:g}", _cell(row["lag_ms"]),
                    _cell(row["conflicts_resolved"]), _cell(row["clock_skew_records"]))
    console.print(links)
    console.print(lag)
    vector = Table(title="active-active: version vector (writes applied here, per origin)")
    vector.add_column("origin (node id)")
    vector.add_column("applied seq", justify="right")
    for origin, seq in sorted(state["version_vector"].items()):
        mine = " (this node)" if origin == state["node_id"] else ""
        vector.add_row(escape(origin) + mine, str(seq))
    if not state["version_vector"]:
        vector.add_row("(none yet)", "0")
    console.print(vector)


__all__ = ["MESH_PEER_PREFIX", "PRIMARY_PEER_PREFIX", "backlog_seconds",
           "mesh_state", "print_mesh", "print_replication", "replication_state",
           "running_node"]
