"""The checker of the cluster fault suite must fail on defects: synthetic histories with one
defect each, and one real primary/secondary cluster with a defect injected by a proxy (no
hook in the production code): the proxy in front of a secondary answers every tenth push
batch itself with ``200 {"acked": <last seq>}`` and never forwards it.

Active-active: synthetic histories under its guarantees (LWW with slack, local counter
answers, wiped hosts), and a real 3-node cluster with ``add`` relaxed to local-only
(``HYPERCACHEIO_HA_LOCAL_ADD=true``, a documented setting that gives up exclusivity): the
checker must find keys with two add winners."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cluster.checker import AA_SLACK, Checker, CheckResult, Final, wiped_unknown
from cluster.harness import (
    ACKED_WRITES,
    ADD_ONE_WINNER,
    ALL_GUARANTEES,
    CONVERGE,
    COUNTERS,
    LOCK_EXCLUSIVE,
    MODES,
    NO_RESURRECTION,
    ClusterHarness,
)
from cluster.run import run
from cluster.workload import FAIL, LOCK_TTL, OK, UNKNOWN, Op
from hypercacheio.replication.frames import decode_batch, encode_batch
from hypercacheio.replication.records import DELETE, TOUCH


def op(f: str, key: str, value: object = None, invoke: float = 0.0, complete: float = 0.1,
       status: str = OK, result: object = None, client: str = "p/0",
       end: float | None = None, end_status: str | None = None) -> Op:
    return Op(client, client.split("/")[0], f, key, value, invoke, complete, status, result,
              end=end, end_status=end_status)


def final(node: str, values: dict[str, object], checksum: str = "same") -> Final:
    return Final(node, checksum, len(values), dict(values))


def check(history: list[Op], finals: list[Final]) -> CheckResult:
    return Checker(ALL_GUARANTEES).check(history, finals)


def both(values: dict[str, object]) -> list[Final]:
    return [final("primary", values), final("secondary-1", values)]


# ---- synthetic histories: the valid ones pass -------------------------------------------

def test_a_valid_history_passes() -> None:
    history = [
        op("set", "k", "a", 0, 1), op("set", "k", "b", 2, 3), op("delete", "j", None, 0, 1),
        op("incr", "c", 1, 0, 1, result=1), op("incr", "c", 1, 0, 1, UNKNOWN),
        op("incr", "c", 1, 2, 3, result=2),
        op("add", "a1", "x", 0, 1, result=True), op("add", "a1", "y", 0, 1, result=False),
        op("lock", "L", None, 0, 1, result=5, end=1.1, end_status=OK),
        op("lock", "L", None, 1.0, 1.2, result=6, end=1.3, end_status=OK),
        op("get", "k", None, 3.5, 3.6, result="b", client="secondary-1/0"),
    ]
    result = check(history, both({"k": "b", "c": 3, "a1": "x"}))
    assert result.valid, result.failures
    assert set(result.checked) == ALL_GUARANTEES


def test_unknown_outcomes_widen_what_is_allowed() -> None:
    # an unknown set may land after a later acknowledged one (a delayed forward)
    history = [op("set", "k", "old", 0, 9, UNKNOWN), op("set", "k", "new", 1, 2)]
    assert check(history, both({"k": "old"})).valid
    assert check(history, both({"k": "new"})).valid


# ---- each defect is caught ---------------------------------------------------------------

def test_lost_acknowledged_write_is_caught() -> None:
    history = [op("set", "k", "a", 0, 1), op("set", "k", "b", 2, 3)]
    result = check(history, both({"k": "a"}))
    assert not result.valid
    assert result.failures_of(ACKED_WRITES), result.failures
    result = check(history, both({}))
    assert result.failures_of(ACKED_WRITES), result.failures


def test_resurrected_key_is_caught() -> None:
    history = [op("set", "k", "a", 0, 1), op("delete", "k", None, 2, 3, result=True)]
    result = check(history, [final("primary", {}), final("secondary-1", {"k": "a"}, "other")])
    assert result.failures_of(NO_RESURRECTION), result.failures
    assert result.failures_of(CONVERGE), result.failures


def test_phantom_value_is_caught() -> None:
    history = [op("set", "k", "a", 0, 1), op("set", "k", "b", 0, 1, FAIL)]
    result = check(history, both({"k": "b"}))
    assert any("phantom" in f for f in result.failures), result.failures


def test_divergent_stores_are_caught() -> None:
    result = check([], [final("primary", {"x": 1}, "aaa"), final("secondary-1", {"x": 2}, "bbb")])
    assert result.failures_of(CONVERGE)
    assert any("'x' differs" in f for f in result.failures)


def test_counter_short_or_over_is_caught() -> None:
    history = [op("incr", "c", 1, i, i + 0.5, result=i + 1) for i in range(5)]
    history.append(op("incr", "c", 1, 9, 10, UNKNOWN))
    assert check(history, both({"c": 5})).valid
    assert check(history, both({"c": 6})).valid
    assert check(history, both({"c": 4})).failures_of(COUNTERS)  # an acknowledged incr lost
    assert check(history, both({"c": 7})).failures_of(COUNTERS)  # one applied twice


def test_counter_answering_the_same_value_twice_is_caught() -> None:
    history = [op("incr", "c", 1, 0, 1, result=1), op("incr", "c", 1, 0, 1, result=1)]
    result = check(history, both({"c": 2}))
    assert any("returned a value another one returned" in f for f in result.failures)


def test_two_add_winners_are_caught() -> None:
    history = [op("add", "a1", "x", 0, 1, result=True, client="primary/0"),
               op("add", "a1", "y", 0, 1, result=True, client="secondary-1/0")]
    assert check(history, both({"a1": "x"})).failures_of(ADD_ONE_WINNER)
    one = [history[0], op("add", "a1", "y", 0, 1, result=False)]
    assert check(one, both({"a1": "x"})).valid
    assert check(one, both({"a1": "y"})).failures_of(ADD_ONE_WINNER)


def test_two_lock_holders_at_once_are_caught() -> None:
    # a holds from its grant (before 1.0) until it sends its release at 2.5 (ttl 3 s)
    history = [op("lock", "L", None, 0, 1, result=1, end=2.5, end_status=OK),
               op("lock", "L", None, 1.5, 2.0, result=2, end=2.1, end_status=OK)]
    assert check(history, both({})).failures_of(LOCK_EXCLUSIVE)
    # the same grants in sequence are fine
    history[1] = op("lock", "L", None, 1.5, 2.6, result=2, end=2.7, end_status=OK)
    assert check(history, both({})).valid


def test_duplicate_or_backwards_fences_are_caught() -> None:
    dup = [op("lock", "L", None, 0, 1, result=7, end=1.1, end_status=OK),
           op("lock", "L", None, 2, 3, result=7, end=3.1, end_status=OK)]
    assert check(dup, both({})).failures_of(LOCK_EXCLUSIVE)
    backwards = [op("lock", "L", None, 0, 1, result=9, end=1.1, end_status=OK),
                 op("lock", "L", None, 2, 3, result=8, end=3.1, end_status=OK)]
    assert any("fence order" in f for f in check(backwards, both({})).failures)


def test_stale_reads_are_measured_not_failed() -> None:
    history = [op("set", "k", "a", 0, 1), op("set", "k", "b", 2, 3),
               op("get", "k", None, 4, 4.1, result="a", client="secondary-1/0")]
    result = check(history, both({"k": "b"}))
    assert result.valid
    stale = result.stale["secondary-1"]
    assert stale.stale == 1 and stale.windows == [pytest.approx(1.0)]


def test_a_read_overlapping_a_delete_is_not_stale() -> None:
    history = [op("set", "k", "a", 0, 1), op("delete", "k", None, 1.5, 3.0, result=True),
               op("get", "k", None, 2, 2.1, result=None, client="primary/0")]
    assert check(history, both({})).stale["primary"].stale == 0


def test_guarantees_not_promised_are_not_checked() -> None:
    history = [op("add", "a1", "x", 0, 1, result=True), op("add", "a1", "y", 0, 1, result=True)]
    result = Checker({CONVERGE}).check(history, both({"a1": "x"}))
    assert result.valid and result.checked == [CONVERGE]


# ---- a real cluster with a defect injected by a proxy (no hook in production code) ------

def _is_batch(head: bytes) -> bool:
    return re.match(rb"POST \S*/replication/batch ", head) is not None


class SkipDeletes:
    """Rewrites each push batch so that its deletes become touches of a key nobody uses:
    the secondary acknowledges every seq, as if applied, and keeps the deleted keys (the
    defect of a secondary that skips applying deletes)."""

    def __init__(self) -> None:
        self.skipped = 0

    def __call__(self, head: bytes, body: bytes) -> bytes:
        if not _is_batch(head):
            return body
        batch = decode_batch(body)
        records = [r._replace(op=TOUCH, key="defect-noop", tag=None, value=None)
                   if r.op == DELETE else r for r in batch.records]
        changed = sum(1 for r in batch.records if r.op == DELETE)
        if not changed:
            return body
        self.skipped += changed
        return encode_batch(batch.source, records)


def test_checker_catches_a_secondary_that_skips_deletes(tmp_path: Path) -> None:
    defect = SkipDeletes()

    def inject(harness: ClusterHarness) -> None:
        harness.links["primary->secondary-1"].proxy.filter(rewrite=defect)

    # deletes as often as sets: many keys end deleted, most of them by another host
    outcome = run(MODES["ps"], tmp_path / "nodes", [], seed=7, duration=3.0, setup=inject,
                  quiesce_timeout=3.0, out=str(tmp_path / "report"),
                  weights={"set": 10, "delete": 10, "get": 5})
    assert defect.skipped, "the proxy never saw a delete in a push batch"
    result = outcome.result
    assert not outcome.converged
    assert not result.valid, outcome.report
    assert result.failures_of(CONVERGE), outcome.report
    resurrected = result.failures_of(NO_RESURRECTION)
    assert resurrected and all("on secondary-1" in f for f in resurrected), outcome.report
    assert not [f for f in result.failures if "on secondary-2" in f or "on primary" in f]
    assert "INVALID" in Path(outcome.paths[0]).read_text()


class AckWithoutForwarding:
    """Answers every tenth non-empty push batch with 200 {"acked": last seq} itself."""

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self.batches = 0
        self.faked: list[int] = []

    def __call__(self, head: bytes, body: bytes) -> bytes | None:
        if not _is_batch(head):
            return None
        records = decode_batch(body).records
        if not records:
            return None
        self.batches += 1
        if self.batches % self.every:
            return None
        last = max(r.seq for r in records)
        self.faked.append(last)
        doc = json.dumps({"acked": last, "applied": len(records), "skipped": 0}).encode()
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(doc), doc))


def test_a_batch_acked_but_never_delivered_is_repaired_by_a_snapshot(tmp_path: Path) -> None:
    """The other injected defect (a link that loses every tenth batch but acknowledges it):
    the secondary notices the gap in the sequence (409 need_snapshot), the primary sends a
    snapshot, and the checker finds the cluster whole; without the gap check the same run
    would leave secondary-1 behind. The checker's verdict is the evidence either way."""
    defect = AckWithoutForwarding()

    def inject(harness: ClusterHarness) -> None:
        harness.links["primary->secondary-1"].proxy.filter(intercept=defect)

    outcome = run(MODES["ps"], tmp_path / "nodes", [], seed=7, duration=3.0, setup=inject)
    assert defect.faked, "the proxy never saw ten push batches"
    assert outcome.converged and outcome.result.valid, outcome.report


# ---- active-active ------------------------------------------------------------------------

def aa_check(history: list[Op], finals: list[Final]) -> CheckResult:
    return Checker(MODES["aa"].guarantees, slack=AA_SLACK).check(history, finals)


def nodes(values: dict[str, object]) -> list[Final]:
    return [final("n1", values), final("n2", values), final("n3", values)]


def test_aa_any_concurrent_acknowledged_set_may_win() -> None:
    history = [op("set", "k", "a", 0.0, 1.0, client="n1/0"),
               op("set", "k", "b", 0.5, 1.5, client="n2/0"),
               # invoked within the slack after "a" completed: the same millisecond
               op("set", "j", "x", 0.0, 1.0, client="n1/0"),
               op("set", "j", "y", 1.0 + AA_SLACK / 2, 1.2, client="n2/0"),
               # two hosts answer the same counter value: local answers, the sum is 2
               op("incr", "c", 1, 0, 1, result=1, client="n1/0"),
               op("incr", "c", 1, 0, 1, result=1, client="n2/0")]
    for k, j in (("a", "x"), ("b", "x"), ("a", "y")):
        result = aa_check(history, nodes({"k": k, "j": j, "c": 2}))
        assert result.valid, result.failures
    # primary/secondary holds the same history to one authority's answers
    assert not check(history, nodes({"k": "b", "j": "y", "c": 2})).valid


def test_aa_a_set_definitely_followed_by_another_cannot_win() -> None:
    history = [op("set", "k", "a", 0.0, 1.0, client="n1/0"),
               op("set", "k", "b", 1.0 + 10 * AA_SLACK, 1.5, client="n2/0"),
               op("set", "j", "x", 0.0, 1.0, client="n1/0"),
               op("delete", "j", None, 1.2, 1.3, result=True, client="n3/0")]
    result = aa_check(history, nodes({"k": "a", "j": "x"}))
    assert result.failures_of("acked_writes") and result.failures_of("no_resurrection")
    # a delete that found nothing on its host is still a later write: "j" must be gone
    history[-1] = op("delete", "j", None, 1.2, 1.3, result=False, client="n3/0")
    assert aa_check(history, nodes({"k": "b", "j": "x"})).failures_of("no_resurrection")


def test_aa_two_add_winners_and_overlapping_lock_holders_are_caught() -> None:
    history = [op("add", "a1", "x", 0, 1, result=True, client="n1/0"),
               op("add", "a1", "y", 0, 1, result=True, client="n2/0"),
               op("lock", "L", None, 0, 0.1, result=5, end=1.0, end_status=OK, client="n1/0"),
               op("lock", "L", None, 0.2, 0.3, result=6, end=0.4, end_status=OK,
                  client="n3/0"),
               op("incr", "c", 1, 0, 1, result=1, client="n1/0"),
               op("incr", "c", 1, 0, 1, result=2, client="n2/0")]
    result = aa_check(history, nodes({"a1": "x", "c": 1}))
    assert result.failures_of("add_one_winner")
    assert result.failures_of("lock_exclusive")
    assert result.failures_of("counters")  # one acknowledged increment lost


def test_aa_wiped_host_loses_only_what_it_had_not_streamed() -> None:
    history = [op("set", "k", "old", 0.0, 0.1, client="n1/0"),
               op("set", "k", "just-before", 4.6, 4.7, client="n1/1"),
               op("set", "j", "long-before", 1.0, 1.1, client="n1/0")]
    # n1 wiped at 5.0: its set at 4.7 may be gone, the one at 1.1 must have streamed
    relaxed = wiped_unknown(history, [("n1", 5.0)])
    assert [o.status for o in relaxed] == [OK, UNKNOWN, OK]
    assert aa_check(relaxed, nodes({"k": "old", "j": "long-before"})).valid
    assert aa_check(relaxed, nodes({"k": "old"})).failures_of("acked_writes")
    # a fault that ended just before the wipe stretches the window back to its start
    relaxed = wiped_unknown(history, [("n1", 5.0)], [(0.5, 4.5)])
    assert [o.status for o in relaxed] == [OK, UNKNOWN, UNKNOWN]


def test_checker_catches_local_adds_in_a_real_active_active_cluster(tmp_path: Path) -> None:
    """``HYPERCACHEIO_HA_LOCAL_ADD=true``: each node answers ``add`` from its own store, so
    clients on different hosts racing on one key both win; the checker must say so."""
    outcome = run(MODES["aa"], tmp_path / "nodes", [], seed=3, duration=3.0,
                  env={"HYPERCACHEIO_HA_LOCAL_ADD": "true"},
                  weights={"add": 20, "set": 1, "get": 1}, quiesce_timeout=15.0)
    assert outcome.converged, outcome.report
    assert outcome.result.failures_of("add_one_winner"), outcome.report
    assert not outcome.result.failures_of("converge"), outcome.report


# ---- clock skew (the nemesis' ``skew``): two rules relaxed by exactly the bound --------------

def test_aa_under_skew_a_later_write_may_lose_by_up_to_the_skew() -> None:
    """n2's clock 1 s behind n1's: its set invoked 0.5 s after n1's completed may carry the
    lower version and lose; one invoked 1.5 s after must still win."""
    history = [op("set", "k", "a", 0.0, 1.0, client="n1/0"),
               op("set", "k", "b", 1.5, 1.6, client="n2/0"),
               op("set", "j", "x", 0.0, 1.0, client="n1/0"),
               op("delete", "j", None, 1.5, 1.6, result=True, client="n2/0")]
    skewed = Checker.for_run(ALL_GUARANTEES, local_writes=True, skew=1.0)
    assert skewed.check(history, nodes({"k": "a", "j": "x"})).valid
    # without skew the same finals are a lost write and a resurrection
    plain = Checker.for_run(ALL_GUARANTEES, local_writes=True).check(
        history, nodes({"k": "a", "j": "x"}))
    assert plain.failures_of(ACKED_WRITES) and plain.failures_of(NO_RESURRECTION)
    # beyond the bound the rule holds again
    later = [op("set", "k", "a", 0.0, 1.0, client="n1/0"),
             op("set", "k", "b", 2.5, 2.6, client="n2/0")]
    assert skewed.check(later, nodes({"k": "a"})).failures_of(ACKED_WRITES)
    # one authority stamps every version: primary/secondary is not relaxed
    one = Checker.for_run(ALL_GUARANTEES, local_writes=False, skew=1.0)
    assert one.check(history, nodes({"k": "a", "j": "x"})).failures_of(ACKED_WRITES)


def test_under_skew_a_lease_may_end_early_by_the_skew_only() -> None:
    """A holder that never released (its release lost) holds until ttl - skew; a grant
    after that is fine under skew, one before it is two holders."""
    # the first holder's release never went out (its client stalled holding it)
    history = [op("lock", "L", None, 0.0, 0.1, result=1, end=None, end_status=UNKNOWN),
               op("lock", "L", None, LOCK_TTL - 1.0, LOCK_TTL - 0.9, result=2, end=3.0,
                  end_status=OK)]
    assert Checker.for_run(ALL_GUARANTEES, True).check(history, nodes({})).failures_of(
        LOCK_EXCLUSIVE)
    assert Checker.for_run(ALL_GUARANTEES, True, skew=1.5).check(history, nodes({})).valid
    early = [history[0], op("lock", "L", None, 1.0, 1.1, result=2, end=1.2, end_status=OK)]
    assert Checker.for_run(ALL_GUARANTEES, True, skew=1.5).check(
        early, nodes({})).failures_of(LOCK_EXCLUSIVE)
    # what does not depend on clocks is not relaxed: two add winners, a short counter
    wrong = [op("add", "a1", "x", 0, 1, result=True, client="n1/0"),
             op("add", "a1", "y", 0, 1, result=True, client="n2/0"),
             op("incr", "c", 1, 0, 1, result=1, client="n1/0")]
    result = Checker.for_run(ALL_GUARANTEES, True, skew=1.5).check(
        wrong, nodes({"a1": "x", "c": 0}))
    assert result.failures_of(ADD_ONE_WINNER) and result.failures_of(COUNTERS)


def test_a_skew_not_well_below_the_lock_ttl_is_refused() -> None:
    with pytest.raises(ValueError, match="lock ttl"):
        Checker(ALL_GUARANTEES, skew=LOCK_TTL)
