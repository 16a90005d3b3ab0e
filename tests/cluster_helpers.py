"""Several real node daemons on 127.0.0.1, each with its own directory, wired as a primary and
its secondaries; and comparisons of whole stores by a checksum of their live rows.

    with Cluster(tmp_path, secondaries=2) as cluster:   # every node started
        cluster.primary.client().set("k", 1)
        assert cluster.wait_converged()

``Cluster(..., start=False)`` builds the nodes (ports and URLs fixed) without starting them,
so a test can start a secondary late, or kill and restart any node (``Node.kill``,
``Node.start``): a restarted node keeps its port, directory and environment.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hypercacheio.store import Store
from node_helpers import TOKEN, Node, wait_until


def store_checksum(directory: str) -> tuple[int, str]:
    """(live rows, digest) of the store in ``directory`` (opened and closed here; the nodes
    may be running)."""
    store = Store(directory)
    try:
        return store.live_digest()
    finally:
        store.close()


def checksums(directories: Sequence[str]) -> list[tuple[int, str]]:
    return [store_checksum(d) for d in directories]


def converged(directories: Sequence[str]) -> bool:
    """True if every store holds the same live rows (at this moment)."""
    sums = checksums(directories)
    return all(s == sums[0] for s in sums[1:])


def wait_converged(directories: Sequence[str], timeout: float = 30.0,
                   interval: float = 0.05) -> bool:
    return wait_until(lambda: converged(directories), timeout, interval)


def replication_status(node: Node) -> dict[str, Any]:
    """The primary's per-secondary figures from ``/ping`` (with the token), by URL."""
    status, doc = node.json("GET", "/ping")
    assert status == 200, doc
    return {row["url"]: row for row in doc.get("replication", {}).get("secondaries", [])}


class Cluster:
    """One primary node and ``secondaries`` secondary nodes under ``root`` (a directory
    each: ``root/primary``, ``root/secondary-1``, ...)."""

    def __init__(self, root: str | Path, secondaries: int = 2, *, start: bool = True,
                 token: str = TOKEN, primary_env: Mapping[str, str] | None = None,
                 secondary_env: Mapping[str, str] | None = None) -> None:
        root = str(root)
        self.primary = Node(os.path.join(root, "primary"), token=token)
        self.secondaries = [Node(os.path.join(root, f"secondary-{i + 1}"), token=token)
                            for i in range(secondaries)]
        self.primary.env.update({
            "HYPERCACHEIO_SERVER_ROLE": "primary",
            "HYPERCACHEIO_SECONDARY_URLS": ",".join(s.url for s in self.secondaries),
            **(primary_env or {}),
        })
        for node in self.secondaries:
            node.env.update({
                "HYPERCACHEIO_SERVER_ROLE": "secondary",
                "HYPERCACHEIO_PRIMARY_URL": self.primary.url,
                **(secondary_env or {}),
            })
        self.slow_stops: list[str] = []  # nodes that took over 3 s to stop (a defect)
        if start:
            self.start()

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, *self.secondaries]

    @property
    def directories(self) -> list[str]:
        return [n.directory for n in self.nodes]

    def start(self) -> Cluster:
        for node in self.secondaries:
            node.start()
        self.primary.start()
        return self

    def wait_converged(self, timeout: float = 30.0,
                       nodes: Sequence[Node] | None = None) -> bool:
        """True once every node's store (or those of ``nodes``) holds the same live rows."""
        return wait_converged([n.directory for n in (nodes or self.nodes)], timeout)

    def wait_acked(self, timeout: float = 30.0) -> bool:
        """True once the primary reports every secondary acknowledged its whole oplog."""
        def done() -> bool:
            rows = replication_status(self.primary)
            return len(rows) == len(self.secondaries) and all(
                r["backlog_rows"] == 0 and r["connected"] for r in rows.values())
        return wait_until(done, timeout, 0.05)

    def stop(self) -> None:
        for node in self.nodes:
            began = time.monotonic()
            try:
                node.stop()
            except Exception:
                node.kill()
            if time.monotonic() - began > 3:
                self.slow_stops.append(node.directory)
                print(f"SLOW STOP {node.directory} {time.monotonic() - began:.1f}s\n"
                      f"{node.log()[-3000:]}", file=sys.stderr)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
