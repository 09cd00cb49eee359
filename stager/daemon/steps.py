"""Staging and sealing: what Begin, Put, Commit and Abort do to a step, as a named state machine.

A step moves PLANNING -> ALLOCATING -> WRITING -> SEALED (or FAILED from any of the first three;
see :class:`~stager.daemon.versions.Phase`). :meth:`Steps.advance` runs the transitions that
are possible now and returns; it is called again when something changes (a begin arrives, a
segment finishes creating, memory is freed). Handlers return the reply to send now, or None when
it is deferred; every deferred reply is eventually sent: on success, on failure, or on timeout.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from stager.protocol import (
    Abort,
    Begin,
    BeginReply,
    Commit,
    ErrorCode,
    ErrorReply,
    Message,
    Ok,
    ProtocolError,
    Put,
    Sealed,
    StagerError,
)
from stager.protocol.dtypes import dtype_from_name
from stager.protocol.layout import PlanEntry, plan_digest
from stager.protocol.quant import check_quant
from stager.protocol.shm import placement_view, prefault, view_bounds

from .memory import PENDING, Retention
from .peers import PeerDirectory
from .planning import build_layout
from .state import DaemonState, Outbox
from .status import FailedStep, VersionDetails
from .versions import LayoutRecord, Pending, Phase, Version

log = logging.getLogger("stager.daemon")

MAX_IN_FLIGHT = 8  # steps staging at once: more means the ranks never finish what they begin
PLANS_PER_RANK = 4  # layout digests remembered per rank (a changed layout keeps the old for a while)
LAYOUTS_KEPT = 8  # planned layouts remembered (versions keep references to theirs)


class Steps:
    """Owns the steps in flight: begins, puts, commits, aborts, sealing, failure and timeouts.
    ``announce`` tells subscribers about each version it seals."""

    def __init__(
        self,
        state: DaemonState,
        directory: PeerDirectory,
        memory: Retention,
        outbox: Outbox,
        *,
        announce: Callable[[Version], None],
        in_flight: Callable[[bool], None] = lambda busy: None,
    ):
        self.state = state
        self.directory = directory
        self.memory = memory
        self.outbox = outbox
        self._announce = announce
        # told whether any step is in flight, each time that changes: change maps wait while one is
        self._in_flight_changed = in_flight
        # rank -> (epoch, step) of its latest begin or abort: a rank stages steps in increasing order
        self.positions: dict[int, tuple[int, int]] = {}

    # ------------------------------------------------------------------ requests

    def on_begin(self, identity: bytes, msg: Begin) -> Message | None:
        state = self.state
        peer = self.directory.get(identity, "trainer")
        rank, step = peer.rank, msg.step
        if msg.plan is not None:
            if plan_digest(msg.plan) != msg.digest:
                raise StagerError(
                    ErrorCode.BAD_PLAN,
                    f"rank {rank}: the plan does not match its digest "
                    f"{msg.digest[:12]}; digest = blake2b-128 of the msgpack plan",
                )
            self._remember_plan(rank, msg.digest, msg.plan)
        elif (rank, msg.digest) not in state.plans:
            raise StagerError(
                ErrorCode.PLAN_REQUIRED,
                f"the daemon does not know layout {msg.digest[:12]} of rank {rank}; resend Begin with the plan",
            )
        if step in state.failed:
            raise StagerError(ErrorCode.STEP_FAILED, f"step {step} failed: {state.failed[step]}")
        newest = max((s for s, v in state.sealed.items() if v.epoch == state.epoch), default=-1)
        if step <= newest and step not in state.staging:
            raise StagerError(
                ErrorCode.STALE_STEP,
                f"step {step} is not newer than sealed step {newest}; stage increasing step numbers",
            )
        v = state.staging.get(step)
        if v is not None and rank in v.digests:
            raise StagerError(ErrorCode.BAD_MESSAGE, f"rank {rank} already began step {step}")
        self._moved_to(rank, step, "began")
        past = self._ranks_past(step, {rank, *(v.digests if v is not None else ())})
        if past:
            who = f"rank {past[0]}" if len(past) == 1 else f"ranks {past}"
            reason = (
                f"{who} went past step {step} without beginning it (its stage of step {step} failed before "
                "reaching the daemon, e.g. across a daemon restart)"
            )
            if v is not None:
                self.fail(v, reason)
            raise StagerError(ErrorCode.STEP_FAILED, f"step {step} failed: {reason}")
        if v is None and len(state.staging) >= MAX_IN_FLIGHT:
            raise StagerError(
                ErrorCode.MEMORY_LIMIT,
                f"{len(state.staging)} steps are still staging ({sorted(state.staging)}); wait for earlier stages "
                "(handle.wait()) before staging more, or find the rank that does not commit",
            )
        self._retire_abandoned(step)
        if v is None:
            v = state.staging[step] = Version(step, state.epoch, full_world=msg.full_world)
            self._in_flight_changed(True)
        v.digests[rank] = msg.digest
        v.entries[rank] = state.plans[(rank, msg.digest)]
        if msg.shm:
            v.shm_ranks.add(rank)
        v.full_world = v.full_world and msg.full_world
        v.wait_ms = max(v.wait_ms, min(msg.wait_ms, int(state.step_timeout * 1000)))
        v.waiting_begin[rank] = Pending(identity, msg.id)
        self.advance(v)
        return None

    def on_put(self, identity: bytes, msg: Put) -> Message:
        peer = self.directory.get(identity, "trainer")
        v = self._in_flight(msg.step)
        if peer.rank not in v.digests or v.phase is not Phase.WRITING or peer.rank in v.waiting_begin:
            raise StagerError(ErrorCode.BAD_MESSAGE, f"put for step {msg.step} before its begin was answered")
        entries = v.entries[peer.rank]
        assignment = v.layout.assignments[peer.rank]
        checked = []
        for index, frame in zip(msg.regions, msg.frames):  # validate every frame before writing any
            if not 0 <= index < len(entries) or assignment[index] is None:
                raise StagerError(ErrorCode.BAD_MESSAGE, f"rank {peer.rank} is not assigned region {index}")
            entry = entries[index]
            data = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
            want = entry.box.numel * dtype_from_name(entry.dtype).itemsize
            if data.nbytes != want:
                raise StagerError(
                    ErrorCode.BAD_MESSAGE, f"{entry.fqn}: got {data.nbytes} bytes, the shard holds {want}"
                )
            checked.append((index, entry, data))
        seg_bytes = v.segment.as_bytes()
        writes = []
        try:
            for index, entry, data in checked:
                dtype = dtype_from_name(entry.dtype)
                dst = placement_view(seg_bytes, dtype, assignment[index], entry.box.shape)
                prefault(seg_bytes, *view_bounds(seg_bytes, dst))  # /dev/shm full: an error, not a SIGBUS
                writes.append((index, dst, torch.frombuffer(data, dtype=dtype) if data.nbytes else None))
        except StagerError as exc:
            self.fail(v, f"rank {peer.rank}'s bytes do not fit: {exc.message}")
            raise StagerError(ErrorCode.STEP_FAILED, v.reason) from None
        received = v.put.setdefault(peer.rank, set())
        for index, dst, src in writes:
            if src is not None:
                dst.copy_(src.view(dst.shape))
                self.state.counters["ingested_bytes"] += src.numel() * src.element_size()
            received.add(index)
        return Ok()

    def on_commit(self, identity: bytes, msg: Commit) -> Message | None:
        state = self.state
        peer = self.directory.get(identity, "trainer")
        v = self._in_flight(msg.step)
        rank = peer.rank
        if rank not in v.digests or v.phase is not Phase.WRITING or rank in v.waiting_begin:
            raise StagerError(ErrorCode.BAD_MESSAGE, f"commit for step {msg.step} before its begin was answered")
        if rank in v.committed:
            raise StagerError(ErrorCode.BAD_MESSAGE, f"rank {rank} already committed step {msg.step}")
        if rank not in v.shm_ranks:
            assignment = v.layout.assignments[rank]
            missing = [i for i, a in enumerate(assignment) if a is not None and i not in v.put.get(rank, ())]
            if missing:
                self.fail(v, f"rank {rank} committed without sending {len(missing)} of its regions")
                raise StagerError(ErrorCode.STEP_FAILED, v.reason)
        else:
            state.counters["ingested_bytes"] += v.layout.written_bytes[rank]
        lowest = v.objects_rank is None or rank < v.objects_rank  # the lowest rank's train state wins
        if msg.quant and lowest:
            try:
                check_quant(
                    {f: s.wire() for f, s in msg.quant.items()}, {t.fqn: (t.dtype, t.shape) for t in v.layout.tensors}
                )
            except StagerError as exc:
                self.fail(v, f"rank {rank}: {exc.message}", exc.code)
                raise
            v.quant = dict(msg.quant)
        v.committed.add(rank)
        if lowest:
            v.objects, v.objects_rank = msg.objects, rank
            if msg.model_info is not None:
                v.model_info = msg.model_info
        elif v.model_info is None and msg.model_info is not None:
            v.model_info = msg.model_info
        v.waiting_commit[rank] = Pending(identity, msg.id)
        if v.committed >= set(v.record.digests):
            self._seal(v)
        return None

    def on_abort(self, identity: bytes, msg: Abort) -> Message:
        """A rank will not commit ``msg.step``; idempotent. A step not in flight yet (the rank's stage
        failed before its begin reached the daemon) is remembered as failed, so the other ranks'
        begins of it fail at once instead of waiting for this rank."""
        state = self.state
        peer = self.directory.get(identity, "trainer")
        reason = f"rank {peer.rank} aborted step {msg.step}: {msg.reason[:500]}"
        self._moved_to(peer.rank, msg.step, "aborted")
        v = state.staging.get(msg.step)
        newest = max((s for s, w in state.sealed.items() if w.epoch == state.epoch), default=-1)
        if v is not None:
            self.fail(v, reason)
        elif msg.step > newest and msg.step not in state.failed:
            state.remember_failure(msg.step, reason)
        return Ok()

    def _moved_to(self, rank: int, step: int, what: str) -> None:
        """``rank`` began (or aborted) ``step``. Ranks stage steps in increasing order, so a step in
        flight that it went past without beginning can never seal: fail it now, not at the timeout."""
        self.positions[rank] = (self.state.epoch, step)
        for v in list(self.state.staging.values()):
            if v.step < step and rank not in v.digests:
                self.fail(
                    v,
                    f"rank {rank} {what} step {step} without beginning step {v.step} (its stage of step "
                    f"{v.step} failed before reaching the daemon, e.g. across a daemon restart)",
                )

    def _ranks_past(self, step: int, began) -> list[int]:
        """Ranks of this job whose latest begin or abort is for a step at or after ``step`` and
        that did not begin ``step``: they never will."""
        epoch = self.state.epoch
        return sorted(r for r, (e, s) in self.positions.items() if e == epoch and s >= step and r not in began)

    def _in_flight(self, step: int) -> Version:
        v = self.state.staging.get(step)
        if v is None:
            if step in self.state.failed:
                raise StagerError(ErrorCode.STEP_FAILED, f"step {step} failed: {self.state.failed[step]}")
            raise StagerError(ErrorCode.UNKNOWN_STEP, f"step {step} is not being staged; send Begin first")
        return v

    def _remember_plan(self, rank: int, digest: str, entries: tuple[PlanEntry, ...]) -> None:
        plans = self.state.plans
        plans.pop((rank, digest), None)
        plans[(rank, digest)] = entries
        mine = [k for k in plans if k[0] == rank]
        for key in mine[:-PLANS_PER_RANK]:
            del plans[key]

    def _retire_abandoned(self, step: int) -> None:
        """A restarted job staging step S abandons older epochs' versions at steps >= S."""
        state = self.state
        for s, v in list(state.sealed.items()):
            if v.epoch != state.epoch and s >= step:
                del state.sealed[s]
                if v.leases:
                    state.orphans.add(v)
                else:
                    self.memory.free(v, reuse=True)

    # ------------------------------------------------------------------ the state machine

    def advance(self, v: Version) -> None:
        """Run the transitions possible now: PLANNING -> ALLOCATING -> WRITING."""
        if not v.phase.in_flight:
            return
        try:
            if v.phase is Phase.PLANNING and self._fix_layout(v):
                v.phase = Phase.ALLOCATING
            if v.phase is Phase.ALLOCATING and self._fix_segment(v):
                v.phase = Phase.WRITING
            if v.phase is Phase.WRITING and v.waiting_begin:
                self._answer_begins(v)
        except Exception as exc:  # never leave a step half-registered with begins unanswered
            log.exception("step %d: internal error", v.step)
            self.fail(v, f"internal error ({exc.__class__.__name__}: {exc}); please report it", ErrorCode.INTERNAL)

    def _fix_layout(self, v: Version) -> bool:
        """PLANNING: reuse the current layout when every rank's digest matches, else build a new
        one once every rank of the node has sent its plan."""
        state = self.state
        if v.record is None:
            record = state.current
            expected = set(range(state.local_world_size or 0))
            reusable = (
                record is not None
                and set(record.digests) == expected
                and record.full_world == v.full_world
                and all(record.digests.get(r) == d for r, d in v.digests.items())
            )
            if not reusable:
                if len(v.digests) < len(expected):
                    return False  # a new layout needs every rank's plan
                try:
                    record = self._layout_for(v)
                except ProtocolError as exc:
                    self.fail(v, exc.message, ErrorCode.BAD_PLAN)
                    return False
            v.record = state.current = record
            self.memory.budget.current_layout = record.id
        return self._digests_agree(v)

    def _digests_agree(self, v: Version) -> bool:
        for r, d in v.digests.items():
            if v.record.digests.get(r) != d:
                self.fail(
                    v,
                    f"rank {r} changed its state-dict layout at step {v.step} while other ranks did "
                    "not; every rank must stage the same keys and shapes",
                    ErrorCode.BAD_PLAN,
                )
                return False
        return True

    def _fix_segment(self, v: Version) -> bool:
        """ALLOCATING: take a pooled or new segment; wait (back-pressure) or refuse when memory is short."""
        record = v.record
        try:
            segment = self.memory.take_segment(record.id, record.layout.size)
        except StagerError as exc:
            self.fail(v, exc.message, exc.code)
            return False
        if segment is PENDING:
            return False  # being created in the background: retried when it is ready
        if segment is None:
            now = time.monotonic()
            if v.wait_deadline is None:
                v.wait_deadline = now + v.wait_ms / 1000
                self.state.counters["backpressure_waits"] += 1
            if now >= v.wait_deadline:
                self.state.counters["memory_refusals"] += 1
                self.fail(v, self.memory.memory_message(record.layout.size), ErrorCode.MEMORY_LIMIT)
            return False
        v.segment, v.wait_deadline = segment, None
        # steady state rotates keep + 1 segments: create the rest now, off the critical path
        self.memory.budget.prefill(record.id, record.layout.size, self.state.keep + 1)
        return True

    def _answer_begins(self, v: Version) -> None:
        """WRITING: tell each waiting rank where to write (its assignment only when new to it);
        a rank whose begin arrives later (the layout was reusable) is answered here at once."""
        if not self._digests_agree(v):
            return
        record = v.record
        live = self.memory.budget.live(record.id)
        for rank, pending in v.waiting_begin.items():
            peer = self.state.peers.get(pending.peer)
            send_assignment = peer is not None and record.id not in peer.layouts_sent
            if send_assignment:
                peer.layouts_sent.add(record.id)
            self.outbox.send(
                pending.peer,
                BeginReply(
                    id=pending.rid,
                    step=v.step,
                    segment=v.segment.name,
                    size=v.segment.size,
                    layout=record.id,
                    assignment=record.layout.assignments[rank] if send_assignment else None,
                    live_segments=live,
                ),
            )
        v.waiting_begin.clear()

    def _layout_for(self, v: Version) -> LayoutRecord:
        state = self.state
        key = (tuple(sorted(v.digests.items())), v.full_world)
        record = state.layouts.get(key)
        if record is None:
            plans = {r: state.plans[(r, d)] for r, d in v.digests.items()}
            layout = build_layout(plans, full_world=v.full_world)
            record = LayoutRecord(f"L{next(state.layout_ids)}", layout, dict(v.digests), v.full_world)
            while len(state.layouts) >= LAYOUTS_KEPT:
                state.layouts.pop(next(iter(state.layouts)))
            state.layouts[key] = record
            log.info(
                "layout %s: %d tensors, %.1f MiB%s",
                record.id,
                len(layout.tensors),
                layout.size / 2**20,
                " (partial)" if layout.partial else "",
            )
        return record

    def _seal(self, v: Version) -> None:
        state = self.state
        v.phase, v.sealed_at = Phase.SEALED, time.monotonic()
        del state.staging[v.step]
        self._in_flight_changed(bool(state.staging))
        state.sealed[v.step] = v
        if any(s > v.step for s in state.sealed):  # steps sealed out of order: keep step order
            state.sealed = OrderedDict(sorted(state.sealed.items()))
        state.counters["sealed"] += 1
        state.seq += 1
        v.seq = state.seq
        reply = Sealed(step=v.step, nbytes=v.layout.nbytes, tensors=len(v.layout.tensors), partial=v.layout.partial)
        for pending in v.waiting_commit.values():
            reply.id = pending.rid
            self.outbox.send(pending.peer, reply)
        v.waiting_commit.clear()
        self._announce(v)
        log.info("sealed step %d (%.1f MiB, %d tensors)", v.step, v.layout.nbytes / 2**20, len(v.layout.tensors))
        self.memory.enforce()
        self.retry_waiting()

    def fail(self, v: Version, reason: str, code: ErrorCode = ErrorCode.STEP_FAILED) -> None:
        """FAILED: answer every waiting request with the reason, unlink the segment."""
        state = self.state
        if not v.phase.in_flight:
            return
        v.phase, v.reason = Phase.FAILED, reason
        state.staging.pop(v.step, None)
        self._in_flight_changed(bool(state.staging))
        state.remember_failure(v.step, reason)
        state.counters["failed"] += 1
        err = ErrorReply(code=code.value, message=reason)
        for pending in [*v.waiting_begin.values(), *v.waiting_commit.values()]:
            err.id = pending.rid
            self.outbox.send(pending.peer, err)
        v.waiting_begin.clear()
        v.waiting_commit.clear()
        if v.segment is not None:  # never pooled: a slow rank may still be writing into it
            self.memory.budget.destroy(v.segment)
            v.segment = None
        log.warning("step %d failed: %s", v.step, reason)
        self.retry_waiting()

    def retry_waiting(self) -> None:
        """Advance steps waiting for memory or for a segment being created."""
        for v in list(self.state.staging.values()):
            if v.phase is Phase.ALLOCATING:
                self.advance(v)

    def check_timeouts(self) -> None:
        state = self.state
        now = time.monotonic()
        for v in list(state.staging.values()):
            if now - v.started > state.step_timeout:
                expected = (
                    set(v.record.digests)
                    if v.record
                    else set(range(state.local_world_size or 0)) | set(state.ranks) | set(v.digests)
                )
                never = sorted(expected - set(v.digests))[:32]
                missing = (
                    f"ranks {never} never began it"
                    if never
                    else f"ranks {sorted(expected - v.committed)[:32]} did not commit"
                )
                self.fail(
                    v,
                    f"step {v.step} timed out after {state.step_timeout:.0f}s in phase {v.phase.value}: "
                    f"{missing} (began: {sorted(v.digests)[:32]}); a rank is stuck, gone or slower than "
                    "--step-timeout",
                )
            elif v.phase is Phase.ALLOCATING:
                self.advance(v)

    def versions(self, now: float) -> list[VersionDetails | FailedStep]:
        """Status: the sealed versions, the steps in flight and the steps that failed."""
        state = self.state
        return (
            [v.summary(now) for v in state.sealed.values()]
            + [v.summary(now) for v in state.staging.values()]
            + [{"step": s, "state": "failed", "reason": r} for s, r in state.failed.items()]
        )

    def close(self) -> None:
        for v in list(self.state.staging.values()):
            self.fail(v, "the daemon is shutting down")
