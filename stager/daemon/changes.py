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

Maps outlive the versions' data (they are small: int32 indices of what changed), bounded by a
count and by bytes of their own, so a reader at step N is brought to M by the union of the maps
N->...->M with values from M, even after N's segment is gone. A :class:`Changes` request answers
from them (or ``unknown_base``: the chain is broken, the reader reads in full).
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

from stager.protocol import ErrorCode, StagerError
from stager.protocol.changes import (
    INDICES,
    UNCHANGED,
    WHOLE,
    Change,
    compare_dtype,
    diff_spans,
    gather_many,
    union,
    whole,
)
from stager.protocol.dtypes import dtype_from_name, dtype_name
from stager.protocol.reads import Changes, ChangesReply
from stager.protocol.shm import block_view

from .peers import PeerDirectory
from .planning import NodeLayout
from .state import DaemonState
from .versions import Version

log = logging.getLogger("stager.daemon")
MAX_QUEUED = 4  # maps waiting for the thread; older ones are dropped (their versions' pins with them)
# a reply answers the tensors asked for up to this many bytes of indices and values (at least one
# tensor; the reader asks again for the rest): with a reader's 4 requests in flight, ~256 MiB queued
MAX_REPLY_BYTES = 64 << 20
MAX_TENSOR_BYTES = 256 << 20  # one tensor's changes over this: answered whole (a full read of it)
NICE = 10  # the map thread's niceness above the daemon's (Linux threads have their own)
LATE = 2.0  # a map not begun when it would end this many step intervals after its seal (both are estimates)
GAP = 1 << 16  # bytes between two tensors that one compared region may span (alignment padding is far less)

Key = tuple[int, int]  # (step, seq): a step number may be staged again by a restarted job, a seq never


@dataclasses.dataclass(eq=False)
class _Job:
    key: Key
    base: Key
    dtypes: tuple[torch.dtype, ...]
    layouts: tuple  # (prev's, v's): what the worker groups into runs (_runs), off the loop
    segments: tuple  # (prev's, v's) mapped bytes: held here, they stay mapped while the worker reads them
    pins: list  # (version, pin id)
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    sealed_at: float = 0.0  # time.monotonic() of v's seal
    late: bool = False  # not begun: it would not be made before its base goes (counted as skipped)
    maps: dict = dataclasses.field(default_factory=dict)  # dtype wire name -> {fqn: Change}
    stats: dict = dataclasses.field(default_factory=dict)  # dtype wire name -> status entry
    cpu_s: float = 0.0


@dataclasses.dataclass
class _Record:
    base: Key
    maps: dict[str, dict[str, Change]]
    nbytes: int


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
        self.records: OrderedDict[Key, _Record] = OrderedDict()
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
        self._last_seal: float | None = None
        self._interval = math.inf  # seconds between seals (moving average): the time a map has
        self._took = 0.0  # seconds a map takes (moving average; a cancelled one's time is a floor)

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
        return dropped

    @staticmethod
    def _unpin(job: _Job, unpinned: Callable[[Version], None]) -> bool:
        pins, job.pins = job.pins, []
        for v, pin in pins:
            v.leases.discard(pin)
            unpinned(v)
        return bool(pins)

    def _record(self, job: _Job) -> None:
        nbytes = sum(c.nbytes for m in job.maps.values() for c in m.values())
        self.records[job.key] = _Record(job.base, job.maps, nbytes)
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
                if self._closed:
                    return
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
                    self._compute(job)
                except Exception:  # a bug costs one map (readers read in full), never the daemon
                    log.exception("change map of step %d failed", job.key[0])
                    job.cancel.set()
                took = time.monotonic() - began
                if job.cancel.is_set():  # dropped unfinished: it takes at least that long
                    self._took = max(self._took, took)
                else:
                    self._took = took if not self._took else (self._took + took) / 2
            with self._lock:
                self._running = None
                self._done.append(job)

    @staticmethod
    def _compute(job: _Job) -> None:
        start = time.thread_time()
        seen: dict = {}  # (run, compared dtype) -> its maps: integer tensors have one for every reader dtype
        runs, fresh = _runs(*job.layouts, *job.segments)
        for dtype in job.dtypes:
            maps = {}
            sizes = {}
            for fqn, numel, stored in fresh:
                maps[fqn] = whole(numel) if numel else Change(UNCHANGED, 0, 0)
                sizes[fqn] = compare_dtype(stored, dtype).itemsize
            for i, run in enumerate(runs):
                cast = compare_dtype(run.dtype, dtype)
                if (i, cast) not in seen:
                    got = diff_spans(run.prev, run.new, run.spans, dtype, cancel=job.cancel.is_set)
                    if got is None:
                        return  # cancelled: a step took the memory
                    seen[i, cast] = got
                for fqn, change in zip(run.fqns, seen[i, cast]):
                    maps[fqn] = change
                    sizes[fqn] = cast.itemsize
            job.maps[dtype_name(dtype)] = maps
            job.stats[dtype_name(dtype)] = _summary(job.base[0], maps, sizes)
        job.cpu_s = time.thread_time() - start
        for entry in job.stats.values():
            entry["cpu_s"] = round(job.cpu_s, 4)

    # ------------------------------------------------------------------ requests

    def on_changes(self, identity: bytes, msg: Changes) -> ChangesReply:
        peer = self.directory.get(identity)
        if msg.lease not in peer.leases:
            raise StagerError(
                ErrorCode.UNKNOWN_LEASE, f"lease {msg.lease} is not held by this connection; acquire the version first"
            )
        v = self.state.leases[msg.lease][1]
        dtype = dtype_from_name(msg.dtype)
        by_name = {t.fqn: t for t in v.layout.tensors}
        fqns = msg.fqns or [t.fqn for t in v.layout.tensors if t.complete]
        missing = [f for f in fqns if f not in by_name]
        if missing:
            raise StagerError(ErrorCode.BAD_VALUE, f"{missing[0][:200]}: no such tensor in step {v.step}")
        chain = self._chain(v, (msg.since, msg.since_seq), msg.dtype)
        reply = ChangesReply(step=v.step, since=msg.since, dtype=msg.dtype)
        picked = []  # (tensor layout, indices, the dtype its values go in)
        total = 0
        for fqn in fqns:
            t = by_name[fqn]
            numel = math.prod(t.shape)
            c = union([m.get(fqn) or whole(numel) for m in chain], numel) if chain else Change(UNCHANGED, 0, numel)
            if c.kind == INDICES and msg.want != "counts":
                cast = compare_dtype(t.torch_dtype, dtype)
                need = c.count * (4 + (cast.itemsize if msg.want == "values" else 0))
                if need > MAX_TENSOR_BYTES:
                    c = Change(WHOLE, c.count, numel)  # more than a reply holds: a full read of it is as cheap
                elif picked and total + need > MAX_REPLY_BYTES:
                    break  # the reply answers the tensors before this one; the reader asks again for the rest
                else:
                    total += need
                    picked.append((t, c.indices, cast))
            reply.tensors.append([fqn, c.kind, c.count])
        self.state.counters["read_bytes"] += total  # bytes served to readers, as Read counts them
        if msg.want != "counts":
            indices = [idx for _, idx, _ in picked]
            indices = torch.cat(indices) if len(indices) > 1 else indices[0] if indices else None
            reply.frames = [_frame(indices)]
            if msg.want == "values":
                reply.frames.append(_frame(_values(v, picked, indices)))
        return reply

    def _chain(self, v: Version, since: Key, dtype: str) -> list[dict[str, Change]]:
        """The maps from ``since`` to ``v``, newest first (empty: ``v`` is ``since``)."""
        at, chain = (v.step, v.seq), []
        while at != since:
            rec = self.records.get(at)
            if rec is None or dtype not in rec.maps or at[1] <= since[1]:
                why = (
                    "is still being computed"
                    if at == (v.step, v.seq) and rec is None and self.pending()
                    else f"is not held (dtypes {[dtype_name(d) for d in self.dtypes]}, {len(self.records)} maps kept)"
                )
                raise StagerError(
                    ErrorCode.UNKNOWN_BASE,
                    f"no change map from step {since[0]} (seq {since[1]}) to "
                    f"step {v.step} in {dtype}: the map of step {at[0]} {why}; "
                    "read the version in full",
                )
            chain.append(rec.maps[dtype])
            at = rec.base
        return chain

    @property
    def working(self) -> bool:
        """Maps queued, being made or made and not yet collected (no lock: a hint for the loop's poll)."""
        return bool(self._queue or self._running is not None or self._done)

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
        }


@dataclasses.dataclass(eq=False)
class _Run:
    """Tensors of one stored dtype compared in one pass: ``prev`` and ``new`` are the same flat
    region of the two versions' segments, ``spans`` each tensor's (start, numel) in it."""

    dtype: torch.dtype
    fqns: list
    spans: list
    prev: torch.Tensor | None = None
    new: torch.Tensor | None = None


def _runs(
    prev: NodeLayout, new: NodeLayout, prev_bytes: torch.Tensor, new_bytes: torch.Tensor
) -> tuple[list[_Run], list]:
    """The tensors of ``new`` that ``prev`` holds too (same shape and dtype), grouped into runs that
    one flat view of each segment covers: same dtype, laid out in the same order at the same
    distances in both (as one layout always is), at most GAP bytes apart. Besides, the tensors
    that are new or changed shape or dtype: (fqn, numel, dtype), read whole."""
    old = {t.fqn: t for t in prev.tensors}
    fresh, items = [], []
    for t in new.tensors:
        if not t.complete or len(t.blocks) != 1:
            continue  # a part of a tensor held by several nodes: read whole (no map)
        p = old.get(t.fqn)
        same = p is not None and p.complete and len(p.blocks) == 1 and p.shape == t.shape and p.dtype == t.dtype
        if not same:
            fresh.append((t.fqn, math.prod(t.shape), t.torch_dtype))
        elif math.prod(t.shape):  # empty tensors never change (no map: unchanged)
            items.append((t.blocks[0].byte_offset, p.blocks[0].byte_offset - t.blocks[0].byte_offset, t))
        else:
            fresh.append((t.fqn, 0, t.torch_dtype))  # nothing to move: unchanged
    runs: list[_Run] = []
    base = end = shift = 0
    for off, moved, t in sorted(items, key=lambda item: item[0]):
        dtype, numel = t.torch_dtype, math.prod(t.shape)
        run = runs[-1] if runs else None
        if run is None or run.dtype != dtype or moved != shift or not end <= off <= end + GAP:
            if run is not None:
                _seal_run(run, prev_bytes, new_bytes, base, end, shift)
            run = _Run(dtype, [], [])
            runs.append(run)
            base, shift = off, moved
        run.fqns.append(t.fqn)
        run.spans.append(((off - base) // dtype.itemsize, numel))
        end = off + numel * dtype.itemsize
    if runs:
        _seal_run(runs[-1], prev_bytes, new_bytes, base, end, shift)
    return runs, fresh


def _seal_run(run: _Run, prev_bytes: torch.Tensor, new_bytes: torch.Tensor, base: int, end: int, shift: int) -> None:
    count = (end - base) // run.dtype.itemsize
    run.new = block_view(new_bytes, run.dtype, base, (count,))
    run.prev = block_view(prev_bytes, run.dtype, base + shift, (count,))


def _values(v: Version, picked: list, indices: torch.Tensor | None) -> torch.Tensor | None:
    """The values of ``picked`` (layout, indices, the dtype they go in), one after the other as bytes,
    at ``indices`` (theirs, concatenated): per run of one stored dtype and one cast, one take over
    the whole segment and one cast (:func:`gather_many`)."""
    if not picked:
        return None
    out = torch.empty(sum(idx.numel() * cast.itemsize for _, idx, cast in picked), dtype=torch.uint8)
    seg = v.segment.as_bytes()
    at = byte = 0
    for (stored, cast), run in itertools.groupby(picked, key=lambda p: (p[0].torch_dtype, p[2])):
        run = list(run)
        counts = [idx.numel() for _, idx, _ in run]
        count = sum(counts)
        base = seg[: seg.numel() // stored.itemsize * stored.itemsize].view(stored)
        offsets = [t.blocks[0].byte_offset // stored.itemsize for t, _, _ in run]
        dst = out[byte : byte + count * cast.itemsize].view(cast)
        gather_many(base, offsets, counts, indices[at : at + count], dst)
        at += count
        byte += count * cast.itemsize
    return out


def _frame(flat: torch.Tensor | None) -> memoryview | bytes:
    """A reply frame of ``flat``'s bytes, without a copy (ZeroMQ holds the buffer until it is sent)."""
    if flat is None or not flat.numel():
        return b""
    return memoryview(flat.view(torch.uint8).numpy())


def _summary(base: int, maps: dict[str, Change], sizes: dict[str, int]) -> dict:
    """A version's status entry for one reader dtype: what changed since step ``base``. ``bytes``:
    the changed elements' share of the version's bytes in that dtype; ``delta_bytes``: what a delta
    read moves (indices and values, plus the tensors read whole), against ``full_bytes``."""
    numel = sum(c.numel for c in maps.values())
    full = sum(c.numel * sizes[f] for f, c in maps.items())
    changed = sum(c.count * sizes[f] for f, c in maps.items())
    delta = sum(
        c.count * (4 + sizes[f]) if c.kind == INDICES else c.numel * sizes[f] if c.kind == WHOLE else 0
        for f, c in maps.items()
    )
    return {
        "since": base,
        "elements": round(sum(c.count for c in maps.values()) / numel, 6) if numel else 0.0,
        "bytes": round(changed / full, 6) if full else 0.0,
        "tensors": [sum(c.kind != UNCHANGED for c in maps.values()), len(maps)],
        "whole": sum(c.kind == WHOLE for c in maps.values()),
        "delta_bytes": delta,
        "full_bytes": full,
    }
