"""Multi-node jobs on the daemon side: which job this node belongs to, and what it holds.

A trainer rank's :class:`~stager.protocol.job.Join` (sent once at its client's construction,
and again after this daemon restarts) records the job's membership: the job id, every node's
id and the endpoint its daemon serves other nodes on. Daemons never talk to each other: a
reader asks any of them for the membership and each node's steps
(:class:`~stager.protocol.job.JobInfo`) and assembles complete versions itself
(``client/readers/job_reader.py``), so a node's daemon stays a single-threaded loop with no outbound
connections, and nothing here can be slowed by another node.
"""

from __future__ import annotations

import dataclasses
import logging

from stager.protocol import ErrorCode, Message, Ok, StagerError
from stager.protocol.job import MAX_STEPS, JobInfo, JobInfoReply, Join

from .state import DaemonState
from .status import JobStatus

log = logging.getLogger("stager.daemon")


@dataclasses.dataclass(frozen=True)
class Membership:
    """The job this node belongs to (as its trainers last said)."""

    job: str
    nodes: dict  # node id -> endpoint
    ranks: dict  # node id -> global ranks
    world_size: int


class JobMembership:
    """Answers Join and JobInfo; :attr:`current` is None until a trainer joins a job."""

    def __init__(self, state: DaemonState, advertise: str):
        self.state, self.advertise = state, advertise
        self.current: Membership | None = None
        # epoch -> the job its trainers joined: a job restarted under the same id (STAGER_JOB_ID, after a
        # crash) starts a new epoch on every node, and its earlier versions are still its own (restore)
        self.jobs: dict[int, str] = {}

    def on_join(self, identity: bytes, msg: Join) -> Message:
        state = self.state
        peer = state.peers.get(identity)
        if peer is None or peer.role != "trainer":
            raise StagerError(
                ErrorCode.BAD_VALUE,
                "join: only a training rank (role trainer) may say which job "
                "this node belongs to; connect with StagingClient",
            )
        if msg.node != state.host_id:
            raise StagerError(
                ErrorCode.BAD_VALUE,
                f"join: this daemon is node {state.host_id!r}, not {msg.node!r}; "
                "ask the daemon for its node id (JobInfo) before joining",
            )
        new = Membership(msg.job, dict(msg.nodes), {n: list(r) for n, r in msg.ranks.items()}, msg.world_size)
        self.jobs[state.epoch] = msg.job
        if new != self.current:
            if self.current is not None and self.current.job != new.job:
                log.info("job %s replaced by job %s", self.current.job, new.job)
            log.info("node %s joined job %s (%d nodes)", msg.node, msg.job, len(msg.nodes))
            self.current = new
        return Ok()

    def on_job_info(self, identity: bytes, msg: JobInfo) -> Message:
        state, m = self.state, self.current
        # the current job's steps only: versions of another job on this node are no part of it; those
        # of the same job before it restarted (same job id, an earlier epoch) are
        epochs = {e for e, job in self.jobs.items() if m is not None and job == m.job} | {state.epoch}
        return JobInfoReply(
            job=m.job if m else "",
            node=state.host_id,
            endpoint=self.advertise,
            nodes=dict(m.nodes) if m and msg.members else {state.host_id: self.advertise},
            sealed=[s for s, v in state.sealed.items() if v.epoch in epochs][-MAX_STEPS:],
            staging=sorted(s for s, v in state.staging.items() if v.epoch == state.epoch)[-MAX_STEPS:],
            failed=list(state.failed)[-MAX_STEPS:],
        )

    def status(self) -> JobStatus | None:
        m = self.current
        if m is None:
            return None
        return {
            "job": m.job,
            "node": self.state.host_id,
            "advertise": self.advertise,
            "nodes": dict(m.nodes),
            "ranks": dict(m.ranks),
            "world_size": m.world_size,
        }
