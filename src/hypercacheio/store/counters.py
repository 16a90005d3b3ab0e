"""Active-active counters: increments that converge to the exact sum on every node.

Only a store marked ``multi_writer`` (``Store.mark_clustered(True, multi_writer=True)``)
uses this; a standalone or primary/secondary store increments with one UPDATE.

The rule, the same on every node:

- A counter's **base** is the version ``(hlc, node)`` of the last set, delete, touch or
  clear of its key (an increment does not change the row's version). A key never written
  (or gone) has the store's last clear as its base, with value 0; a tombstone or an expired
  row is a base of value 0.
- Each origin's increments on a base add up to its **contribution** (``counters`` table:
  key, origin, base, total, origin_seq). Every ``incr`` record carries the origin's whole
  contribution (state, not delta), so a duplicate, a replay or a reorder is harmless: of an
  origin's records on a base the one with the highest ``origin_seq`` counts.
- The counter's value is the base's value plus the sum of the contributions on that base.
- **A set, delete or touch with version V starts a new base**: contributions on an older
  base are discarded (an increment concurrent with a set is lost to the set, on every
  node, whichever arrives first). A contribution on a base newer than the row here waits in
  ``counters`` until the write that starts that base arrives.
- 64 bits: a node refuses a local ``incr`` that would leave the signed 64-bit range; the
  sum of concurrent contributions of several nodes can still leave it, and is then held at
  the nearest bound (logged). Every node holds the same value unless contributions that
  cross a bound and come back arrive in different orders; far from the bounds the sum is
  exact. (Refusing the record instead would stop the stream for good.)
- Expiry: a counter made from a base of value 0 expires at the latest expiry its
  contributions asked for (never, if one asked for none); otherwise the base's expiry.
  Expiry is absolute: hosts' clocks are assumed in sync well within a counter's lifetime.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING

from ..codec import INT64_MAX, INT64_MIN, TAG_INT, TAG_TOMBSTONE, Payload, payload_size
from ..replication.records import CounterRow

if TYPE_CHECKING:
    from .core import Store
    from .writes import Txn

log = logging.getLogger("hypercacheio.store")

SQL_ANY = "SELECT 1 FROM counters LIMIT 1"
SQL_ROW = "SELECT tag, value, expire_at, hlc, node FROM entries WHERE key = ?"
SQL_GET = ("SELECT base_hlc, base_node, total, origin_seq FROM counters "
           "WHERE key = ? AND origin = ?")
SQL_PUT = ("INSERT OR REPLACE INTO counters(key, origin, base_hlc, base_node, total, "
           "origin_seq, expire_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
# summed in Python (``_sum``): exact, where SQLite's sum() raises past 64 bits
SQL_ON_BASE = ("SELECT origin, total, expire_at FROM counters "
               "WHERE key = ? AND base_hlc = ? AND base_node = ?")
SQL_ENTRY_PUT = ("INSERT OR REPLACE INTO entries(key, tag, value, expire_at, size, hlc, node) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)")
SQL_ENTRY_ADD = "UPDATE entries SET value = ?, expire_at = ? WHERE key = ?"
SQL_KEYS_ON_BASE = "SELECT DISTINCT key FROM counters WHERE base_hlc = ? AND base_node = ?"
SQL_CLEAR_OLDER = "DELETE FROM counters WHERE (base_hlc, base_node) < (?, ?)"
SQL_IN_KEYS = ("SELECT key, origin, base_hlc, base_node, total, origin_seq, expire_at "
               "FROM counters WHERE key > ? AND key <= ? ORDER BY key, origin")
SQL_FROM_KEY = ("SELECT key, origin, base_hlc, base_node, total, origin_seq, expire_at "
                "FROM counters WHERE key > ? ORDER BY key, origin")


def later(a: float | None, b: float | None) -> float | None:
    """The later of two expiries (None: never)."""
    if a is None or b is None:
        return None
    return a if a >= b else b


def _bounded(key: str, value: int) -> int:
    """``value`` held within the signed 64-bit range (see the module's rule)."""
    if INT64_MIN <= value <= INT64_MAX:
        return value
    bound = INT64_MAX if value > 0 else INT64_MIN
    log.warning("counter %r: the sum of the nodes' increments leaves the 64-bit range; "
                "held at %d", key, bound)
    return bound


def _sum(conn: sqlite3.Connection, key: str, base: tuple[int, str],
         without: str | None = None) -> tuple[int, int, float | None]:
    """The contributions on ``base`` (but ``without``'s): (their exact sum, how many, the
    latest expiry they asked for: None if one asked for none, or if there are none)."""
    total = count = 0
    latest: float | None = None
    never = False
    for origin, contribution, expire_at in conn.execute(SQL_ON_BASE, (key, *base)):
        if origin == without:
            continue
        total += int(contribution)
        count += 1
        if expire_at is None:
            never = True
        elif latest is None or expire_at > latest:
            latest = expire_at
    return total, count, None if never else latest


def _any(txn: Txn) -> bool:
    """Whether the store holds any contribution: read once a transaction (most stores of
    a cluster count nothing, and a set of an integer need not look for its counter)."""
    if txn.contributions is None:
        txn.contributions = txn.conn.execute(SQL_ANY).fetchone() is not None
    return txn.contributions


def _live(row: tuple[int, object, float | None, int, str] | None, now: float) -> bool:
    return row is not None and row[0] != TAG_TOMBSTONE and (row[2] is None or row[2] > now)


def _materialize(txn: Txn, key: str, base: tuple[int, str]) -> int:
    """Write the counter of a base of value 0: the sum of its contributions."""
    total, _, expire = _sum(txn.conn, key, base)
    value = _bounded(key, total)
    txn.conn.execute(SQL_ENTRY_PUT, (key, TAG_INT, value, expire, len(key) + payload_size(value),
                                     base[0], base[1]))
    txn.inserted += 1
    return value


def local_incr(store: Store, txn: Txn, key: str, delta: int, expire_if_new: float | None,
               create: bool) -> tuple[int, float | None]:
    """``incr`` of a multi-writer store (see the module's rule): the row and this node's
    contribution, and the oplog record carrying the contribution."""
    from . import replica

    conn = txn.conn
    row = conn.execute(SQL_ROW, (key,)).fetchone()
    if _live(row, txn.now):
        if row[0] != TAG_INT:
            raise TypeError(f"cannot increment {key!r}: its value is not an integer")
        value = int(row[1]) + delta
        if not INT64_MIN <= value <= INT64_MAX:
            raise OverflowError(
                f"incrementing {key!r} ({row[1]}) by {delta} leaves the 64-bit range")
        base: tuple[int, str] = (int(row[3]), str(row[4]))
        expire = row[2]
    else:
        if not create:
            raise KeyError(key)
        base = (int(row[3]), str(row[4])) if row is not None else replica.cleared(conn)
        expire = expire_if_new
    node = store.node_id
    previous = conn.execute(SQL_GET, (key, node)).fetchone()
    total = delta + (int(previous[2]) if previous is not None
                     and (previous[0], previous[1]) == base else 0)
    if not INT64_MIN <= total <= INT64_MAX:
        raise OverflowError(f"the contribution to {key!r} leaves the 64-bit range")
    if _live(row, txn.now):
        conn.execute(SQL_ENTRY_ADD, (value, expire, key))
        counter_expire = expire
    else:  # a base of value 0: every node's contribution on it, this one's new total
        others, count, latest = _sum(conn, key, base, without=node)
        value = others + total
        if not INT64_MIN <= value <= INT64_MAX:
            raise OverflowError(f"incrementing {key!r} by {delta} leaves the 64-bit range")
        counter_expire = later(expire, latest) if count else expire
        conn.execute(SQL_ENTRY_PUT, (key, TAG_INT, value, counter_expire,
                                     len(key) + payload_size(value), base[0], base[1]))
        txn.inserted += 1
    seq = store.record(txn, "incr", key, TAG_INT, value, expire, delta, base, total)
    conn.execute(SQL_PUT, (key, node, base[0], base[1], total, seq, expire))
    txn.contributions = True
    return value, counter_expire


def apply_contribution(txn: Txn, c: CounterRow, floor: tuple[int, str]) -> bool:
    """Apply an origin's contribution; True if it changed anything (see the rule)."""
    conn = txn.conn
    base = (c.base_hlc, c.base_node)
    if base < floor:
        return False
    row = conn.execute(SQL_ROW, (c.key,)).fetchone()
    current = (int(row[3]), str(row[4])) if row is not None else floor
    if base < current:
        return False
    previous = conn.execute(SQL_GET, (c.key, c.origin)).fetchone()
    old = 0
    if previous is not None:
        before = (int(previous[0]), str(previous[1]))
        if before > base or (before == base and int(previous[3]) >= c.origin_seq):
            return False
        if before == base:
            old = int(previous[2])
    txn.contributions = True
    conn.execute(SQL_PUT, (c.key, c.origin, c.base_hlc, c.base_node, c.total, c.origin_seq,
                           c.expire_at))
    if base > current:
        return True  # waits for the write that starts its base
    if _live(row, txn.now):
        if row[0] == TAG_INT:
            conn.execute(SQL_ENTRY_ADD, (_bounded(c.key, int(row[1]) + c.total - old),
                                         later(row[2], c.expire_at), c.key))
    else:
        _materialize(txn, c.key, base)
    txn.changed.append(c.key)
    return True


def after_write(txn: Txn, key: str, tag: int, value: Payload | None, expire_at: float | None,
                version: tuple[int, str]) -> None:
    """A set or delete applied from a peer (of ``value``, its row's now) starts base
    ``version``: count the contributions that arrived before it."""
    if not _any(txn):
        return
    total, count, latest = _sum(txn.conn, key, version)
    if not count:
        return
    if tag == TAG_INT:
        txn.conn.execute(SQL_ENTRY_ADD, (_bounded(key, int(value or 0) + total),
                                         later(expire_at, latest), key))
    elif tag == TAG_TOMBSTONE:
        _materialize(txn, key, version)


def after_clear(txn: Txn, version: tuple[int, str]) -> None:
    """A clear applied from a peer is the base of every key it left empty: count the
    contributions that arrived before it."""
    conn = txn.conn
    keys = [k for (k,) in conn.execute(SQL_KEYS_ON_BASE, version)]
    for key in keys:
        if conn.execute(SQL_ROW, (key,)).fetchone() is None:
            _materialize(txn, key, version)
            txn.changed.append(key)


def contributions(conn: sqlite3.Connection, after: str, upto: str | None) -> list[CounterRow]:
    """The contributions of the keys in (after, upto] (or after ``after``)."""
    rows = (conn.execute(SQL_FROM_KEY, (after,)) if upto is None
            else conn.execute(SQL_IN_KEYS, (after, upto)))
    return [CounterRow._make(r) for r in rows]
