"""The daemon's request handlers, composed: one object per concern over one shared state.

``Handlers`` wires :class:`~.peers.Peers` (registration, liveness), :class:`~.steps.Steps`
(staging and sealing), :class:`~.reading.Reading` (leases, subscriptions, remote reads) and
:class:`~.memory.Retention` (budget and retention) together, routes each request type to the
method that owns it, and answers the small admin requests (status, ping) itself.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from stager.protocol import (
    Abort, Acquire, Begin, Bye, Commit, ErrorCode, Hello, Message, Ping, Pong, ProtocolError, Put, Read, Release,
    Status, StatusReply, Subscribe,
)
from stager.protocol.job import JobInfo, Join

from .membership import JobMembership
from .memory import Retention, SegmentBudget
from .peers import Peers
from .reading import Reading
from .state import DaemonState, Send, SendTracked
from .steps import Steps


class Handlers:
    """Everything the socket loop calls: :meth:`handle` per request, :meth:`housekeep` per tick."""

    def __init__(self, *, budget: SegmentBudget, send: Send, send_tracked: SendTracked, keep: int,
                 step_timeout: float, peer_timeout: float, host_id: str, session: str, advertise: str):
        self.state = state = DaemonState(send=send, send_tracked=send_tracked, keep=keep, step_timeout=step_timeout,
                                         peer_timeout=peer_timeout, host_id=host_id, session=session)
        self.memory = Retention(state, budget)
        self.peers = Peers(state, end_lease=lambda lease: self.reading.end_lease(lease),
                           fail_step=lambda v, reason: self.steps.fail(v, reason))
        self.reading = Reading(state, self.peers, self.memory)
        self.steps = Steps(state, self.peers, self.memory, announce=self.reading.announce)
        self.memory.on_freed = self.steps.retry_waiting
        self.job = JobMembership(state, advertise)
        self.routes: dict[type, Callable[[bytes, Message], Message | None]] = {
            Hello: self.peers.on_hello, Bye: self.peers.on_bye,
            Begin: self.steps.on_begin, Put: self.steps.on_put, Commit: self.steps.on_commit,
            Abort: self.steps.on_abort,
            Acquire: self.reading.on_acquire, Release: self.reading.on_release,
            Subscribe: self.reading.on_subscribe, Read: self.reading.on_read,
            Status: self.on_status, Ping: self.on_ping,
            Join: self.job.on_join, JobInfo: self.job.on_job_info,
        }

    def handle(self, identity: bytes, msg: Message) -> Message | None:
        self.peers.seen(identity)
        handler = self.routes.get(type(msg))
        if handler is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE} is a reply, not a request")
        return handler(identity, msg)

    def housekeep(self) -> None:
        self.memory.collect()
        self.peers.check_liveness()
        self.steps.check_timeouts()
        self.reading.resume_deferred()

    def collect_segments(self) -> None:
        self.memory.collect()

    def on_ping(self, identity: bytes, msg: Ping) -> Message:
        if msg.id == 0:  # a heartbeat: a connection without a session (ended for silence) is told why
            self.peers.get(identity)
        return Pong(session=self.state.session)

    def on_status(self, identity: bytes, msg: Status) -> Message:
        return StatusReply(status=self.status())

    def status(self) -> dict:
        state, budget = self.state, self.memory.budget
        return {
            "session": state.session,
            "pid": os.getpid(),
            "epoch": state.epoch,
            "versions": [v.summary() for v in state.sealed.values()]
            + [v.summary() for v in state.staging.values()]
            + [{"step": s, "state": "failed", "reason": r} for s, r in state.failed.items()],
            "ranks": {str(p.rank): {"pid": p.pid, "local": p.local}
                      for p in state.peers.values() if p.role == "trainer"},
            "local_world_size": state.local_world_size,
            "readers": sum(1 for p in state.peers.values() if p.role == "reader"),
            "reads": {"bytes_in_flight": sum(p.read_bytes_in_flight() for p in state.peers.values()),
                      "deferred": sum(len(p.deferred_reads) for p in state.peers.values())},
            "leases": len(state.leases),
            "memory": {"used": budget.used, "limit": budget.limit,
                       "pooled": sum(s.size for segs in budget.pool.values() for s in segs),
                       "draining": sum(s.size for s in budget.draining),
                       "preallocated": budget.reserve.size if budget.reserve is not None else 0},
            "keep": state.keep,
            "peer_timeout": state.peer_timeout,
            "node": state.host_id,
            "job": self.job.status(),
            "retention": self.memory.status(),
            "subscribers": len(state.subscribers),
            "seq": state.seq,
            "counters": dict(state.counters),
            "cpu_seconds": time.process_time(),  # ns resolution; psutil's ticks are 10 ms
        }

    def close(self) -> None:
        self.steps.close()
        self.memory.budget.close()
