"""A cluster of real node processes on 127.0.0.1, each with its own directory, with a fault
proxy (``proxy.py``) on every replication link, and the *mode* objects that know how to
wire one and which guarantees it promises.

    mode = PrimarySecondaryMode()
    with mode.build(tmp_path, secondaries=2) as cluster:
        cluster.links["secondary-1->primary"].blackhole()
        ...
        cluster.heal(); cluster.quiesce()

Primary/secondary (issue 9) is built on ``tests/cluster_helpers.Cluster`` (composition: its
nodes are created unstarted, then their URLs are pointed at the proxies): each secondary's
``HYPERCACHEIO_PRIMARY_URL`` names a proxy in front of the primary (forwarded writes and
locks), and the primary's ``HYPERCACHEIO_SECONDARY_URLS`` name a proxy in front of each
secondary (the push). A later mode (active-active, issue 10) implements ``Mode`` the same way:
``build`` returns a ``ClusterHarness`` and ``guarantees`` names what the checker may hold it to.

Active-active (issue 10, ``ActiveActiveMode``, "aa"): hosts ``node-1`` .. ``node-N``, each a
node with ``HYPERCACHEIO_HA_ENABLED``; a proxy per *directed* pair: node A's
``HYPERCACHEIO_PEER_ADDRS`` entry for B names the proxy ``node-A->node-B`` in front of B's
replication port (the HMAC handshake binds node ids, not addresses). Quorum requests (add,
locks) travel on the same links, so a partition cuts them too. Every client talks to its own
host's node; there is no authority.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cluster_helpers import Cluster, checksums
from hypercacheio import RemoteCache
from node_helpers import PREFIX, Node, free_port, wait_until

from .proxy import Proxy, ProxyHub

# the guarantees a checker can hold a mode to (checker.py implements each)
CONVERGE = "converge"  # all stores identical after healing
ACKED_WRITES = "acked_writes"  # every acknowledged write present unless replaced later
NO_RESURRECTION = "no_resurrection"  # a deleted key never comes back
COUNTERS = "counters"  # each counter = sum of acknowledged incrs (unknowns bound it)
ADD_ONE_WINNER = "add_one_winner"  # at most one add winner per key
LOCK_EXCLUSIVE = "lock_exclusive"  # no two holders at once, fences in grant order
# one authority answers every incr: no two acknowledged increments return the same value
LINEAR_COUNTERS = "linear_counters"
ALL_GUARANTEES = frozenset({CONVERGE, ACKED_WRITES, NO_RESURRECTION, COUNTERS,
                            ADD_ONE_WINNER, LOCK_EXCLUSIVE, LINEAR_COUNTERS})

TMPFS_BYTES = 24 << 20


class HostNode:
    """One host: its node process (``node_helpers.Node``) and what a nemesis did to it."""

    def __init__(self, name: str, node: Node, role: str) -> None:
        self.name = name
        self.node = node
        self.role = role
        self.paused = False
        self.tmpfs = False

    @property
    def directory(self) -> str:
        return self.node.directory

    @property
    def url(self) -> str:
        return self.node.url

    @property
    def running(self) -> bool:
        return self.node.proc is not None and self.node.proc.poll() is None

    def start(self) -> None:
        self.node.start(timeout=30)
        self.paused = False

    def kill(self) -> None:
        if self.paused:
            self.resume()
        self.node.kill()

    def pause(self) -> None:
        if self.running and not self.paused:
            assert self.node.proc is not None
            self.node.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused and self.node.proc is not None:
            self.node.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def wipe(self) -> None:
        """Kill -9, then remove everything in its directory (the mount point stays)."""
        self.kill()
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)

    def client(self, timeout: float = 1.0) -> RemoteCache:
        return self.node.client(timeout=timeout)


@dataclass
class Link:
    """A directed replication link ``src -> dst`` and the proxy that carries it."""

    name: str
    src: str
    dst: str
    proxy: Proxy


@dataclass
class ClusterHarness:
    """Hosts, links and proxies of one running cluster (built by a ``Mode``)."""

    root: str
    hosts: list[HostNode]
    hub: ProxyHub
    links: dict[str, Link] = field(default_factory=dict)
    authority: str | None = None  # the host that answers writes and locks (primary), if any

    def host(self, name: str) -> HostNode:
        return next(h for h in self.hosts if h.name == name)

    @property
    def directories(self) -> list[str]:
        return [h.directory for h in self.hosts]

    def links_of(self, names: Iterable[str]) -> list[Link]:
        """The links with one end in ``names`` and the other outside (a partition's cut)."""
        group = set(names)
        return [link for link in self.links.values()
                if (link.src in group) != (link.dst in group)]

    def mount(self, tmpfs: Sequence[str]) -> ClusterHarness:
        """Give each host named in ``tmpfs`` a small tmpfs as its storage directory."""
        for host in self.hosts:
            if host.name in tmpfs:
                mount_tmpfs(host.directory)
                host.tmpfs = True
        return self

    def start(self) -> ClusterHarness:
        # the hosts that are not the authority first: the authority's push finds them up
        for host in sorted(self.hosts, key=lambda h: h.name == self.authority):
            host.start()
        return self

    def heal(self) -> None:
        """Every link passes again, every paused node runs, every dead node restarts."""
        self.hub.heal_all()
        for host in self.hosts:
            host.resume()
        for host in self.hosts:
            if not host.running:
                host.start()

    def checksums(self) -> list[tuple[int, str]]:
        return checksums(self.directories)

    def quiesce(self, timeout: float = 60.0) -> bool:
        """True once every store holds the same live rows twice in a row."""
        last: list[tuple[int, str]] = []

        def settled() -> bool:
            nonlocal last
            sums = self.checksums()
            same = all(s == sums[0] for s in sums[1:])
            stable = same and sums == last
            last = sums
            return stable
        return wait_until(settled, timeout, 0.2)

    def close(self) -> None:
        for host in self.hosts:
            host.resume()
            try:
                host.node.stop(timeout=10)
            except Exception:
                host.kill()
        self.hub.close()
        for host in self.hosts:
            if host.tmpfs:
                subprocess.run(["umount", "-l", host.directory], check=False,
                               capture_output=True)

    def __enter__(self) -> ClusterHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def can_mount_tmpfs() -> str | None:
    """None if this runner can mount a tmpfs, else the reason it cannot."""
    if os.geteuid() != 0:
        return "a full disk needs a tmpfs mount, which needs root"
    return None


def mount_tmpfs(directory: str, size: int = TMPFS_BYTES) -> None:
    os.makedirs(directory, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", directory],
                   check=True, capture_output=True)


class Mode(Protocol):
    """A cluster mode the suite can run: how to build and start one, what it guarantees."""

    name: str
    guarantees: frozenset[str]
    faults: frozenset[str]  # the nemesis faults that make sense in this mode
    authority: str | None  # the host that answers writes and locks, if any
    # acknowledged writes live only on their host until replicated: a wiped host loses them
    local_writes: bool

    def host_names(self, nodes: int) -> list[str]: ...

    def build(self, root: str | Path, nodes: int, *, tmpfs: Sequence[str] = (),
              env: dict[str, str] | None = None) -> ClusterHarness: ...

    def lag(self, harness: ClusterHarness, timeout: float = 0.3) -> dict[str, float]:
        """Replication backlog per host (rows), as sampled for the timeline."""
        ...


class PrimarySecondaryMode:
    """Issue 9: one primary (writes, locks), ``nodes - 1`` secondaries, HTTP both ways."""

    name = "ps"
    # add and locks have a single authority (the primary) as long as it is up; when it is
    # down they fail (NodeUnavailable) rather than answer from a secondary
    guarantees = ALL_GUARANTEES
    # a wiped primary loses what it acknowledged by definition: only secondaries are wiped
    faults = frozenset({"partition", "isolate", "kill", "kill_primary", "pause",
                        "pause_primary", "slow", "drop_answers", "full_disk", "wipe", "skew"})
    authority: str | None = "primary"
    local_writes = False

    def host_names(self, nodes: int) -> list[str]:
        return ["primary", *(f"secondary-{i + 1}" for i in range(nodes - 1))]

    def build(self, root: str | Path, nodes: int = 3, *, tmpfs: Sequence[str] = (),
              env: dict[str, str] | None = None) -> ClusterHarness:
        root = str(root)
        extra = {"HYPERCACHEIO_TIMEOUT": "1", **(env or {})}
        base = Cluster(root, secondaries=nodes - 1, start=False, primary_env=extra,
                       secondary_env=extra)
        hub = ProxyHub()
        primary = HostNode("primary", base.primary, "primary")
        hosts = [primary]
        links: dict[str, Link] = {}
        push_urls = []
        for i, node in enumerate(base.secondaries):
            name = f"secondary-{i + 1}"
            hosts.append(HostNode(name, node, "secondary"))
            forward = hub.proxy(f"{name}->primary", base.primary.port)
            push = hub.proxy(f"primary->{name}", node.port)
            links[forward.name] = Link(forward.name, name, "primary", forward)
            links[push.name] = Link(push.name, "primary", name, push)
            node.env["HYPERCACHEIO_PRIMARY_URL"] = f"http://127.0.0.1:{forward.port}{PREFIX}"
            push_urls.append(f"http://127.0.0.1:{push.port}{PREFIX}")
        base.primary.env["HYPERCACHEIO_SECONDARY_URLS"] = ",".join(push_urls)
        harness = ClusterHarness(root, hosts, hub, links, authority="primary")
        try:
            harness.mount(tmpfs).start()
        except BaseException:
            harness.close()
            raise
        return harness

    def lag(self, harness: ClusterHarness, timeout: float = 0.3) -> dict[str, float]:
        """Backlog rows per secondary as the primary reports it (empty if it does not
        answer)."""
        primary = harness.host("primary")
        if not primary.running or primary.paused:
            return {}
        with contextlib.suppress(Exception):
            status, doc = primary.node.json("GET", "/ping", timeout=timeout)
            if status == 200:
                by_port = {link.proxy.port: link.dst for link in harness.links.values()
                           if link.src == "primary"}
                out: dict[str, float] = {}
                for row in doc.get("replication", {}).get("secondaries", []):
                    port = int(row["url"].split(":")[2].split("/")[0])
                    out[by_port.get(port, row["url"])] = float(row.get("backlog_rows", 0))
                return out
        return {}


ANTI_ENTROPY_SECONDS = 2


class ActiveActiveMode:
    """Issue 10: ``nodes`` equal hosts, full mesh over the binary replication port, add and
    locks by majority (``replication/quorum.py``), everything else local then streamed."""

    name = "aa"
    # increments are answered by the local node (concurrent ones on two hosts may return
    # the same value): the sum converges, the answers are not linearizable
    guarantees = ALL_GUARANTEES - {LINEAR_COUNTERS}
    faults = frozenset({"partition", "isolate", "kill", "pause", "slow", "drop_answers",
                        "full_disk", "wipe", "skew"})
    authority: str | None = None
    local_writes = True

    def host_names(self, nodes: int) -> list[str]:
        return [f"node-{i + 1}" for i in range(nodes)]

    def build(self, root: str | Path, nodes: int = 3, *, tmpfs: Sequence[str] = (),
              env: dict[str, str] | None = None) -> ClusterHarness:
        root = str(root)
        names = self.host_names(nodes)
        repl = {name: free_port() for name in names}
        hub = ProxyHub()
        links: dict[str, Link] = {}
        hosts: list[HostNode] = []
        for name in names:
            peers = []
            for other in names:
                if other == name:
                    continue
                proxy = hub.proxy(f"{name}->{other}", repl[other])
                links[proxy.name] = Link(proxy.name, name, other, proxy)
                peers.append(f"127.0.0.1:{proxy.port}")
            node = Node(os.path.join(root, name), extra_env={
                "HYPERCACHEIO_HA_ENABLED": "true",
                "HYPERCACHEIO_PEER_ADDRS": ",".join(peers),
                "HYPERCACHEIO_REPL_PORT": str(repl[name]),
                "HYPERCACHEIO_ANTI_ENTROPY_INTERVAL": str(ANTI_ENTROPY_SECONDS),
                "HYPERCACHEIO_TIMEOUT": "1",
                **(env or {}),
            })
            hosts.append(HostNode(name, node, "peer"))
        harness = ClusterHarness(root, hosts, hub, links, authority=None)
        try:
            harness.mount(tmpfs).start()
            if not wait_until(lambda: self._linked(harness), 30, 0.05):
                raise RuntimeError("the mesh did not link within 30 s: "
                                   + repr({h.name: self._peers(h) for h in hosts}))
        except BaseException:
            harness.close()
            raise
        return harness

    @staticmethod
    def _peers(host: HostNode, timeout: float = 1.0) -> list[dict[str, object]]:
        status, doc = host.node.json("GET", "/ping", timeout=timeout)
        if status != 200:
            return []
        peers: list[dict[str, object]] = doc.get("mesh", {}).get("peers", [])
        return peers

    def _linked(self, harness: ClusterHarness) -> bool:
        want = len(harness.hosts) - 1
        return all(sum(bool(p.get("connected")) for p in self._peers(h)) >= want
                   for h in harness.hosts)

    def lag(self, harness: ClusterHarness, timeout: float = 0.3) -> dict[str, float]:
        """Per host, its largest backlog (records its peers have not acknowledged)."""
        out: dict[str, float] = {}
        for host in harness.hosts:
            if not host.running or host.paused:
                continue
            with contextlib.suppress(Exception):
                rows = [float(p.get("backlog_records") or 0)  # type: ignore[arg-type]
                        for p in self._peers(host, timeout)]
                out[host.name] = max(rows, default=0.0)
        return out


MODES: dict[str, Mode] = {"ps": PrimarySecondaryMode(), "aa": ActiveActiveMode()}
