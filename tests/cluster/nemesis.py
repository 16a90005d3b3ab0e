"""The nemesis: faults applied to a running ``ClusterHarness``, each recorded with its times.

Each fault kind is a pair (do, undo) on a target (a host name, or a group for a partition):

- ``kill``: kill -9 the node; undo restarts it (same port, directory, environment);
- ``pause``: SIGSTOP; undo SIGCONT;
- ``partition``: every link between the target group and the rest is blackholed both ways;
  ``isolate`` is a partition of one host;
- ``slow``: every link of the target delays each chunk by ``SLOW_SECONDS``;
- ``drop_answers``: the target's outgoing links deliver requests but lose the answers
  (unknown outcomes for the clients: the write may have happened);
- ``full_disk``: the target's directory (a tmpfs, see ``harness.mount_tmpfs``) is filled to
  ENOSPC by a filler file of its own (``fill_to_enospc``; a tmpfs that is already full is
  taken as the fault in effect); undo removes that file;
- ``wipe``: kill -9, remove its whole directory, start it empty (it must rejoin: a snapshot
  then the oplog); there is nothing to undo;
- ``skew``: a graceful stop, then a start with the test-only clock offset
  ``HYPERCACHEIO_TEST_CLOCK_OFFSET`` (the step's ``offset`` seconds, drawn from the seed in
  +/-``SKEW_RANGE``): the node's wall clock, so its versions, expiry and lock leases, run that
  far off, as on a host whose clock is wrong; undo restarts it with no offset. The checker
  relaxes the real-time order of versions by the largest offset (``max_skew``).

A ``Step`` schedules one fault at ``at`` seconds from the start for ``duration`` seconds.
``random_schedule`` draws steps from a seeded ``random.Random``: the same seed gives the
same faults at the same times.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .harness import ClusterHarness, HostNode

SLOW_SECONDS = 0.15
# a skew's size in seconds (either sign): well below the workload's lock ttl (LOCK_TTL, 3 s;
# checker.py holds lock leases to ttl - skew) and far below any ttl the workload writes
SKEW_RANGE = (0.5, 1.5)
CLOCK_OFFSET_ENV = "HYPERCACHEIO_TEST_CLOCK_OFFSET"
FILLER = "nemesis-filler"
FILL_BLOCK = 256 << 10
Undo = Callable[[], None]
# relative weights of the fault kinds in ``random_schedule`` (2 when not listed): a skew
# costs two restarts, so it is drawn at half the others' rate
FAULT_WEIGHTS = {"skew": 1}


@dataclass
class Event:
    """One fault as it happened (seconds since the run's start)."""

    kind: str
    target: str
    start: float
    end: float | None = None
    offset: float = 0.0  # skew: the clock offset the node ran with (seconds)


@dataclass
class Step:
    at: float
    kind: str
    target: str | tuple[str, ...]
    duration: float
    offset: float = 0.0  # skew only: the node's clock offset (seconds)


def max_skew(steps: Sequence[Step]) -> float:
    """The largest clock offset a schedule gives a node (0 without ``skew`` steps)."""
    return max((abs(s.offset) for s in steps if s.kind == "skew"), default=0.0)


def fill_to_enospc(path: str) -> None:
    """Write zeros to a new file at ``path`` until its file system is full. ENOSPC at any
    point, the first write or the creation included, means full: the fault is in effect
    (a file system that was already full is full). Unbuffered writes, so no buffered rest
    is left to fail at close; on any other error the partial file is removed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return  # not even an inode left: full already, nothing written to undo
        raise
    block = b"\0" * FILL_BLOCK
    try:
        try:
            while True:  # a write short of the block is followed by one that fails
                os.write(fd, block)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    os.close(fd)


class Nemesis:
    def __init__(self, harness: ClusterHarness, t0: float) -> None:
        self.harness = harness
        self.t0 = t0
        self.events: list[Event] = []
        self.errors: list[str] = []
        self._fillers = 0  # full_disk: each fault its own filler, removed by its own undo

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ---- faults: each returns its undo ----------------------------------------------------

    def kill(self, name: str) -> Undo:
        host = self.harness.host(name)
        host.kill()
        return host.start

    def pause(self, name: str) -> Undo:
        host = self.harness.host(name)
        host.pause()
        return host.resume

    def partition(self, group: Sequence[str]) -> Undo:
        links = self.harness.links_of(group)
        for link in links:
            link.proxy.blackhole()

        def undo() -> None:
            for link in links:
                link.proxy.heal()
        return undo

    def isolate(self, name: str) -> Undo:
        return self.partition([name])

    def slow(self, name: str, delay: float = SLOW_SECONDS) -> Undo:
        links = self.harness.links_of([name])
        for link in links:
            link.proxy.slow(delay)

        def undo() -> None:
            for link in links:
                link.proxy.heal()
        return undo

    def drop_answers(self, name: str) -> Undo:
        links = [link for link in self.harness.links.values() if link.src == name]
        for link in links:
            link.proxy.set(s2c="drop")

        def undo() -> None:
            for link in links:
                link.proxy.heal()
        return undo

    def full_disk(self, name: str) -> Undo:
        host = self.harness.host(name)
        if not host.tmpfs:
            raise RuntimeError(f"{name}'s directory is not a tmpfs: build the cluster with "
                               f"tmpfs=[{name!r}] to fill its disk")
        self._fillers += 1
        path = os.path.join(host.directory, f"{FILLER}-{self._fillers}")
        fill_to_enospc(path)

        def undo() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return undo

    def wipe(self, name: str) -> Undo:
        host = self.harness.host(name)
        host.wipe()
        host.start()
        return lambda: None

    def skew(self, name: str, offset: float) -> Undo:
        host = self.harness.host(name)
        self._restart(host, offset)
        return lambda: self._restart(host, 0.0)

    @staticmethod
    def _restart(host: HostNode, offset: float) -> None:
        """Graceful stop, then start with the clock ``offset`` (0: the environment's own)."""
        host.resume()
        if host.running:
            host.node.stop(timeout=20)
        if offset:
            host.node.env[CLOCK_OFFSET_ENV] = repr(offset)
        else:
            host.node.env.pop(CLOCK_OFFSET_ENV, None)
        host.start()

    def apply(self, kind: str, target: str | tuple[str, ...],
              offset: float = 0.0) -> tuple[Event, Undo]:
        label = target if isinstance(target, str) else "+".join(target)
        event = Event(kind, label, self.now(), offset=offset if kind == "skew" else 0.0)
        if kind == "partition":
            group = (target,) if isinstance(target, str) else target
            undo = self.partition(group)
        elif kind == "skew":
            assert isinstance(target, str)
            undo = self.skew(target, offset)
        else:
            assert isinstance(target, str)
            fn: Callable[[str], Undo] = getattr(self, kind)
            undo = fn(target)
        self.events.append(event)
        return event, undo

    # ---- schedules ----------------------------------------------------------------------

    def run(self, steps: Sequence[Step], stop: threading.Event) -> None:
        """Apply ``steps`` in time order (in this thread), undoing each after its duration;
        everything still applied is undone when ``stop`` is set or the steps run out."""
        pending: list[tuple[float, Event, Undo]] = []
        ordered = sorted(steps, key=lambda s: s.at)
        i = 0
        while not stop.is_set() and (i < len(ordered) or pending):
            now = self.now()
            for item in [p for p in pending if p[0] <= now]:
                pending.remove(item)
                self._undo(item[1], item[2])
            if i < len(ordered) and ordered[i].at <= now:
                step = ordered[i]
                i += 1
                try:
                    event, undo = self.apply(step.kind, step.target, step.offset)
                    pending.append((now + step.duration, event, undo))
                except Exception as exc:  # a fault that could not be applied is reported
                    self.errors.append(f"{step.kind} {step.target}: {exc}")
            stop.wait(0.02)
        for _, event, undo in pending:
            self._undo(event, undo)

    def _undo(self, event: Event, undo: Undo) -> None:
        try:
            undo()
        except Exception as exc:
            self.errors.append(f"undo {event.kind} {event.target}: {exc}")
        event.end = self.now()


def random_schedule(rng: random.Random, hosts: Sequence[str], authority: str | None,
                    faults: frozenset[str], start: float, end: float,
                    tmpfs: Sequence[str] = (), gap: tuple[float, float] = (1.0, 3.0),
                    length: tuple[float, float] = (1.0, 4.0)) -> list[Step]:
    """Faults one after another (never two at once) between ``start`` and ``end``; each kind
    drawn with its ``FAULT_WEIGHTS`` weight (2 when not listed)."""
    others = [h for h in hosts if h != authority]
    kinds = sorted(faults - ({"full_disk"} if not tmpfs else set()))
    weights = [FAULT_WEIGHTS.get(k, 2) for k in kinds]
    steps: list[Step] = []
    t = start + rng.uniform(*gap)
    while t < end:
        kind = rng.choices(kinds, weights)[0]
        offset = 0.0
        duration = rng.uniform(*length)
        target: str | tuple[str, ...]
        if kind == "kill_primary" and authority:
            kind, target = "kill", authority
        elif kind == "pause_primary" and authority:
            kind, target = "pause", authority
        elif kind == "full_disk":
            target = rng.choice(list(tmpfs))
        elif kind == "partition":
            size = rng.randint(1, max(1, len(hosts) // 2))
            target = tuple(sorted(rng.sample(list(hosts), size)))
        elif kind in ("kill_primary", "pause_primary"):
            continue
        elif kind == "skew":
            # any host, the authority too (it stamps every version in primary/secondary)
            target = rng.choice(list(hosts))
            offset = round(rng.choice((-1, 1)) * rng.uniform(*SKEW_RANGE), 3)
        else:
            target = rng.choice(others or list(hosts))
        steps.append(Step(t, kind, target, 0.0 if kind == "wipe" else duration, offset))
        t += duration + rng.uniform(*gap)
    return steps
