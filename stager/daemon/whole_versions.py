"""Full assembly per node (``serve --assemble-full``): each complete version of a multi-node job,
whole, on this node, so that readers placed here (RL rollout workers beside the trainer) read all
of it zero-copy.

Two halves, speaking the protocol of :mod:`stager.protocol.assembly`:

- :class:`FullAssembly` is the daemon's handler of those messages, on the socket loop (the
  daemon's state is not locked). It plans a whole-tensor layout, finds memory for it *only where
  it is free* (a pooled segment of that layout, or bytes under ``--memory-limit`` without dropping
  anything: the trainer's steps always come first and may evict assembled versions like any
  other), has the segment created on the budget's background thread (the reply waits for it, the
  loop does not), and, once the assembler says the bytes are in, swaps the node's partial version
  of the step for the whole one. Readers that leased the partial version keep it until they
  release it (an orphan, as after a rollback).
- :class:`~stager.loaders.assemble_full.Assembler` is a consumer: it reads each newly complete
  version of the job like any reader (its own node's regions through shared memory, the others'
  as frames, or over NIXL through the daemon's own agent with ``--transport nixl``) straight into
  the segment it was given (mapped by name, or the daemon's registered mapping of it for NIXL).
  It reaches the daemon only through those messages, on the daemon's private assembler socket;
  the daemon never imports it, never waits for it, and never runs its code on the loop.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from stager.protocol import ErrorCode, ErrorReply, Message, Ok, StagerError
from stager.protocol.assembly import AssembleBegin, AssembleDone, AssembleReply, Spec
from stager.protocol.layout import Box, PlanEntry

from .memory import PENDING, Retention
from .planning import build_layout
from .segments import Segment
from .state import DaemonState, Outbox
from .status import AssemblyStatus
from .versions import LayoutRecord, Pending, Phase, Version

log = logging.getLogger("stager.daemon")


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


@dataclasses.dataclass(eq=False)
class InFlight:
    """The one assembly under way: who to answer, the partial version it began from, its whole
    layout, and its segment once there is one."""

    asker: Pending
    version: Version
    record: LayoutRecord
    segment: Segment | None = None


def skip(step: int, reason: str, message: str) -> AssembleReply:
    return AssembleReply(step=step, reason=reason, message=message)


class FullAssembly:
    """The daemon's half: plans, memory and the swap (see the module docstring). Every method runs
    on the socket loop's thread; one assembly is under way at a time (a node has one assembler)."""

    def __init__(self, state: DaemonState, memory: Retention, announce: Callable[[Version], None], outbox: Outbox):
        self.state = state
        self.memory = memory
        self._announce = announce
        self.outbox = outbox
        self.records: dict[tuple, LayoutRecord] = {}  # specs -> whole layout (one per model: segments pool)
        self.current: InFlight | None = None
        memory.budget.spare_rotation = state.keep + 1
        for key in ("assembled", "assembly_skipped", "assembly_failed"):
            state.counters.setdefault(key, 0)

    def on_begin(self, identity: bytes, msg: AssembleBegin) -> Message | None:
        """Plan the whole version of ``msg.step``: the segment to write (now, or once created: the
        reply is deferred), or why not."""
        self._abandon()  # one at a time: an assembler that begins again is done with the last one
        step, held = msg.step, self.state.leases.get(msg.lease)
        if held is None or held[1].step != step:
            raise StagerError(
                ErrorCode.UNKNOWN_LEASE,
                f"assemble_begin: lease {msg.lease} is not a lease on step {step} held on this node; "
                "lease the version on this node's daemon first and name the lease it gave",
            )
        v = held[1]
        if self.state.sealed.get(step) is not v or v.epoch != self.state.epoch or v.assembled or not v.layout.partial:
            return skip(
                step,
                "not_partial",
                f"step {step} is not a partial version sealed on this node in the "
                "current timeline (evicted, rolled back, or assembled already)",
            )
        why = mismatch({t.fqn: (t.dtype, t.shape) for t in v.layout.tensors}, list(msg.specs))
        if why is not None:
            self.state.counters["assembly_failed"] += 1
            return skip(step, "mismatch", f"step {step}: {why}")
        key = tuple(msg.specs)
        record = self.records.get(key)
        if record is None:
            layout = build_layout(whole_layout_plan(list(msg.specs)), full_world=True)
            record = LayoutRecord(f"L{next(self.state.layout_ids)}", layout, {}, True)
            self.records = {key: record}  # a changed model: the old layout's pool goes with enforce()
            self.memory.budget.spare_layout = record.id
        self.current = InFlight(Pending(identity, msg.id), v, record)
        return self._segment()

    def _segment(self) -> AssembleReply | None:
        """The current assembly's segment, if the budget has one now (None: being created)."""
        cur = self.current
        record = cur.record
        step = cur.version.step
        budget = self.memory.budget
        try:
            got = budget.request_spare(record.id, record.layout.size)
        except StagerError as exc:  # creating it failed (/dev/shm full): this version stays partial
            got = exc
        if got is PENDING:
            return None
        if not isinstance(got, Segment):
            self.current = None
            self.state.counters["assembly_skipped"] += 1
            why = (
                got.message
                if isinstance(got, StagerError)
                else (f"{budget.used >> 20} of {budget.limit >> 20} MiB in use, the trainer's next segments kept free")
            )
            return skip(
                step,
                "no_memory",
                f"step {step}: no free memory for the whole version ({record.layout.size >> 20} MiB; {why})",
            )
        cur.segment = got
        offsets = tuple((t.fqn, t.blocks[0].byte_offset) for t in record.layout.tensors)
        return AssembleReply(step=step, segment=got.name, size=record.layout.size, offsets=offsets)

    @property
    def waiting(self) -> bool:
        """An assemble_begin waits for its segment (being created, or pooled and not yet taken)."""
        return self.current is not None and self.current.segment is None

    def retry(self) -> None:
        """Answer an assembly that waited for its segment, if the budget has it now (else it waits on)."""
        cur = self.current
        if not self.waiting:
            return
        reply = self._segment()
        if reply is not None:
            reply.id = cur.asker.rid
            self.outbox.send(cur.asker.peer, reply)

    def on_done(self, identity: bytes, msg: AssembleDone) -> Message:
        cur = self.current
        if cur is None or cur.segment is None or cur.segment.name != msg.segment or cur.version.step != msg.step:
            raise StagerError(
                ErrorCode.UNKNOWN_STEP,
                f"assemble_done: segment {msg.segment!r} of step {msg.step} is "
                "not the one this daemon gave for the assembly under way; send "
                "assemble_begin first and report the segment it answered",
            )
        self.current = None
        if not msg.ok:
            log.info("full assembly of step %d failed: %s", msg.step, msg.reason or "no reason given")
        self.finish(cur.version, cur.record, cur.segment, msg.ok)
        return Ok()

    def _abandon(self) -> None:
        cur, self.current = self.current, None
        if cur is None:
            return
        if cur.segment is not None:
            self.memory.budget.give_back(cur.segment, reuse=True)
        else:  # its begin still waits for a segment: answered, never left hanging
            self.outbox.send(
                cur.asker.peer,
                ErrorReply(
                    id=cur.asker.rid,
                    code=ErrorCode.STEP_FAILED.value,
                    message=f"assemble_begin of step {cur.version.step} was superseded by another assemble_begin",
                ),
            )

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
        whole = Version(
            step,
            v.epoch,
            started=v.started,
            phase=Phase.SEALED,
            record=record,
            segment=seg,
            full_world=False,
            objects=v.objects,
            objects_rank=v.objects_rank,
            model_info=v.model_info,
            quant=dict(v.quant),
            seq=v.seq,
            sealed_at=v.sealed_at,
            assembled=True,
        )
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
