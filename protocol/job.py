"""The wire messages of multi-node jobs (Join, JobInfo, JobInfoReply): how the daemons of one
job act as one store. (The client joins in ``client/hook/job_join.py``; the daemon keeps the
membership in ``stager/daemon/membership.py``; readers read through ``client/readers/job_reader.py``.)

A job spans nodes; each node runs its own daemon and seals the regions its ranks hold. Once, at
construction, the training client tells its daemon who is in the job (:class:`Join`: the job
id, every node's identity and the endpoint its daemon serves other nodes on, which global ranks
run where). Daemons never talk to each other: a reader asks any daemon of the job for the
membership and each node's steps (:class:`JobInfo`), leases the step on every node, and reads
each region from the node that holds it. Step S of the job is complete when every node sealed
its part of S: a node that fails S never seals it, so no reader ever sees S as complete.
"""

from __future__ import annotations

import dataclasses

from .errors import ErrorCode, ProtocolError, short_repr
from .frames import Message, message

MAX_NODES = 4096
MAX_ID = 200  # characters of a job or node id
MAX_STEPS = 1024  # steps listed per node in a job_info_reply


def _check_id(what: str, value: object) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"{what} must be a non-empty string of at most {MAX_ID} characters, not {short_repr(value)}",
        )


def _check_endpoint(node: object, endpoint: object) -> None:
    if not isinstance(endpoint, str) or not endpoint.startswith(("ipc://", "tcp://")) or len(endpoint) > 1000:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"node {short_repr(node)} needs an endpoint like "
            f"tcp://host:port or ipc:///path, not {short_repr(endpoint)}",
        )


def _check_steps(what: str, steps: object) -> None:
    if not isinstance(steps, list) or len(steps) > MAX_STEPS or not all(type(s) is int and s >= 0 for s in steps):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{what} must be a list of at most {MAX_STEPS} step numbers >= 0")


def check_members(where: str, node: str, nodes: object) -> None:
    """``nodes`` (node id -> endpoint) lists 1 to MAX_NODES nodes with valid ids and endpoints,
    ``node`` among them."""
    _check_id(f"{where}: node", node)
    if not isinstance(nodes, dict) or not 0 < len(nodes) <= MAX_NODES or node not in nodes:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"{where}: nodes must map 1 to {MAX_NODES} node ids to endpoints, "
            f"this node ({short_repr(node)}) among them",
        )
    for other, endpoint in nodes.items():
        _check_id(f"{where}: a node id", other)
        _check_endpoint(other, endpoint)


@message("join")
class Join(Message):
    """A trainer rank tells its daemon the job it belongs to: ``nodes``, node id -> the endpoint
    its daemon serves the other nodes on; ``ranks``, node id -> the global ranks running there."""

    job: str = ""
    node: str = ""  # the receiving daemon's own node id
    nodes: dict = dataclasses.field(default_factory=dict)
    ranks: dict = dataclasses.field(default_factory=dict)
    world_size: int = 1

    def check(self) -> None:
        _check_id("join: job", self.job)
        check_members("join", self.node, self.nodes)
        if type(self.world_size) is not int or not 0 < self.world_size <= 1 << 20:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "join: world_size must be an int in [1, 2**20]")
        if set(self.ranks) != set(self.nodes) or not all(
            isinstance(r, list)
            and 0 < len(r) <= self.world_size
            and all(type(x) is int and 0 <= x < self.world_size for x in r)
            for r in self.ranks.values()
        ):
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                "join: ranks must give every node of nodes its global ranks (ints in [0, world_size))",
            )


@message("job_info")
class JobInfo(Message):
    """Ask a daemon which job it belongs to, where the other nodes are and which steps it holds.
    ``members`` False: the steps only (the reply's ``nodes`` names the answering node alone), what
    a reader asks every node for on each acquire once it knows the membership."""

    members: bool = True


@message("job_info_reply")
class JobInfoReply(Message):
    """``job`` empty: the daemon belongs to no multi-node job (``nodes`` then names this node
    only). ``endpoint``: where other nodes reach this daemon. ``sealed`` / ``staging`` /
    ``failed``: this node's steps held sealed (oldest first), in flight, and failed recently."""

    job: str = ""
    node: str = ""
    endpoint: str = ""
    nodes: dict = dataclasses.field(default_factory=dict)
    sealed: list = dataclasses.field(default_factory=list)
    staging: list = dataclasses.field(default_factory=list)
    failed: list = dataclasses.field(default_factory=list)

    def check(self) -> None:
        check_members("job_info_reply", self.node, self.nodes)
        _check_endpoint(self.node, self.endpoint)
        if self.job:
            _check_id("job_info_reply: job", self.job)
        for name in ("sealed", "staging", "failed"):
            _check_steps(f"job_info_reply: {name}", getattr(self, name))
