"""Full assembly per node (``serve --assemble-full``): each complete version of a multi-node job,
whole, on this node, so that readers placed here (RL rollout workers beside the trainer) read all
of it zero-copy.

Two halves, one per thread:

- :class:`FullAssembly` runs on the socket loop (it touches the daemon's state, which is not
  locked): it plans a whole-tensor layout, finds memory for it *only where it is free* (a pooled
  segment of that layout, or bytes under ``--memory-limit`` without dropping anything: the
  trainer's steps always come first and may evict assembled versions like any other), and, once
  the bytes are in, swaps the node's partial version of the step for the whole one. Readers that
  leased the partial version keep it until they release it (an orphan, as after a rollback).
- :class:`~stager.loaders.assemble_full.Assembler` is a background thread that reads each
  newly complete version of the job like any reader (``Subscriber``: its own node's regions
  through shared memory, the others' as frames over the authenticated transport) straight into
  the new segment. It is a client (the daemon never imports the client), attached by ``stager
  serve``, and reaches the loop only through ``Daemon.call``, so the loop never waits for
  another node, and the trainer never waits for the assembly: a step staged meanwhile is
  planned, allocated and sealed as before.
"""

from __future__ import annotations

import logging
from typing import Callable

from stager.protocol.layout import Box, PlanEntry
from stager.protocol.shm import prefault

from .memory import Retention
from .planning import build_layout
from .segments import Segment
from .state import DaemonState
from .status import AssemblyStatus
from .versions import LayoutRecord, Phase, Version

log = logging.getLogger("stager.daemon")

Spec = tuple[str, str, tuple[int, ...]]  # (fqn, dtype name, global shape)


def whole_layout_plan(specs: list[Spec]) -> dict[int, tuple[PlanEntry, ...]]:
    """One writer holding every tensor whole: what :func:`build_layout` turns into an unsharded layout.

    >>> whole_layout_plan([("w", "f32", (2, 3))])[0][0].box
    Box(offset=(0, 0), shape=(2, 3))
    """
    return {0: tuple(PlanEntry(fqn, dt, shape, Box((0,) * len(shape), shape)) for fqn, dt, shape in specs)}


def mismatch(held: dict[str, tuple[str, tuple[int, ...]]], specs: list[Spec]) -> str | None:
    """Why the job's tensors (``specs``) cannot replace this node's version (``held``: fqn ->
    (dtype, shape)), or None when every tensor the node holds is among them, alike.

    >>> mismatch({"w": ("f32", (4,))}, [("w", "bf16", (4,))])
    'w is f32[4] on this node but bf16[4] in the job'
    """
    job = {fqn: (dt, tuple(shape)) for fqn, dt, shape in specs}
    for fqn, (dt, shape) in held.items():
        if fqn not in job:
            return f"{fqn} is on this node but not in the job's version"
        if job[fqn] != (dt, tuple(shape)):
            return f"{fqn} is {dt}{list(shape)} on this node but {job[fqn][0]}{list(job[fqn][1])} in the job"
    return None


class FullAssembly:
    """The loop's half: plans, memory and the swap (see the module docstring). Every method runs
    on the socket loop's thread."""

    def __init__(self, state: DaemonState, memory: Retention, announce: Callable[[Version], None],
                 new_segment_name: Callable[[], str]):
        self.state, self.memory, self._announce, self._new_name = state, memory, announce, new_segment_name
        self.records: dict[tuple, LayoutRecord] = {}  # specs -> whole layout (one per model: segments pool)
        memory.budget.spare_rotation = state.keep + 1
        for key in ("assembled", "assembly_skipped", "assembly_failed"):
            state.counters.setdefault(key, 0)

    def _sealed_partial(self, step: int, lease: int) -> Version | None:
        """The partial version of ``step`` sealed now, if it is the one the assembler leased (after a
        restart of the job the same step number may be another version)."""
        v = self.state.sealed.get(step)
        held = self.state.leases.get(lease)
        if v is None or held is None or held[1] is not v or v.epoch != self.state.epoch or v.assembled \
                or not v.layout.partial:
            return None
        return v

    def begin(self, step: int, lease: int, specs: list[Spec]
              ) -> tuple[Version, LayoutRecord, Segment | None, str | None] | str:
        """Plan the whole version of ``step`` (the assembler's ``lease`` of it on this node):
        ``(version, record, pooled segment or None, name of the segment to create or None)``, or
        why not (a string: nothing to do, or no free memory)."""
        v = self._sealed_partial(step, lease)
        if v is None:
            return f"step {step} is not a partial version sealed on this node (evicted, or assembled already)"
        why = mismatch({t.fqn: (t.dtype, t.shape) for t in v.layout.tensors}, specs)
        if why is not None:
            self.state.counters["assembly_failed"] += 1
            return f"step {step}: {why}"
        key = tuple(specs)
        record = self.records.get(key)
        if record is None:
            layout = build_layout(whole_layout_plan(specs), full_world=True)
            record = LayoutRecord(f"L{next(self.state.layout_ids)}", layout, {}, True)
            self.records = {key: record}  # a changed model: the old layout's pool goes with enforce()
            self.memory.budget.spare_layout = record.id
        got = self.memory.budget.reserve_spare(record.id, record.layout.size)
        if got is False:
            self.state.counters["assembly_skipped"] += 1
            return (f"step {step}: no free memory for the whole version ({record.layout.size >> 20} MiB; "
                    f"{self.memory.budget.used >> 20} of {self.memory.budget.limit >> 20} MiB in use, the "
                    "trainer's next segments kept free)")
        if got is True:
            return v, record, None, self._new_name()
        return v, record, got, None

    def pending(self) -> list[int]:
        """Steps sealed partial on this node in the current timeline, not assembled (newest last)."""
        return [s for s, v in self.state.sealed.items()
                if v.epoch == self.state.epoch and not v.assembled and v.layout.partial]

    def create_segment(self, name: str, size: int) -> Segment:
        """Create a segment for a reservation and fault its pages in (on the assembler's thread: it
        takes a while). A full /dev/shm is a MEMORY_LIMIT error here, never a SIGBUS mid-copy."""
        seg = Segment(name, size)
        try:
            prefault(seg.as_bytes(), 0, size)
        except BaseException:
            seg.unlink()
            raise
        return seg

    def adopt(self, record: LayoutRecord, seg: Segment) -> None:
        self.memory.budget.adopt(record.id, seg)

    def unreserve(self, record: LayoutRecord) -> None:
        self.memory.budget.unreserve(record.layout.size)

    def finish(self, v: Version, record: LayoutRecord, seg: Segment, ok: bool) -> bool:
        """Swap ``v``, the partial version the assembly began from, for the whole one in ``seg``
        (``ok``: its bytes are all in) if ``v`` is still the step's sealed version, else give the
        segment back; True when swapped."""
        step = v.step
        if not ok or self.state.sealed.get(step) is not v or v.epoch != self.state.epoch:
            self.memory.budget.give_back(seg, reuse=True)  # its bytes are overwritten before any use
            if not ok:
                self.state.counters["assembly_failed"] += 1
            return False
        whole = Version(step, v.epoch, started=v.started, phase=Phase.SEALED, record=record, segment=seg,
                        full_world=False, objects=v.objects, objects_rank=v.objects_rank, model_info=v.model_info,
                        quant=dict(v.quant), seq=v.seq, sealed_at=v.sealed_at, assembled=True)
        self.state.sealed[step] = whole
        if v.leases:
            self.state.orphans.add(v)  # its readers keep it until they release it
        else:
            self.memory.free(v, reuse=True)
        self.state.counters["assembled"] += 1
        self._announce(whole)  # partial=False: readers on this node may now read all of it here
        log.info("step %d assembled whole on this node (%.1f MiB)", step, record.layout.nbytes / 2**20)
        return True

    def status(self) -> AssemblyStatus:
        return {"enabled": True, "assembled": [s for s, v in self.state.sealed.items() if v.assembled]}
