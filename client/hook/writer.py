"""Copying: where this rank's bytes go in the daemon's segments, and putting them there.

The :class:`SegmentWriter` owns this rank's writable mappings of the daemon's snapshot
segments, the placement views into them (cached per segment and layout), the idle-time
pre-faulting of segments later steps will use, and the :class:`~.copier.CopyEngine` calls.
It never talks to the daemon: the worker hands it the daemon's :class:`BeginReply`.
"""

from __future__ import annotations

import logging

import torch

from stager.protocol import BeginReply, StagerError
from stager.protocol.dtypes import dtype_from_name
from stager.protocol.layout import PlanEntry
from stager.protocol.shm import map_segment, placement_view, prefault

from .copier import CopyEngine

log = logging.getLogger("stager.client")
PREFAULT_GIVE_UP_S = 30.0  # an upcoming segment that does not appear this long was retired: stop trying


def write_spans(plan: list[PlanEntry], assignment) -> list[tuple[int, int]]:
    """Merged byte ranges of the segment that this rank's assigned shards cover."""
    spans = []
    for entry, where in zip(plan, assignment):
        if where is None or not entry.box.numel:
            continue
        itemsize = dtype_from_name(entry.dtype).itemsize
        first = last = 0
        for dim, extent in enumerate(where.block_shape):  # row-major linear index of the box's corners
            first = first * extent + where.inner[dim]
            last = last * extent + where.inner[dim] + entry.box.shape[dim] - 1
        spans.append((where.block_offset + first * itemsize, where.block_offset + (last + 1) * itemsize))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        # gaps under a page are merged: faulting a page twice costs more than the few extra bytes
        if merged and start <= merged[-1][1] + 4096:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


class SegmentWriter:
    """Maps segments, builds destination views, pre-faults upcoming segments, issues the copies."""

    def __init__(self, copier: CopyEngine) -> None:
        self.copier = copier
        self.segments: dict[str, torch.Tensor] = {}  # segment name -> writable mapping
        self.dst_cache: dict[tuple[str, str], list] = {}  # (segment, layout) -> destination views
        self.upcoming: dict[str, tuple[int, float]] = {}  # later steps' segments -> (size, give-up time)
        self.unfaulted: dict[str, list[tuple[int, int]]] = {}  # segment -> spans not yet faulted in
        self.spans_layout: str | None = None
        self.spans: list[tuple[int, int]] = []  # byte ranges of a segment this rank writes

    def destinations(self, reply: BeginReply, plan: list[PlanEntry], assignment, now: float) -> list:
        """Views of the segment where each local shard goes (None: a replica another rank writes).

        A segment met for the first time has this rank's part of it faulted in in bulk before the
        copy (one ``MADV_POPULATE_WRITE`` call: ~4x faster here than the copy faulting 4 KiB pages
        one by one). The daemon's other live segments are recorded as upcoming, so idle ticks
        pre-fault them (:meth:`premap_one`), and mappings of segments it retired are dropped."""
        live = set(reply.live_segments)
        if reply.layout != self.spans_layout:  # other byte ranges: every segment is faulted anew
            self.spans_layout, self.spans = reply.layout, write_spans(plan, assignment)
            self.unfaulted.clear()
        deadline = now + PREFAULT_GIVE_UP_S
        self.upcoming = {
            n: self.upcoming.get(n, (reply.size, deadline))
            for n in reply.live_segments
            if n != reply.segment and self.unfaulted.get(n) != []
        }
        key = (reply.segment, reply.layout)
        cached = self.dst_cache.get(key)
        if cached is not None:
            return cached  # the steady state: same segment rotation, same layout, no view building
        for name in [n for n in self.segments if n not in live]:  # retired by the daemon
            self.copier.unregister(self.segments.pop(name))
            self.unfaulted.pop(name, None)
        for k in [k for k in self.dst_cache if k[0] not in live or k[1] != reply.layout]:
            del self.dst_cache[k]
        seg = self.segments.get(reply.segment)
        if seg is None:
            seg = self.segments[reply.segment] = map_segment(reply.segment, reply.size, writable=True)
            self.copier.register(seg)
        self._fault_in(reply.segment, seg, budget=None)
        dsts = []
        for entry, where in zip(plan, assignment):
            if where is None:
                dsts.append(None)
                continue
            dsts.append(placement_view(seg, dtype_from_name(entry.dtype), where, entry.box.shape))
        self.dst_cache[key] = dsts
        return dsts

    def copy(self, dsts: list, locals_: list, start_event) -> list:
        """Copy each local shard that has a destination; returns the CUDA events of device copies."""
        return self.copier.copy([(d, s) for d, s in zip(dsts, locals_) if d is not None], start_event)

    def premap_one(self, budget: int, now: float) -> bool:
        """While idle, map a segment the daemon will hand out in a later step and fault in the page
        tables of this rank's part of it, so that step's copy runs at full speed. Works in chunks
        of ``budget`` bytes: a stage() arriving meanwhile waits for one chunk at most.

        Returns False when the segment does not exist yet (the caller waits briefly, then retries)."""
        name, (size, deadline) = next(iter(self.upcoming.items()))
        seg = self.segments.get(name)
        if seg is None:
            try:
                seg = map_segment(name, size, writable=True)
            except (OSError, StagerError):
                # the daemon is still creating it (the size is set when it is complete): retry soon,
                # unless it never appears (retired): then the step that needs it maps it
                if now > deadline:
                    del self.upcoming[name]
                    return True
                return False
            self.segments[name] = seg
            self.copier.register(seg)
        try:
            done = self._fault_in(name, seg, budget)
        except StagerError as exc:  # /dev/shm is full: the step that needs this segment will say so
            log.debug("pre-faulting %s stopped: %s", name, exc)
            done = True
        if done:
            del self.upcoming[name]
            log.debug("segment %s mapped and pre-faulted", name)
        return True

    def _fault_in(self, name: str, seg: torch.Tensor, budget: int | None) -> bool:
        """Fault in up to ``budget`` bytes (all with None) of this rank's spans of segment ``name``
        not faulted in yet; True once none are left. Raises MEMORY_LIMIT when /dev/shm is full."""
        spans = self.unfaulted.setdefault(name, list(self.spans))
        while spans and (budget is None or budget > 0):
            start, end = spans[0]
            stop = end if budget is None else min(end, start + budget)
            if not prefault(seg, start, stop):
                spans.clear()  # kernel without MADV_POPULATE_WRITE: the copy faults pages in itself
                break
            if budget is not None:
                budget -= stop - start
            if stop == end:
                spans.pop(0)
            else:
                spans[0] = (stop, end)
        return not spans

    def close(self) -> None:
        self.copier.close()
        self.segments.clear()
        self.dst_cache.clear()
        self.upcoming.clear()
        self.unfaulted.clear()
