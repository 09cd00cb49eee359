"""Change maps: what changed in each sealed version against the one before, per reader dtype.

After a version seals, the socket loop hands the pair (the new version, the previous sealed one of
the same epoch) to one background thread (niced below the loop), which casts both to each
configured reader dtype and compares them bitwise, one pass per region of same-dtype tensors
(:func:`~stager.protocol.changes.diff_spans`: a thousand small tensors cost what one of their
size does); the trainer never waits for it and the loop never computes. While the thread reads
them, both versions are pinned (a negative id in their lease set). The pins never keep memory
from a step: with ``--keep`` >= 2 a map has until its base is dropped by retention (both versions
are kept anyway until the next seal), and one not made by then is dropped and the segment pooled
at once, as without maps; with ``--keep 1`` the pin holds until a step needs the memory
(:meth:`ChangeMaps.yield_pins`). A dropped map is counted (``skipped``) and its readers read in
full; a map already made is recorded, never dropped. The loop collects maps as soon as they are
made (readers wait for them, and their pins end then).

Map work yields to staging: it never runs while a step is in flight (:mod:`.change_gate`).

Maps outlive the versions' data (they are small: int32 indices of what changed, in a few arrays
per map: :mod:`.change_table`), bounded by a count and by bytes of their own, so a reader at step N
is brought to M by the union of the maps N->...->M with values from M, even after N's segment is
gone. A :class:`Changes` request answers from them (:mod:`.change_replies`; or ``unknown_base``: the
chain is broken, the reader reads in full). Each map also records both versions' crc32 in its dtype
(from the cast bytes it compares; the base's is the previous map's), so a reader whose copy of N no
ledger vouches for proves it by checksums. In a job spanning nodes each daemon maps its own blocks,
and answers for the boxes a reader reads from it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import torch

from stager.protocol.changes import UNCHANGED, Change, compare_dtype, diff_spans, whole
from stager.protocol.dtypes import dtype_name
from stager.protocol.reads import Changes, ChangesReply

from . import change_replies, change_runs
from .change_gate import Gate
from .change_table import Key, Keys, Record, Table
from .peers import PeerDirectory
from .state import DaemonState
from .versions import Version

log = logging.getLogger("stager.daemon")
MAX_QUEUED = 4  # maps waiting for the thread; older ones are dropped (their versions' pins with them)
NICE = 10  # the map thread's niceness above the daemon's (Linux threads have their own)
LATE = 2.0  # a map not begun when it would end this many step intervals after its seal (both are estimates)

# maps are keyed by fqn for a tensor the node holds whole in one block, else by (fqn, block index): a
# job spanning nodes, where each node maps its own blocks (compared with the same blocks of the
# previous version of the same layout) and a reader asks each node for the boxes it reads there


@dataclasses.dataclass(eq=False)
class _Job:
    key: Key
    base: Key
    dtypes: tuple[torch.dtype, ...]
    layouts: tuple  # (prev's, v's): what the worker groups into runs (change_runs.runs), off the loop
    segments: tuple  # (prev's, v's) mapped bytes: held here, they stay mapped while the worker reads them
    pins: list  # (version, pin id)
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    sealed_at: float = 0.0  # time.monotonic() of v's seal
    waited: float = 0.0  # seconds its map work waited for steps in flight (not counted as what a map takes)
    late: bool = False  # not begun: it would not be made before its base goes (counted as skipped)
    # dtype wire name -> its map, with each tensor's (or block's) crc32 of the base and of the new version
    maps: dict[str, Table] = dataclasses.field(default_factory=dict)
    known: dict = dataclasses.field(default_factory=dict)  # the previous job's maps (its new is our base): sums reused
    stats: dict = dataclasses.field(default_factory=dict)  # dtype wire name -> status entry
    cpu_s: float = 0.0


class ChangeMaps:
    """Owns change maps: computes them off the loop after each seal, keeps them bounded, answers
    :class:`Changes`. ``dtypes``: the reader dtypes to compute in (empty: off)."""

    def __init__(
        self,
        state: DaemonState,
        directory: PeerDirectory,
        *,
        dtypes: tuple[torch.dtype, ...],
        keep: int,
        max_bytes: int,
    ):
        self.state, self.directory = state, directory
        self.dtypes = dtypes
        self.keep = keep
        self.max_bytes = max_bytes
        self.records: OrderedDict[Key, Record] = OrderedDict()
        self.nbytes = 0
        self.cpu_s = 0.0  # the worker's CPU time, all versions together
        self.skipped = 0  # versions whose map was dropped (memory needed, or superseded before it began)
        self._pin_ids = itertools.count(-1, -1)
        self._lock = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._running: _Job | None = None
        self._done: deque[_Job] = deque()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._newest: tuple[Key, dict] | None = None  # the worker's last job's maps, for its checksums (worker thread)
        self._keys: Keys | None = None  # the last map's keys: shared by the next maps of the same layout (worker)
        self._last_seal: float | None = None
        self._interval = math.inf  # seconds between seals (moving average): the time a map has
        self._took = 0.0  # seconds a map takes (moving average; a cancelled one's time is a floor)
        self.gate = Gate()  # closed while steps are in flight: Steps tells it (gate.hold)
        self.regions = 0  # compare passes made (a region of one dtype, in one reader dtype), all maps

    # ------------------------------------------------------------------ loop side

    def on_sealed(self, v: Version, unpinned: Callable[[Version], None]) -> None:
        """Queue the map of ``v`` against the previous sealed version (called on the loop, at the seal,
        before retention runs); ``unpinned``: as for :meth:`collect`."""
        if not self.dtypes or v.segment is None or v.layout is None:
            return
        steps = list(self.state.sealed)
        if steps[-1] != v.step or len(steps) < 2:
            return  # the first version, or sealed out of order: no predecessor to compare with
        prev = self.state.sealed[steps[-2]]
        if prev.epoch != v.epoch or prev.segment is None:
            return
        layouts, segments = (prev.layout, v.layout), (prev.segment.as_bytes(), v.segment.as_bytes())
        job = _Job((v.step, v.seq), (prev.step, prev.seq), self.dtypes, layouts, segments, [])
        job.sealed_at = time.monotonic()
        if self._last_seal is not None:
            gap = job.sealed_at - self._last_seal
            self._interval = gap if math.isinf(self._interval) else (self._interval + gap) / 2
        self._last_seal = job.sealed_at
        for w in (prev, v):
            pin = next(self._pin_ids)
            w.leases.add(pin)
            job.pins.append((w, pin))
        with self._lock:
            self._queue.append(job)
            stale = [self._queue.popleft() for _ in range(len(self._queue) - MAX_QUEUED)]  # a backlog: newest first
            self._lock.notify()
        for old in stale:
            old.cancel.set()
            self.skipped += 1
            self._unpin(old, unpinned)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="stager-changes", daemon=True)
            self._thread.start()

    def collect(self, unpinned: Callable[[Version], None]) -> bool:
        """Record finished maps and drop their pins (``unpinned`` per version no longer pinned);
        True when a pin was dropped (steps waiting for memory may go on)."""
        if not self._done:  # every tick, maps off by default: no lock, no list (a map done meanwhile: next tick)
            return False
        with self._lock:
            done, self._done = list(self._done), deque()
        for job in done:
            self._unpin(job, unpinned)
            if not job.cancel.is_set():
                self._record(job)
            self.skipped += job.late
        return bool(done)

    def yield_pins(self, unpinned: Callable[[Version], None], versions: set | None = None) -> bool:
        """A step needs memory: drop the pins of ``versions`` (None: all) now; the maps being computed
        from them are not recorded (those already made are: the loop had not collected them yet).
        True if any pin was dropped."""
        with self._lock:
            jobs = [*self._queue, *([self._running] if self._running else []), *self._done]
            jobs = [j for j in jobs if versions is None or any(v in versions for v, _ in j.pins)]
            done = [j for j in jobs if j in self._done]
            for job in jobs:
                if job in self._queue:
                    self._queue.remove(job)
                if job in self._done:
                    self._done.remove(job)
        dropped = False
        for job in done:
            jobs.remove(job)
            dropped |= self._unpin(job, unpinned)
            if not job.cancel.is_set():
                self._record(job)
            self.skipped += job.late
        for job in jobs:
            if not job.cancel.is_set():
                job.cancel.set()
                self.skipped += 1
            dropped |= self._unpin(job, unpinned)
        if jobs:
            self.gate.wake()  # a map waiting for a step in flight ends now (its pins are gone already)
        return dropped

    @staticmethod
    def _unpin(job: _Job, unpinned: Callable[[Version], None]) -> bool:
        pins, job.pins = job.pins, []
        for v, pin in pins:
            v.leases.discard(pin)
            unpinned(v)
        return bool(pins)

    def _record(self, job: _Job) -> None:
        nbytes = sum(m.nbytes for m in job.maps.values())
        self.records[job.key] = Record(job.base, job.maps, nbytes)
        self.nbytes += nbytes
        self.cpu_s += job.cpu_s
        while self.records and (len(self.records) > self.keep or self.nbytes > self.max_bytes):
            self.nbytes -= self.records.popitem(last=False)[1].nbytes
        v = self.state.sealed.get(job.key[0])
        if v is not None and v.seq == job.key[1]:
            v.changes = job.stats

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for job in self._queue:
                job.cancel.set()
            self._lock.notify()
        self.gate.wake()
        if self._thread is not None:
            self._thread.join(30.0)

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        try:  # below the loop and the trainer's ranks: a map waits for idle CPU, never they for it
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICE))
        except (AttributeError, OSError):  # not Linux (per-thread nice), or not allowed: as it is
            pass
        # one core: OpenMP's setting is per thread, so the loop's own torch work keeps its threads; a
        # map on the pool woke its threads, which then spin-wait, for ~5 ms of CPU per step here
        torch.set_num_threads(1)
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
            # a map is not begun while steps are in flight (the late check below then sees the wait)
            self.gate.wait(lambda: self._closed or not self._queue)
            with self._lock:
                if self._closed:
                    return
                if not self._queue or self.gate.closed():  # dropped meanwhile, or the next step began already
                    continue
                job = self._running = self._queue.popleft()
            began = time.monotonic()
            if self._took and began - job.sealed_at + self._took > LATE * self._interval:
                # steps come faster than maps are made: this one would be dropped unfinished when its
                # base goes (at the next seal), so it is not begun; the CPU goes to one that can finish
                job.late = True
                job.cancel.set()
                self._took /= 2  # and the estimate decays: steps may slow down, or maps get faster
            else:
                try:
                    if self._newest is not None and self._newest[0] == job.base:
                        job.known = self._newest[1]
                    self._compute(job)
                    if not job.cancel.is_set():
                        self._newest = (job.key, job.maps)
                except Exception:  # a bug costs one map (readers read in full), never the daemon
                    log.exception("change map of step %d failed", job.key[0])
                    job.cancel.set()
                took = time.monotonic() - began - job.waited  # its own time, not its pauses for steps in flight
                if job.cancel.is_set():  # dropped unfinished: it takes at least that long
                    self._took = max(self._took, took)
                else:
                    self._took = took if not self._took else (self._took + took) / 2
            with self._lock:
                self._running = None
                self._done.append(job)

    def _compute(self, job: _Job) -> None:
        start = time.thread_time()
        seen: dict = {}  # (run, compared dtype) -> its maps and sums: integer tensors have one for every reader dtype

        def pause() -> bool:  # between regions and chunks: wait while steps are in flight; True: dropped
            job.waited += self.gate.wait(lambda: job.cancel.is_set() or self._closed)
            if self._closed:  # the daemon closes: this map is not finished, and never recorded
                job.cancel.set()
            return job.cancel.is_set()

        runs, fresh = change_runs.runs(*job.layouts, *job.segments, pause=pause)
        if runs is None:
            return  # dropped while it waited
        for dtype in job.dtypes:
            name = dtype_name(dtype)
            known = job.known.get(name)
            keys, changes, sums, sizes = [], [], [], []  # per row of the map (a tensor, or a block of one)
            for key, numel, stored in fresh:
                keys.append(key)
                changes.append(whole(numel) if numel else Change(UNCHANGED, 0, 0))
                sums.append(None)
                sizes.append(compare_dtype(stored, dtype).itemsize)
            for i, run in enumerate(runs):
                cast = compare_dtype(run.dtype, dtype)
                if (i, cast) not in seen:
                    # both versions' checksums, from the cast chunks compared anyway (the base's: known)
                    crcs = [[known.sum(key, 1) if known is not None else None, 0] for key in run.fqns]
                    got = diff_spans(run.prev, run.new, run.spans, dtype, cancel=pause, sums=crcs)
                    if got is None:
                        return  # cancelled: a step took the memory, or its base was dropped meanwhile
                    self.regions += 1
                    seen[i, cast] = got, [tuple(c) for c in crcs]
                got, crcs = seen[i, cast]
                keys += run.fqns
                changes += got
                sums += crcs
                sizes += [cast.itemsize] * len(got)
            if pause():
                return
            if self._keys is None or self._keys.order != tuple(keys):
                self._keys = Keys(keys)  # a new layout (else the maps of one layout share their keys)
            table = Table(self._keys, changes, sums)  # the per-tensor objects above go with this call
            job.maps[name], job.stats[name] = table, table.summary(job.base[0], sizes)
        job.cpu_s = time.thread_time() - start
        for entry in job.stats.values():
            entry["cpu_s"] = round(job.cpu_s, 4)

    # ------------------------------------------------------------------ requests

    def on_changes(self, identity: bytes, msg: Changes) -> ChangesReply:
        return change_replies.answer(self, identity, msg)

    # ------------------------------------------------------------------ state

    @property
    def working(self) -> bool:
        """Maps made and not yet collected, or queued or being made while map work may run (no lock: a hint
        for the loop's poll; while the gate is closed for steps in flight none can be made)."""
        return bool(self._done or (not self.gate.closed() and (self._queue or self._running is not None)))

    @property
    def finished(self) -> bool:
        """Maps made that :meth:`collect` has not recorded yet (no lock: a hint for the loop)."""
        return bool(self._done)

    def pending(self) -> bool:
        with self._lock:
            return bool(self._queue or self._running or self._done)

    def status(self) -> dict:
        return {
            "dtypes": [dtype_name(d) for d in self.dtypes],
            "kept": len(self.records),
            "bytes": self.nbytes,
            "max_bytes": self.max_bytes,
            "keep": self.keep,
            "cpu_s": round(self.cpu_s, 4),
            "skipped": self.skipped,
            "pending": self.pending(),
            "regions": self.regions,
            "yields": self.gate.yields,
            "overridden": self.gate.overridden,
            "yielding": self.gate.waiting,
        }
