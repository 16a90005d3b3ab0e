"""Cluster-wide ``add`` and locks in active-active mode: granted by a majority.

The rule
--------
``N`` nodes are configured (``HYPERCACHEIO_PEER_ADDRS`` plus this one); a majority is
``N // 2 + 1``. Every node is a *grantor*: it keeps the leases it granted in its own store's
``locks`` table (so a restarted node still remembers them), each lease ``(name, owner,
expire_at)``; locks themselves never replicate.

**Acquire** ``(name, owner, ttl)`` on node P (the *proposer*, the node the client called):

1. P asks every node, itself included, to *grant* the lease: a grantor grants it if the
   name is free, expired or already ``owner``'s (``Store.lock_acquire``, one SQLite
   transaction), and answers with its fence counter (a number that only grows on that
   node, bumped by every grant). A lock without ttl is granted for ``CLAIM_SECONDS`` at
   first (unless the owner already holds it there without end), so that the leases of a
   proposer that dies before step 2 end by themselves.
2. With grants from a majority, P takes ``fence = max(answers)`` and sends it to the
   granting nodes (*fence*): each raises its counter to at least ``fence`` and stamps the
   lease with it (a lock without ttl: and makes it permanent). With a majority of those
   acknowledgements the lock is held: P answers the fence.
3. Otherwise P releases the grants it got. If a majority answered (someone else holds the
   lease on enough nodes) the answer is "not acquired"; if not, :class:`QuorumUnavailable`
   (HTTP 503). Nothing is ever granted by this node alone.

**Why it is safe.** Two owners holding the lock at once would each have leases on a
majority of nodes at the same moment; two majorities share a node, which granted both,
but a grantor grants a live lease to one owner only (its check-and-set is one
transaction on its own store). A lease ends by release or by its ``expire_at``: *clock
assumption*: the nodes' clocks agree within a bound much smaller than the ttl (NTP), and a
holder stops relying on the lock before ``ttl - bound`` after it asked. **Fences grow**:
the fence of a successful acquisition was written to a majority's counters (step 2) before
it was answered; the next successful acquisition gets a grant from at least one of those
nodes, whose answer is above it; so each fence is above every fence answered before it.

**add** ``(key)`` is a claim of the key by the same rule (lease ``"\\x00add:" + key``, ttl
``CLAIM_SECONDS``), where a grantor also refuses when it holds the key live. With the claim,
P writes the key locally (``Store.add``) and, before answering ``added``, sends the write's
oplog record to the granting nodes, which apply it (the ordinary stream brings it too; the
version vector makes the second copy a no-op), then frees the claim. So a successful add is
live on a majority before it is answered: a later add's claim reaches at least one of those
nodes, which refuses while the key is live; a concurrent add is excluded by the claim. A key
deleted or expired later can be added again. ``HYPERCACHEIO_HA_LOCAL_ADD=true`` skips all of
this (local ``add``: fast, two hosts may both succeed).

Release and extend go to every reachable node (extend needs a majority to succeed). A
lock's state (``info``: the node's ``GET /lock``) is read from every node too: the owner
whose live lease a majority holds, if any (a node that was down while it was taken holds no
lease of its own).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import TYPE_CHECKING, Any

from ..codec import Payload
from ..errors import QuorumUnavailable
from .frames import decode_batch, encode_batch

if TYPE_CHECKING:
    from .mesh import Mesh, PeerState

log = logging.getLogger("hypercacheio.replication.quorum")

# no caller can name a lock like this: keys and lock names may not hold NUL (codec.check_key)
ADD_PREFIX = "\x00add:"
CLAIM_SECONDS = 10.0
SQL_RAISE_FENCE = "UPDATE meta SET value = max(value, ?) WHERE name = 'fence'"
SQL_STAMP_FENCE = ("UPDATE locks SET fence = ? WHERE name = ? AND owner = ? "
                   "AND (expire_at IS NULL OR expire_at > ?)")
SQL_STAMP_FENCE_FINAL = ("UPDATE locks SET fence = ?, expire_at = ? WHERE name = ? AND owner = ? "
                         "AND (expire_at IS NULL OR expire_at > ?)")
SQL_FIND_OWN = "SELECT seq FROM oplog WHERE hlc = ? AND node = ? LIMIT 1"

SELF = "self"
CONTENDED = "contended"  # a claim refused while no node holds the key: try again


class Quorum:
    """The majority rule of one node (see the module docstring)."""

    KINDS = frozenset(("grant", "fence", "release", "extend", "put", "info"))

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.store = mesh.store
        self.granted = 0
        self.refused = 0
        self.unavailable = 0

    @property
    def majority(self) -> int:
        return self.mesh.size // 2 + 1

    # ---- the grantor ---------------------------------------------------------------------

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """Answer a quorum request of a proposer (this node's or a peer's)."""
        kind = req["k"]
        store = self.store
        if kind == "put":
            store.apply(decode_batch(req["b"]).records)
            return {"ok": True}
        name = str(req["name"])
        if kind == "info":
            info = store.lock_info(name)
            return {"ok": True} if info is None else \
                {"ok": True, "owner": info[0], "exp": info[1], "fence": info[2]}
        owner = str(req["owner"])
        expire_at = req.get("exp")
        if expire_at is not None:
            expire_at = float(expire_at)
        if kind == "grant":
            key = req.get("key")
            if isinstance(key, str) and store.get(key) is not None:
                return {"ok": False, "exists": True}
            if req.get("prov") is not None:  # a lock without ttl: provisional until fenced
                held = store.lock_info(name)
                if held is None or held[0] != owner or held[1] is not None:
                    expire_at = float(req["prov"])
            fence = store.lock_acquire(name, owner, expire_at)
            return {"ok": fence is not None, "fence": fence or 0}
        if kind == "fence":
            with store.transaction() as txn:
                txn.conn.execute(SQL_RAISE_FENCE, (int(req["fence"]),))
                if req.get("final"):  # the lease's real end (a lock without ttl: none)
                    done = txn.conn.execute(SQL_STAMP_FENCE_FINAL, (
                        int(req["fence"]), expire_at, name, owner, txn.now)).rowcount
                else:
                    done = txn.conn.execute(SQL_STAMP_FENCE, (int(req["fence"]), name, owner,
                                                              txn.now)).rowcount
            return {"ok": done > 0}
        if kind == "release":
            if req.get("force"):
                return {"ok": store.lock_force_release(name)}
            return {"ok": store.lock_release(name, owner)}
        if kind == "extend":
            return {"ok": store.lock_extend(name, owner, expire_at)}
        raise ValueError(f"unknown quorum request {kind!r}")

    # ---- the proposer --------------------------------------------------------------------

    async def _poll(self, req: dict[str, Any],
                    only: set[str] | None = None) -> dict[str, dict[str, Any] | None]:
        """Every node's answer (None: unreachable in time), keyed by address or ``self``."""
        answers: dict[str, dict[str, Any] | None] = {}
        if only is None or SELF in only:  # on a worker thread, as a peer's (mesh._answer)
            answers[SELF] = await asyncio.to_thread(self.handle, req)
        peers = [p for p in self.mesh.peers if only is None or p.address in only]

        async def one(peer: PeerState) -> dict[str, Any] | None:
            if not peer.link.connected:
                return None
            try:
                answer = await self.mesh.request(peer, req)
            except Exception as exc:
                log.debug("quorum: %s did not answer %s: %s", peer.address, req["k"], exc)
                return None
            return answer if isinstance(answer, dict) else None

        results = await asyncio.gather(*(one(p) for p in peers))
        for peer, answer in zip(peers, results, strict=True):
            answers[peer.address] = answer
        return answers

    def _unavailable(self, what: str, answered: int) -> QuorumUnavailable:
        self.unavailable += 1
        return QuorumUnavailable(
            f"{what}: {answered} of {self.mesh.size} configured nodes answered, "
            f"{self.majority} needed (check HYPERCACHEIO_PEER_ADDRS and that the peers "
            f"are up); nothing was granted")

    async def _acquire(self, name: str, owner: str, expire_at: float | None,
                       key: str | None = None) -> tuple[int | None, set[str]]:
        """(the fence, or None when refused; the nodes that granted). With ``key`` (an
        add's claim) the set is empty when refused because a node holds the key live."""
        grant: dict[str, Any] = {"k": "grant", "name": name, "owner": owner,
                                 "exp": expire_at, "key": key}
        fencing: dict[str, Any] = {"k": "fence", "name": name, "owner": owner}
        if expire_at is None:
            # A lock without ttl is granted for CLAIM_SECONDS first and made permanent by
            # the fence step: a proposer that dies in between leaves leases that end
            # (its caller was never told it holds the lock), not ones held forever.
            grant["prov"] = self.store.clock() + CLAIM_SECONDS
            fencing.update(final=True, exp=None)
        votes = await self._poll(grant)
        granted = {w for w, a in votes.items() if a is not None and a.get("ok")}
        exists = {w for w, a in votes.items() if a is not None and a.get("exists")}
        answered = sum(a is not None for a in votes.values())
        if len(granted) >= self.majority:
            fence = max(int(votes[w]["fence"]) for w in granted)  # type: ignore[index]
            acks = await self._poll({**fencing, "fence": fence}, granted)
            if sum(1 for a in acks.values() if a is not None and a.get("ok")) >= self.majority:
                self.granted += 1
                return fence, granted
            answered = sum(a is not None for a in acks.values())
        await self._poll({"k": "release", "name": name, "owner": owner}, granted)
        if answered >= self.majority and len(granted) < self.majority:
            self.refused += 1
            return None, (set() if exists or key is None else {CONTENDED})
        raise self._unavailable(f"lock {name!r}", answered)

    async def acquire(self, name: str, owner: str, expire_at: float | None) -> int | None:
        """The fence if ``owner`` now holds ``name`` on a majority, None if another owner
        holds it; :class:`QuorumUnavailable` without a majority."""
        fence, _ = await self._acquire(name, owner, expire_at)
        return fence

    async def release(self, name: str, owner: str, force: bool = False) -> bool:
        answers = await self._poll({"k": "release", "name": name, "owner": owner,
                                    "force": force})
        return any(a is not None and a.get("ok") for a in answers.values())

    async def info(self, name: str) -> tuple[str, float | None, int] | None:
        """(owner, expires at, fence) of the owner whose live lease a majority of the nodes
        hold, or None when no owner has one (a lease on fewer nodes is an acquire under way
        or one that failed: nobody holds the lock); :class:`QuorumUnavailable` without a
        majority's answers. A node that was down while the lock was taken has no lease of
        its own, so its local table alone could not tell."""
        answers = await self._poll({"k": "info", "name": name})
        answered = [a for a in answers.values() if a is not None and a.get("ok")]
        if len(answered) < self.majority:
            raise self._unavailable(f"reading lock {name!r}", len(answered))
        holders: dict[str, list[dict[str, Any]]] = {}
        for a in answered:
            if isinstance(a.get("owner"), str):
                holders.setdefault(a["owner"], []).append(a)
        for owner, leases in holders.items():
            if len(leases) >= self.majority:
                expiries = [float(a["exp"]) for a in leases if a.get("exp") is not None]
                return (owner, min(expiries) if len(expiries) == len(leases) else None,
                        max(int(a.get("fence") or 0) for a in leases))
        return None

    async def extend(self, name: str, owner: str, expire_at: float | None) -> bool:
        answers = await self._poll({"k": "extend", "name": name, "owner": owner,
                                    "exp": expire_at})
        answered = sum(a is not None for a in answers.values())
        if answered < self.majority:
            raise self._unavailable(f"extending lock {name!r}", answered)
        return sum(1 for a in answers.values() if a is not None and a.get("ok")) \
            >= self.majority

    async def add(self, key: str, tag: int, payload: Payload,
                  expire_at: float | None) -> bool:
        """``Store.add`` for the whole cluster (see the module docstring)."""
        store = self.store
        if store.get(key) is not None:
            return False
        name, owner = ADD_PREFIX + key, os.urandom(16).hex()
        deadline = time.monotonic() + self.mesh.request_timeout * 4
        while True:
            fence, granted = await self._acquire(name, owner, store.clock() + CLAIM_SECONDS,
                                                 key)
            if fence is not None:
                break
            if CONTENDED not in granted or store.get(key) is not None:
                return False  # the key is live on a node: not added
            if time.monotonic() > deadline:  # split votes for this long: give up
                self.unavailable += 1
                raise QuorumUnavailable(
                    f"add of {key!r}: concurrent adds of the key split the votes of the "
                    f"{self.mesh.size} nodes until the time ran out; nothing was added, "
                    f"try again")
            await asyncio.sleep(random.uniform(0.002, 0.02))  # another claim: try again
        try:
            if not store.add(key, tag, payload, expire_at):
                return False
            record = self._record_of(store.last_version())
            if record is not None:
                peers = granted - {SELF}
                acks = await self._poll({"k": "put", "b": encode_batch(store.node_id,
                                                                      [record])}, peers)
                held = 1 + sum(1 for a in acks.values() if a is not None and a.get("ok"))
                if held < self.majority:
                    raise self._unavailable(f"add of {key!r} (written on this node, it "
                                            f"replicates when the peers return)", held)
            return True
        finally:
            await self._poll({"k": "release", "name": name, "owner": owner}, granted)

    def _record_of(self, hlc: int) -> Any:
        row = self.store._read_one(SQL_FIND_OWN, (hlc, self.store.node_id))
        if row is None:
            return None
        found = self.store.oplog_since(int(row[0]) - 1, 1)
        return found[0] if found else None

    def status(self) -> dict[str, int]:
        return {"granted": self.granted, "refused": self.refused,
                "unavailable": self.unavailable, "majority": self.majority}


__all__ = ["ADD_PREFIX", "CLAIM_SECONDS", "Quorum"]
