"""Joining a multi-node job: once, at the client's construction, over the trainer's own process group.

Each rank asks its daemon for its node id and the endpoint other nodes reach it on
(:class:`~stager.protocol.job.JobInfo`), all ranks exchange these records in one all_gather
(msgpack bytes in uint8 tensors over a gloo group: never pickle), and each rank tells its daemon
the whole membership (:class:`~stager.protocol.job.Join`); the training connection sends the same
Join again after its daemon restarts. Nobody types node lists. The job id is
``job=``, else ``$STAGER_JOB_ID``, else a token rank 0 drew for this run: two jobs on the same
nodes never mix. Every rank takes part in the exchange even when its own daemon did not answer
(its record is then empty), so no rank ever waits in a collective for another.
"""

from __future__ import annotations

import logging
import os
import secrets

import msgpack
import torch

from stager.protocol import ErrorCode, Ok, StagerError
from stager.protocol.job import JobInfo, JobInfoReply, Join

from ..connection import Connection

log = logging.getLogger("stager.client")
JOB_ENV = "STAGER_JOB_ID"


def merge_members(records: list[dict]) -> tuple[dict[str, str], dict[str, list[int]]]:
    """From every rank's record ``{"node", "endpoint", "rank"}`` (``{}``: its daemon did not answer),
    the job's nodes (id -> endpoint, in order of their lowest rank) and ranks per node. Two
    daemons claiming one node id is a misconfiguration, reported with how to fix it.

    >>> merge_members([{"node": "a", "endpoint": "ipc://a", "rank": 0},
    ...                {"node": "b", "endpoint": "ipc://b", "rank": 1}])
    ({'a': 'ipc://a', 'b': 'ipc://b'}, {'a': [0], 'b': [1]})
    """
    nodes: dict[str, str] = {}
    ranks: dict[str, list[int]] = {}
    for record in sorted((r for r in records if r), key=lambda r: r["rank"]):
        node, endpoint = record["node"], record["endpoint"]
        if nodes.setdefault(node, endpoint) != endpoint:
            raise StagerError(
                ErrorCode.BAD_VALUE,
                f"two daemons ({nodes[node]} and {endpoint}) say they are node "
                f"{node!r}; give each node's daemon its own id (STAGER_HOST_ID or "
                "`stager serve --host-id`) when several run on one machine",
            )
        ranks.setdefault(node, []).append(record["rank"])
    return nodes, ranks


_GLOO: dict = {}  # the default group -> a gloo group over the same ranks, made once (a collective)


def _gloo_group():
    import torch.distributed as dist

    key = id(dist.group.WORLD)
    if key not in _GLOO:
        _GLOO.clear()  # a new default group (re-initialized): the old one's gloo group is stale
        _GLOO[key] = dist.new_group(backend="gloo")
    return _GLOO[key]


def all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's ``data``, over a gloo group (the default one when it is gloo)."""
    import torch.distributed as dist

    group = None if dist.get_backend() == "gloo" else _gloo_group()
    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
    out = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [bytes(t[: int(n)].numpy()) for t, n in zip(out, sizes)]


def join_job(conn: Connection, *, job: str | None, timeout: float) -> Join:
    """Tell this rank's daemon, over the rank's own training connection ``conn``, the job's
    membership (a collective: every rank of the job calls it). Returns the Join sent, or raises
    StagerError when a daemon could not be reached or refused."""
    import torch.distributed as dist

    record, error = {}, None
    try:
        info = conn.request(JobInfo(), timeout, expect=JobInfoReply)
        record = {"node": info.node, "endpoint": info.endpoint, "rank": dist.get_rank(), "token": secrets.token_hex(8)}
    except StagerError as exc:
        error = exc  # still take part in the exchange: the other ranks must not wait for this one
    records = [msgpack.unpackb(b) if b else {} for b in all_gather_bytes(msgpack.packb(record) if record else b"")]
    if error is not None:
        raise error
    missing = [rank for rank, r in enumerate(records) if not r]
    if missing:  # every rank sees the same records: all of them give up, none joins a job with a hole
        raise StagerError(
            ErrorCode.UNAVAILABLE,
            f"ranks {missing[:16]} could not reach their daemons; the job was "
            "not joined (each node's versions stay partial)",
        )
    nodes, ranks = merge_members(records)
    job_id = job or os.environ.get(JOB_ENV) or records[0]["token"]
    msg = Join(job=job_id, node=record["node"], nodes=nodes, ranks=ranks, world_size=dist.get_world_size())
    conn.request(msg, timeout, expect=Ok)
    log.info("joined job %s as node %s (%d nodes)", job_id, record["node"], len(nodes))
    return msg
