"""The daemon's state machine: what each request does to peers, steps and versions.

Handlers return the reply to send now, or None when the reply is deferred (a begin waits for
the other ranks' plans or for memory; a commit waits for the seal). Every deferred reply is
eventually sent: on success, on failure of the step, or when the step times out.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections import OrderedDict
from typing import Callable

import torch

from stager.peers import Peer, PeerHandlers
from stager.planning import NodeLayout, PlanEntry, assignment_to_wire, build_layout, parse_plan, plan_digest
from stager.protocol import (
    Abort, Acquire, Begin, Read, Subscribe, BeginReply, Bye, Commit, ErrorCode, ErrorReply, Hello,
    Message, Ok, Ping, Pong, ProtocolError, Put, Release, Sealed, StagerError, Status,
    StatusReply,
)
from stager.protocol.dtypes import dtype_from_name
from stager.protocol.quant import check_quant
from stager.reading import ReadingHandlers
from stager.shm import block_view
from stager.versions import PENDING, Pending, SegmentBudget, Version, evictable, reclaim_candidates

log = logging.getLogger("stager.daemon")

Send = Callable[[bytes, Message], bool]  # False: dropped (peer gone or not reading)
LIVENESS_INTERVAL_S = 1.0
MAX_IN_FLIGHT = 8  # steps staging at once: more means the ranks never finish what they begin
_PLANS_PER_RANK = 4  # layout digests remembered per rank (a changed layout keeps the old for a while)


RETENTION_POLICY = (
    "keep the newest --keep sealed versions; a leased version is never freed while leased; when a new "
    "step needs memory, drop unleased versions oldest first (never the newest), then make the step wait "
    "up to the trainer's backpressure_timeout, then refuse it with MEMORY_LIMIT")


@dataclasses.dataclass(eq=False)
class LayoutRecord:
    id: str
    layout: NodeLayout
    digests: dict[int, str]  # rank -> plan digest this layout was built from
    wire_tensors: list  # the tensor table readers receive, encoded once
    full_world: bool
    by_name: dict = dataclasses.field(default_factory=dict)  # fqn -> TensorLayout, filled on first remote read


class StagingState(PeerHandlers, ReadingHandlers):
    """All of the daemon's state; the socket loop feeds it requests and housekeeping ticks."""

    def __init__(self, *, budget: SegmentBudget, send: Send, keep: int, step_timeout: float,
                 peer_timeout: float, host_id: str, session: str):
        self.budget, self.send, self.keep = budget, send, keep
        self.step_timeout, self.peer_timeout = step_timeout, peer_timeout
        self.host_id, self.session = host_id, session
        self.peers: dict[bytes, Peer] = {}
        self.ranks: dict[int, bytes] = {}  # local rank -> trainer identity
        self.local_world_size: int | None = None
        self.epoch = 0
        self.plans: dict[tuple[int, str], list[PlanEntry]] = {}
        self.layouts: dict[tuple, LayoutRecord] = {}
        self.current: LayoutRecord | None = None
        self.staging: dict[int, Version] = {}
        self.sealed: OrderedDict[int, Version] = OrderedDict()
        self.orphans: set[Version] = set()  # leased versions of an abandoned timeline (job rolled back)
        self.failed: OrderedDict[int, str] = OrderedDict()  # step -> reason, the last 32
        self.leases: dict[int, tuple[bytes, Version]] = {}
        self._lease_ids = itertools.count(1)
        self._layout_ids = itertools.count(1)
        self._next_liveness = 0.0
        self.seq = 0  # versions sealed by this daemon: announcements carry it, gaps show skips
        self.subscribers: set[bytes] = set()
        self.counters = {"sealed": 0, "failed": 0, "ingested_bytes": 0, "requests": 0, "errors": 0,
                         "read_bytes": 0, "announcements_dropped": 0, "memory_refusals": 0}
        self.handlers: dict[type, Callable] = {
            Hello: self.on_hello, Begin: self.on_begin, Put: self.on_put, Commit: self.on_commit,
            Abort: self.on_abort, Acquire: self.on_acquire, Release: self.on_release,
            Subscribe: self.on_subscribe, Read: self.on_read,
            Status: self.on_status, Ping: self.on_ping, Bye: self.on_bye,
        }

    # ------------------------------------------------------------------ dispatch

    def handle(self, identity: bytes, msg: Message) -> Message | None:
        self.counters["requests"] += 1
        peer = self.peers.get(identity)
        if peer is not None:
            peer.last_seen = time.monotonic()
        handler = self.handlers.get(type(msg))
        if handler is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE} is a reply, not a request")
        return handler(identity, msg)

    def _peer(self, identity: bytes, role: str | None = None) -> Peer:
        peer = self.peers.get(identity)
        if peer is None:
            raise StagerError(
                ErrorCode.NOT_REGISTERED,
                "this connection has not said hello (or the daemon restarted); send Hello first",
            )
        if role and peer.role != role:
            raise StagerError(ErrorCode.BAD_MESSAGE, f"only {role} connections may send this; this one is a {peer.role}")
        return peer

    # ------------------------------------------------------------------ staging

    def _staging_version(self, step: int) -> Version:
        v = self.staging.get(step)
        if v is None:
            if step in self.failed:
                raise StagerError(ErrorCode.STEP_FAILED, f"step {step} failed: {self.failed[step]}")
            raise StagerError(ErrorCode.UNKNOWN_STEP, f"step {step} is not being staged; send Begin first")
        return v

    def on_begin(self, identity: bytes, msg: Begin) -> Message | None:
        peer = self._peer(identity, "trainer")
        rank, step = peer.rank, msg.step
        if msg.plan is not None:
            if plan_digest(msg.plan) != msg.digest:
                raise StagerError(ErrorCode.BAD_PLAN, f"rank {rank}: the plan does not match its digest "
                                                      f"{msg.digest[:12]}; digest = blake2b-128 of the msgpack plan")
            self._remember_plan(rank, msg.digest, parse_plan(rank, msg.plan))
        elif (rank, msg.digest) not in self.plans:
            raise StagerError(
                ErrorCode.PLAN_REQUIRED,
                f"the daemon does not know layout {msg.digest[:12]} of rank {rank}; resend Begin with the plan",
            )
        if step in self.failed:
            raise StagerError(ErrorCode.STEP_FAILED, f"step {step} failed: {self.failed[step]}")
        newest = max((s for s, v in self.sealed.items() if v.epoch == self.epoch), default=-1)
        if step <= newest and step not in self.staging:
            raise StagerError(
                ErrorCode.STALE_STEP,
                f"step {step} is not newer than sealed step {newest}; stage increasing step numbers",
            )
        v = self.staging.get(step)
        if v is None and len(self.staging) >= MAX_IN_FLIGHT:
            raise StagerError(
                ErrorCode.MEMORY_LIMIT,
                f"{len(self.staging)} steps are still staging ({sorted(self.staging)}); wait for earlier stages "
                "(handle.wait()) before staging more, or find the rank that does not commit")
        self._retire_abandoned(step)
        if v is None:
            v = self.staging[step] = Version(step, self.epoch, full_world=msg.full_world)
        if rank in v.digests:
            raise StagerError(ErrorCode.BAD_MESSAGE, f"rank {rank} already began step {step}")
        v.digests[rank] = msg.digest
        v.entries[rank] = self.plans[(rank, msg.digest)]
        if msg.shm:
            v.shm_ranks.add(rank)
        v.full_world = v.full_world and msg.full_world
        v.wait_ms = max(v.wait_ms, min(msg.wait_ms, int(self.step_timeout * 1000)))
        v.waiting_begin[rank] = Pending(identity, msg.id)
        self._advance(v)
        return None

    def _remember_plan(self, rank: int, digest: str, entries: list[PlanEntry]) -> None:
        self.plans.pop((rank, digest), None)
        self.plans[(rank, digest)] = entries
        mine = [k for k in self.plans if k[0] == rank]
        for key in mine[:-_PLANS_PER_RANK]:
            del self.plans[key]

    def _retire_abandoned(self, step: int) -> None:
        """A restarted job staging step S abandons older epochs' versions at steps >= S."""
        for s, v in list(self.sealed.items()):
            if v.epoch != self.epoch and s >= step:
                del self.sealed[s]
                if v.leases:
                    self.orphans.add(v)
                else:
                    self._free(v, reuse=True)

    def _advance(self, v: Version) -> None:
        """Fix the step's layout once possible, then its segment, then answer waiting begins."""
        if v.state != "staging":
            return
        try:
            self._advance_unsafe(v)
        except Exception as exc:  # never leave a step half-registered with begins unanswered
            log.exception("step %d: internal error", v.step)
            self.fail(v, f"internal error ({exc.__class__.__name__}: {exc}); please report it",
                      ErrorCode.INTERNAL)

    def _advance_unsafe(self, v: Version) -> None:
        if v.record is None:
            record = self.current
            expected = set(range(self.local_world_size or 0))
            reusable = (record is not None and set(record.digests) == expected
                        and record.full_world == v.full_world
                        and all(record.digests.get(r) == d for r, d in v.digests.items()))
            if not reusable:
                if len(v.digests) < len(expected):
                    return  # a new layout needs every rank's plan
                try:
                    record = self._layout_for(v)
                except ProtocolError as exc:
                    self.fail(v, exc.message, ErrorCode.BAD_PLAN)
                    return
            v.record, v.layout_id, v.layout = record, record.id, record.layout
            self.current = record
            self.budget.current_layout = record.id
        record = v.record
        for r, d in v.digests.items():
            if record.digests.get(r) != d:
                self.fail(v, f"rank {r} changed its state-dict layout at step {v.step} while other ranks did "
                             "not; every rank must stage the same keys and shapes", ErrorCode.BAD_PLAN)
                return
        if v.segment is None:
            try:
                segment = self._take_segment(v.layout_id, v.layout.size)
            except StagerError as exc:
                self.fail(v, exc.message, exc.code)
                return
            if segment is PENDING:
                return  # being created in the background: retried when it is ready
            if segment is None:
                now = time.monotonic()
                if v.wait_deadline is None:
                    v.wait_deadline = now + v.wait_ms / 1000
                if now >= v.wait_deadline:
                    self.counters["memory_refusals"] += 1
                    self.fail(v, self._memory_message(v.layout.size), ErrorCode.MEMORY_LIMIT)
                return
            v.segment = segment
        # steady state rotates keep + 1 segments: create the rest now, off the critical path
        self.budget.prefill(v.layout_id, v.layout.size, self.keep + 1)
        live = self.budget.live(v.layout_id)
        for rank, pending in v.waiting_begin.items():
            peer = self.peers.get(pending.peer)
            send_assignment = peer is not None and v.layout_id not in peer.layouts_sent
            if send_assignment:
                peer.layouts_sent.add(v.layout_id)
            self.send(pending.peer, BeginReply(
                id=pending.rid, step=v.step, segment=v.segment.name, size=v.segment.size, layout=v.layout_id,
                assignment=assignment_to_wire(record.layout.assignments[rank]) if send_assignment else None,
                live_segments=live))
        v.waiting_begin.clear()

    def _layout_for(self, v: Version) -> LayoutRecord:
        key = (tuple(sorted(v.digests.items())), v.full_world)
        record = self.layouts.get(key)
        if record is None:
            plans = {r: self.plans[(r, d)] for r, d in v.digests.items()}
            layout = build_layout(plans, full_world=v.full_world)
            record = LayoutRecord(f"L{next(self._layout_ids)}", layout, dict(v.digests),
                                  [t.to_wire() for t in layout.tensors], v.full_world)
            while len(self.layouts) >= 8:  # old layouts: forget their records (their versions keep refs)
                self.layouts.pop(next(iter(self.layouts)))
            self.layouts[key] = record
            log.info("layout %s: %d tensors, %.1f MiB%s", record.id, len(layout.tensors), layout.size / 2**20,
                     " (partial)" if layout.partial else "")
        return record

    def _take_segment(self, layout_id: str, size: int):
        seg = self.budget.take(layout_id, size)
        while seg is None:  # over budget: make room from unleased older versions
            candidates = reclaim_candidates(self.sealed)
            if not candidates:
                return None
            self._evict(candidates[0])
            seg = self.budget.take(layout_id, size)
        return seg

    def _memory_message(self, size: int) -> str:
        leased = sorted({v.step for _, v in self.leases.values()})
        return (
            f"staging needs {size / 2**20:.1f} MiB but {self.budget.used / 2**20:.1f} of "
            f"{self.budget.limit / 2**20:.1f} MiB are in use (steps in flight: {sorted(self.staging)}, "
            f"leased versions: {leased}); release leases, lower --keep, raise --memory-limit, or pass a "
            "larger wait to StagingClient(backpressure_timeout=...)"
        )

    def on_put(self, identity: bytes, msg: Put) -> Message:
        peer = self._peer(identity, "trainer")
        v = self._staging_version(msg.step)
        if peer.rank not in v.digests or v.segment is None:
            raise StagerError(ErrorCode.BAD_MESSAGE, f"put for step {msg.step} before its begin was answered")
        entries = v.entries[peer.rank]
        assignment = v.layout.assignments[peer.rank]
        seg_bytes = v.segment.as_bytes()
        received = v.put.setdefault(peer.rank, set())
        checked = []
        for index, frame in zip(msg.regions, msg.frames):
            if not 0 <= index < len(entries) or assignment[index] is None:
                raise StagerError(ErrorCode.BAD_MESSAGE, f"rank {peer.rank} is not assigned region {index}")
            entry = entries[index]
            data = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
            dtype = dtype_from_name(entry.dtype)
            if data.nbytes != entry.box.numel * dtype.itemsize:
                raise StagerError(
                    ErrorCode.BAD_MESSAGE,
                    f"{entry.fqn}: got {data.nbytes} bytes, the shard holds {entry.box.numel * dtype.itemsize}",
                )
            checked.append((index, entry, dtype, data))
        for index, entry, dtype, data in checked:  # validate every frame before writing any
            block_offset, block_shape, inner = assignment[index]
            dst = block_view(seg_bytes, dtype, block_offset, block_shape)
            for dim, (start, length) in enumerate(zip(inner, entry.box.shape)):
                dst = dst.narrow(dim, start, length)
            if data.nbytes:
                dst.copy_(torch.frombuffer(data, dtype=dtype).view(entry.box.shape))
            received.add(index)
            self.counters["ingested_bytes"] += data.nbytes
        return Ok()

    def on_commit(self, identity: bytes, msg: Commit) -> Message | None:
        peer = self._peer(identity, "trainer")
        v = self._staging_version(msg.step)
        rank = peer.rank
        if rank not in v.digests or v.segment is None or rank in v.waiting_begin:
            raise StagerError(ErrorCode.BAD_MESSAGE, f"commit for step {msg.step} before its begin was answered")
        if rank in v.committed:
            raise StagerError(ErrorCode.BAD_MESSAGE, f"rank {rank} already committed step {msg.step}")
        assignment = v.layout.assignments[rank]
        if rank not in v.shm_ranks:
            missing = [i for i, a in enumerate(assignment) if a is not None and i not in v.put.get(rank, ())]
            if missing:
                self.fail(v, f"rank {rank} committed without sending {len(missing)} of its regions")
                raise StagerError(ErrorCode.STEP_FAILED, v.reason)
        else:
            self.counters["ingested_bytes"] += v.layout.written_bytes[rank]
        if msg.quant and (v.objects_rank is None or rank < v.objects_rank):
            try:
                quant = check_quant(msg.quant, {t.fqn: (t.dtype, t.shape) for t in v.layout.tensors})
            except StagerError as exc:
                self.fail(v, f"rank {rank}: {exc.message}", exc.code)
                raise
            v.quant = {fqn: spec.wire() for fqn, spec in quant.items()}
        v.committed.add(rank)
        if v.objects_rank is None or rank < v.objects_rank:  # the lowest rank's non-tensor state wins
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
        peer = self._peer(identity, "trainer")
        v = self._staging_version(msg.step)
        self.fail(v, f"rank {peer.rank} aborted step {msg.step}: {msg.reason}")
        return Ok()

    def _seal(self, v: Version) -> None:
        v.state, v.sealed_at = "sealed", time.monotonic()
        del self.staging[v.step]
        self.sealed[v.step] = v
        if any(s > v.step for s in self.sealed):  # steps sealed out of order: keep step order
            self.sealed = OrderedDict(sorted(self.sealed.items()))
        self.counters["sealed"] += 1
        self.seq += 1
        v.seq = self.seq
        reply = Sealed(step=v.step, nbytes=v.layout.nbytes, tensors=len(v.layout.tensors), partial=v.layout.partial)
        for pending in v.waiting_commit.values():
            reply.id = pending.rid
            self.send(pending.peer, reply)
        v.waiting_commit.clear()
        self.announce(v)
        log.info("sealed step %d (%.1f MiB, %d tensors)", v.step, v.layout.nbytes / 2**20, len(v.layout.tensors))
        self.enforce_retention()

    def fail(self, v: Version, reason: str, code: ErrorCode = ErrorCode.STEP_FAILED) -> None:
        if v.state != "staging":
            return
        v.state, v.reason = "failed", reason
        self.staging.pop(v.step, None)
        self.failed[v.step] = reason
        while len(self.failed) > 32:
            self.failed.popitem(last=False)
        self.counters["failed"] += 1
        err = ErrorReply(code=code.value, message=reason)
        for pending in [*v.waiting_begin.values(), *v.waiting_commit.values()]:
            err.id = pending.rid
            self.send(pending.peer, err)
        v.waiting_begin.clear()
        v.waiting_commit.clear()
        if v.segment is not None:  # never pooled: a slow rank may still be writing into it
            self.budget.destroy(v.segment)
            v.segment = None
        log.warning("step %d failed: %s", v.step, reason)
        self.retry_waiting()

    # ------------------------------------------------------------------ retention

    def _free(self, v: Version, *, reuse: bool) -> None:
        if v.segment is not None:
            self.budget.give_back(v.segment, reuse=reuse)
            v.segment = None

    def _evict(self, v: Version) -> None:
        self.sealed.pop(v.step, None)
        self._free(v, reuse=True)
        log.debug("evicted step %d", v.step)

    def enforce_retention(self) -> None:
        for v in evictable(self.sealed, self.keep):
            self._evict(v)
        self.retry_waiting()

    def retry_waiting(self) -> None:
        """Advance steps waiting for memory or for a segment being created."""
        for v in list(self.staging.values()):
            if v.segment is None and v.layout is not None:
                self._advance(v)

    def collect_segments(self) -> None:
        """Called by the loop while segments are being created: hand finished ones to waiting steps."""
        if self.budget.collect():
            self.retry_waiting()

    # ------------------------------------------------------------------ status & housekeeping

    def on_ping(self, identity: bytes, msg: Ping) -> Message:
        return Pong(session=self.session)

    def on_status(self, identity: bytes, msg: Status) -> Message:
        return StatusReply(status=self.status())

    def status(self) -> dict:
        return {
            "session": self.session,
            "pid": os.getpid(),
            "epoch": self.epoch,
            "versions": [v.summary() for v in self.sealed.values()]
            + [v.summary() for v in self.staging.values()]
            + [{"step": s, "state": "failed", "reason": r} for s, r in self.failed.items()],
            "ranks": {str(p.rank): {"pid": p.pid, "local": p.local}
                      for p in self.peers.values() if p.role == "trainer"},
            "local_world_size": self.local_world_size,
            "readers": sum(1 for p in self.peers.values() if p.role == "reader"),
            "leases": len(self.leases),
            "memory": {"used": self.budget.used, "limit": self.budget.limit,
                       "pooled": sum(s.size for segs in self.budget.pool.values() for s in segs)},
            "keep": self.keep,
            "retention": {
                "policy": RETENTION_POLICY,
                "leased_steps": sorted({v.step for _, v in self.leases.values()}),
                "waiting_for_memory": sorted(s for s, v in self.staging.items() if v.wait_deadline is not None),
            },
            "subscribers": len(self.subscribers),
            "seq": self.seq,
            "counters": dict(self.counters),
            "cpu_seconds": time.process_time(),  # ns resolution; psutil's ticks are 10 ms
        }

    def housekeep(self) -> None:
        self.collect_segments()
        now = time.monotonic()
        if now >= self._next_liveness:  # reading /proc for every peer: once a second is plenty
            self._next_liveness = now + LIVENESS_INTERVAL_S
            for peer in list(self.peers.values()):
                if not self._alive(peer):
                    self.drop_peer(peer, "process exited" if peer.local else f"silent for {self.peer_timeout:.0f}s")
        for v in list(self.staging.values()):
            if now - v.started > self.step_timeout:
                expected = set(v.record.digests) if v.record else set(self.ranks) | set(v.digests)
                self.fail(v, f"step {v.step} timed out after {self.step_timeout:.0f}s: ranks "
                             f"{sorted(expected - v.committed)[:32]} did not commit (began: {sorted(v.digests)[:32]}); "
                             "a rank is stuck or gone, or --step-timeout is too short")
            elif v.segment is None and v.layout is not None:
                self._advance(v)

    def close(self) -> None:
        for v in list(self.staging.values()):
            self.fail(v, "the daemon is shutting down")
        self.budget.close()
