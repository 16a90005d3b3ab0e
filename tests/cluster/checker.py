"""The checker: a history (``workload.Op``) and the final stores, after healing and
quiescence, against the guarantees of the mode (``harness.*`` names).

- ``converge``: every store's checksum of live rows (``Store.checksum``) is the same.
- ``acked_writes`` / ``no_resurrection``: for each key of the ``set``/``delete`` space, the
  final value (on every node) must come from a write that may have happened (``ok`` or
  ``unknown``) and that no acknowledged write started after it completed (a definitely later
  write has a later version at the single authority). A final value whose write was followed
  by an acknowledged delete is a *resurrection*; a final value older than an acknowledged
  write (or missing) is a *lost write*; a value nobody wrote is a *phantom*.
- ``counters``: each counter's final value lies between the sum of acknowledged increments
  and that sum plus the unknown ones (the workload never sets nor deletes a counter, so the
  sum runs from the start: "since the last set/delete" is the whole history);
  ``linear_counters`` (one authority, primary/secondary): the values the acknowledged
  increments returned are all different (no increment applied twice or answered from a
  stale copy). Active-active answers an increment from the local node, so two hosts may
  return the same value; only the sum is its promise.
- ``add_one_winner``: at most one ``add`` per key answered True, and the final value is the
  winner's (or an unknown add's when none answered True).
- ``lock_exclusive``: fences of grants are unique; ordered by fence, a grant is never
  acknowledged before the previous holder sent its release (while that one's ttl ran), and
  a grant completed before another began carries the lower fence.
- stale reads (measured, never a failure): a ``get`` on a host that returned a value
  replaced by an acknowledged write that completed before the ``get`` began; the window is
  how long before the ``get`` that replacement completed. A read of a value whose write
  had an unknown outcome is not judged (that write may have landed much later).

Unknown outcomes are never taken as happened nor as not happened: they widen what is allowed.

Active-active (last writer wins by (HLC version, node id), versions from each node's wall
clock in milliseconds plus a counter; every host of the suite shares one wall clock) is held
to the same register rule with ``slack`` seconds (``AA_SLACK``): precisely, the final value
of a key must be the value of a ``set`` that is ``ok`` or ``unknown`` (or absence, from a
``delete`` or from nothing acknowledged), and that candidate ``w`` must not be *followed*
by an acknowledged write: no ``ok`` set/delete of the key was invoked more than ``slack``
after ``w`` completed (``unknown`` writes complete at +infinity). A write invoked after
``w`` completed was stamped at a later wall-clock time, so it carries the higher version
and must win; within ``slack`` (the same millisecond, where each node's counter and the
node id break the tie) either may win. So among concurrent acknowledged sets any one may be
the survivor; a survivor that an acknowledged write definitely followed is a lost write
(or, when everything after it was a delete, a resurrection).

*Clock skew* (the nemesis' ``skew``: a node restarted with a test-only clock offset of up
to ``skew`` seconds, the largest offset in the run's fault schedule, ``nemesis.max_skew``).
What does not depend on clocks holds unchanged: stores identical, no resurrection, exact
counters, one ``add`` winner (a majority or the one authority decides; no clock involved).
Two rules are relaxed by exactly the bound, because under skew the version order may differ
from real time by up to it:

- last writer wins (active-active): a version is the wall clock *of the node that stamped
  it*. A write invoked after ``w`` completed, on a node whose clock runs ``skew`` behind
  ``w``'s node (and that has not yet observed ``w``'s version), carries the *lower* version
  and loses, by design of LWW, not by a defect. So "followed" above means invoked more than
  ``slack + skew`` after ``w`` completed. Primary/secondary is not relaxed: the primary
  stamps every version from one store's clock, which never goes back (``store/clock.py``:
  max(wall, last + 1)), so its version order is real-time order whatever its offset.
- locks: a lease ends at ``expire_at`` *by the clock of the node that judges it*; a node
  running ``skew`` ahead sees a lease expire ``skew`` early (the clock assumption of
  ``replication/quorum.py``: clocks agree within a bound well below the ttl). A holder that
  never sent its release is taken to hold until ``ttl - skew`` after its request; the
  nemesis' ``SKEW_RANGE`` keeps the bound at most half of ``LOCK_TTL`` (checked in
  ``Checker.__init__``), and a released lock is judged by its release as before.

A *wiped* host (active-active: writes are local until streamed) loses what it had not yet
sent: ``wiped_unknown`` turns the ``set``/``delete``/``incr`` acknowledged by that host in
the moments before its wipe into ``unknown`` (``add`` and locks were on a majority before
they were answered and keep their status). That is the one thing active-active does not
promise: an acknowledged write survives its host's disk only once streamed.
"""

from __future__ import annotations

import bisect
import math
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypercacheio import codec
from hypercacheio.store import DB_NAME, Store

from .harness import (
    ACKED_WRITES,
    ADD_ONE_WINNER,
    CONVERGE,
    COUNTERS,
    LINEAR_COUNTERS,
    LOCK_EXCLUSIVE,
    NO_RESURRECTION,
)
from .workload import FAIL, LOCK_TTL, OK, UNKNOWN, Op

INF = math.inf
AA_SLACK = 0.005  # versions are wall-clock milliseconds: two writes in one ms may tie
WIPE_WINDOW = 1.0  # with healthy links a host streams its writes well within this


def wiped_unknown(history: Sequence[Op], wipes: Sequence[tuple[str, float]],
                  faults: Sequence[tuple[float, float | None]] = (),
                  window: float = WIPE_WINDOW) -> list[Op]:
    """``history`` with the ``set``/``delete``/``incr`` that a wiped host acknowledged in the
    ``window`` seconds before its wipe (``wipes``: (host, time)) made ``unknown``; when a
    fault (``faults``: (start, end)) ended less than ``window`` before the wipe, the window
    reaches back to that fault's start (the host may not have streamed since)."""
    spans: list[tuple[str, float, float]] = []
    for host, at in wipes:
        since = at - window
        for start, end in faults:
            if start < at and (end is None or end > at - window):
                since = min(since, start)
        spans.append((host, since, at))
    out: list[Op] = []
    for op in history:
        if (op.status == OK and op.f in ("set", "delete", "incr")
                and any(op.host == h and a <= op.complete <= b for h, a, b in spans)):
            op = Op(**{**op.__dict__, "status": UNKNOWN, "error": "acknowledged by a "
                       "host wiped before it could stream the write"})
        out.append(op)
    return out


@dataclass
class Final:
    """One node's store after the run: its checksum and live values."""

    node: str
    checksum: str
    rows: int
    values: dict[str, Any]


def read_final(node: str, directory: str, now: float | None = None) -> Final:
    """The live rows of the store in ``directory`` (the node may be running)."""
    moment = time.time() if now is None else now
    store = Store(directory)
    try:
        rows, checksum = store.live_digest(moment)
    finally:
        store.close()
    conn = sqlite3.connect(f"file:{os.path.join(directory, DB_NAME)}?mode=ro", uri=True,
                           timeout=10)
    try:
        values = {key: codec.decode(tag, value) for key, tag, value in conn.execute(
            "SELECT key, tag, value FROM entries WHERE tag != -1 "
            "AND (expire_at IS NULL OR expire_at > ?)", (moment,))}
    finally:
        conn.close()
    return Final(node, checksum, rows, values)


@dataclass
class StaleReads:
    reads: int = 0
    stale: int = 0
    windows: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        w = sorted(self.windows)
        pick = (lambda q: w[min(len(w) - 1, int(q * len(w)))]) if w else (lambda q: 0.0)
        return {"reads": self.reads, "stale": self.stale,
                "max_s": w[-1] if w else 0.0, "p50_s": pick(0.5), "p99_s": pick(0.99)}


@dataclass
class CheckResult:
    valid: bool
    failures: list[str]
    stats: dict[str, Any]
    stale: dict[str, StaleReads]
    checked: list[str]

    def failures_of(self, kind: str) -> list[str]:
        return [f for f in self.failures if f.startswith(kind)]


def _fmt(op: Op) -> str:
    return (f"[{op.invoke:.3f}-{op.complete:.3f}] {op.client} {op.f}({op.key}"
            f"{'' if op.value is None else ', ' + repr(op.value)}) -> {op.status}"
            f"{'' if op.result is None else ' ' + repr(op.result)}")


class Checker:
    def __init__(self, guarantees: Iterable[str], max_examples: int = 5,
                 slack: float = 0.0, skew: float = 0.0) -> None:
        if not 0 <= skew <= LOCK_TTL / 2:
            raise ValueError(f"a clock skew of {skew} s is not well below the lock ttl "
                             f"({LOCK_TTL} s): the lease rule would not mean anything")
        self.guarantees = frozenset(guarantees)
        self.max_examples = max_examples
        # see the module's docstring (active-active: ``AA_SLACK`` + the skew bound)
        self.slack = slack
        self.skew = skew  # the largest clock offset of a node in the run (nemesis ``skew``)

    @classmethod
    def for_run(cls, guarantees: Iterable[str], local_writes: bool,
                skew: float = 0.0) -> Checker:
        """The checker of a run: versions stamped by several clocks (``local_writes``,
        active-active) get ``AA_SLACK`` plus the skew bound; one authority's get none."""
        return cls(guarantees, slack=AA_SLACK + skew if local_writes else 0.0, skew=skew)

    def check(self, history: Sequence[Op], finals: Sequence[Final]) -> CheckResult:
        failures: list[str] = []
        stats: dict[str, Any] = {}
        checked: list[str] = []
        by_f: dict[str, list[Op]] = defaultdict(list)
        for op in history:
            by_f[op.f].append(op)
        stats["ops"] = {f: {s: sum(1 for op in ops if op.status == s)
                            for s in (OK, FAIL, UNKNOWN)} for f, ops in sorted(by_f.items())}
        if CONVERGE in self.guarantees:
            checked.append(CONVERGE)
            sums = {(f.rows, f.checksum) for f in finals}
            if len(sums) > 1:
                failures.append("converge: stores differ: " + ", ".join(
                    f"{f.node}={f.rows} rows/{f.checksum[:12]}" for f in finals))
                failures += self._diff(finals)
        if ACKED_WRITES in self.guarantees or NO_RESURRECTION in self.guarantees:
            checked += [g for g in (ACKED_WRITES, NO_RESURRECTION) if g in self.guarantees]
            failures += self._registers(by_f["set"] + by_f["delete"], finals)
        if COUNTERS in self.guarantees:
            checked.append(COUNTERS)
            checked += [LINEAR_COUNTERS] if LINEAR_COUNTERS in self.guarantees else []
            failures += self._counters(by_f["incr"], finals)
        if ADD_ONE_WINNER in self.guarantees:
            checked.append(ADD_ONE_WINNER)
            failures += self._adds(by_f["add"], finals)
        if LOCK_EXCLUSIVE in self.guarantees:
            checked.append(LOCK_EXCLUSIVE)
            failures += self._locks(by_f["lock"])
        stale = self._stale(by_f["set"] + by_f["delete"], by_f["get"])
        return CheckResult(not failures, failures, stats, stale, checked)

    # ---- stores -------------------------------------------------------------------------

    def _diff(self, finals: Sequence[Final]) -> list[str]:
        out: list[str] = []
        keys = sorted(set().union(*(f.values for f in finals)))
        for key in keys:
            seen = {f.node: f.values.get(key) for f in finals}
            if len(set(map(repr, seen.values()))) > 1:
                out.append(f"converge: key {key!r} differs: {seen}")
                if len(out) >= self.max_examples:
                    break
        return out

    # ---- set/delete registers -----------------------------------------------------------

    def _registers(self, writes: list[Op], finals: Sequence[Final]) -> list[str]:
        out: list[str] = []
        per_key: dict[str, list[Op]] = defaultdict(list)
        for op in writes:
            per_key[op.key].append(op)
        for key, ops in sorted(per_key.items()):
            maybe = [op for op in ops if op.status in (OK, UNKNOWN)]
            # the latest start of an acknowledged write: a candidate must not have
            # completed before it (unknown outcomes may complete any time later)
            last_ok_invoke = max((op.invoke for op in ops if op.status == OK), default=-INF)

            def done(op: Op, slack: float = self.slack) -> float:
                return op.complete + slack if op.status == OK else INF

            for final in finals:
                value = final.values.get(key)
                if value is None:
                    cands = [op for op in maybe if op.f == "delete"]
                    initial_ok = last_ok_invoke == -INF  # nothing acknowledged: absent is fine
                    if initial_ok or any(done(op) >= last_ok_invoke for op in cands):
                        continue
                    latest = max((op for op in ops if op.status == OK),
                                 key=lambda o: o.invoke)
                    out.append(f"acked_writes: lost write on {final.node}: key {key!r} is "
                               f"absent, but {_fmt(latest)} and no delete may follow it")
                    continue
                writers = [op for op in maybe if op.f == "set" and op.value == value]
                if not writers:
                    out.append(f"acked_writes: phantom on {final.node}: key {key!r} = "
                               f"{value!r}, which no write that may have happened wrote")
                    continue
                w = writers[0]
                if done(w) >= last_ok_invoke:
                    continue
                later = [op for op in ops if op.status == OK and op.invoke > done(w)]
                deletes = [op for op in later if op.f == "delete"]
                if deletes and all(op.f == "delete" for op in later):
                    kind = NO_RESURRECTION
                    what = f"resurrected on {final.node}: key {key!r} = {value!r}"
                else:
                    kind = ACKED_WRITES
                    what = f"stale final value on {final.node}: key {key!r} = {value!r}"
                if kind in self.guarantees:
                    out.append(f"{kind}: {what} from {_fmt(w)}; later acknowledged: "
                               + "; ".join(_fmt(op) for op in later[-3:]))
            if len(out) > self.max_examples * 4:
                break
        return out

    # ---- counters -----------------------------------------------------------------------

    def _counters(self, incrs: list[Op], finals: Sequence[Final]) -> list[str]:
        out: list[str] = []
        per_key: dict[str, list[Op]] = defaultdict(list)
        for op in incrs:
            per_key[op.key].append(op)
        for key, ops in sorted(per_key.items()):
            acked = sum(op.value for op in ops if op.status == OK)
            unknown = sum(op.value for op in ops if op.status == UNKNOWN)
            for final in finals:
                value = final.values.get(key, 0)
                if not isinstance(value, int) or not acked <= value <= acked + unknown:
                    out.append(f"counters: {key!r} on {final.node} = {value!r}, expected "
                               f"{acked} acknowledged + up to {unknown} unknown")
            if LINEAR_COUNTERS not in self.guarantees:
                continue
            results = [op.result for op in ops if op.status == OK]
            dupes = len(results) - len(set(results))
            if dupes:
                counts: dict[int, int] = defaultdict(int)
                for r in results:
                    counts[r] += 1
                twice = sorted(r for r, c in counts.items() if c > 1)[:5]
                out.append(f"counters: {key!r}: {dupes} acknowledged increments returned a "
                           f"value another one returned too (e.g. {twice})")
        return out

    # ---- add ----------------------------------------------------------------------------

    def _adds(self, adds: list[Op], finals: Sequence[Final]) -> list[str]:
        out: list[str] = []
        per_key: dict[str, list[Op]] = defaultdict(list)
        for op in adds:
            per_key[op.key].append(op)
        for key, ops in sorted(per_key.items()):
            winners = [op for op in ops if op.status == OK and op.result is True]
            if len(winners) > 1:
                out.append(f"add_one_winner: {key!r} has {len(winners)} winners: "
                           + "; ".join(_fmt(op) for op in winners[:4]))
                continue
            allowed = ({winners[0].value} if winners
                       else {op.value for op in ops if op.status == UNKNOWN})
            for final in finals:
                value = final.values.get(key)
                if value is None and not winners:
                    continue
                if value not in allowed:
                    out.append(f"add_one_winner: {key!r} on {final.node} = {value!r}, but "
                               f"the winner was {sorted(allowed)!r}")
            if len(out) > self.max_examples * 4:
                break
        return out

    # ---- locks --------------------------------------------------------------------------

    def _locks(self, locks: list[Op]) -> list[str]:
        out: list[str] = []
        grants = sorted((op for op in locks if op.status == OK), key=lambda op: op.result)
        fences = [op.result for op in grants]
        if len(set(fences)) != len(fences):
            out.append(f"lock_exclusive: the same fence granted twice: "
                       f"{sorted(f for f in fences if fences.count(f) > 1)[:5]}")
        for a, b in zip(grants, grants[1:], strict=False):
            # a held from its grant until it sent its release (or its ttl ran out)
            # (a release answered False: a had lost it before, when is unknown)
            if a.end_status == FAIL:
                continue
            held_until = min(a.end if a.end is not None else INF,
                             a.invoke + LOCK_TTL - self.skew)
            if b.complete < held_until:
                out.append(f"lock_exclusive: two holders at once: {_fmt(a)} released at "
                           f"{a.end}; {_fmt(b)}")
            if len(out) >= self.max_examples:
                break
        by_time = sorted(grants, key=lambda op: op.invoke)
        for i, a in enumerate(by_time):
            for b in by_time[i + 1:i + 8]:
                if a.complete < b.invoke and a.result > b.result:
                    out.append(f"lock_exclusive: fence order against real time: {_fmt(a)} "
                               f"before {_fmt(b)}")
        return out[: self.max_examples * 2]

    # ---- stale reads --------------------------------------------------------------------

    def _stale(self, writes: list[Op], gets: list[Op]) -> dict[str, StaleReads]:
        result: dict[str, StaleReads] = defaultdict(StaleReads)
        per_key: dict[str, list[Op]] = defaultdict(list)
        for op in writes:
            if op.status in (OK, UNKNOWN):
                per_key[op.key].append(op)
        index: dict[str, tuple[list[float], list[Op], dict[Any, Op]]] = {}
        for key, ops in per_key.items():
            acked = sorted((op for op in ops if op.status == OK), key=lambda o: o.complete)
            by_value = {op.value: op for op in ops if op.f == "set"}
            index[key] = ([op.complete for op in acked], acked, by_value)
        for get in gets:
            if get.status != OK:
                continue
            stats = result[get.host]
            stats.reads += 1
            if get.key not in index:
                continue
            completes, acked, by_value = index[get.key]
            source = by_value.get(get.result) if get.result is not None else None
            if source is not None and source.status == UNKNOWN:
                continue  # applied at some unknown moment (a paused primary: much later)
            since = source.complete if source is not None else -INF
            if get.result is None:
                # a delete that may precede the read: in flight or unknown -> not judged
                deletes = [op for op in per_key[get.key] if op.f == "delete"
                           and op.invoke < get.complete]
                if any(op.status == UNKNOWN or op.complete >= get.invoke for op in deletes):
                    continue
                since = max((op.complete for op in deletes), default=-INF)
            start = bisect.bisect_right(completes, since) if since != -INF else 0
            for op in acked[start:]:
                if op.complete >= get.invoke:
                    break
                if op.invoke > since and op.value != get.result:
                    stats.stale += 1
                    stats.windows.append(get.invoke - op.complete)
                    break
        return dict(result)


def stale_summary(stale: Mapping[str, StaleReads]) -> dict[str, dict[str, float]]:
    return {host: s.summary() for host, s in sorted(stale.items())}
