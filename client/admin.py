"""Admin requests any tool may send: the daemon's status, and its multi-node job's, as one call each.

>>> daemon_status("ipc:///tmp/stager.sock")["versions"]  # doctest: +SKIP
[{'step': 4, 'state': 'sealed', ...}]
"""

from __future__ import annotations

import time

from stager.protocol import Status, StatusReply

from .connection import Connection


def daemon_status(endpoint: str | None = None, timeout: float = 5.0) -> dict:
    """The status of the daemon at ``endpoint`` (default: ``$STAGER_ENDPOINT`` or the per-user
    socket); raises StagerError (UNAVAILABLE, TIMEOUT) when it does not answer."""
    conn = Connection(endpoint, role="admin")
    try:
        # says hello first: waits (briefly) for the connection
        return conn.request(Status(), timeout, expect=StatusReply).status
    finally:
        conn.close()


def job_status(endpoint: str | None = None, timeout: float = 5.0) -> dict | None:
    """The multi-node job of the daemon at ``endpoint``, asked of every node at once: ``{"job",
    "node" (the one asked), "complete", "readable", "nodes": {id: {"endpoint", "sealed", "staging",
    "failed"} or {"endpoint", "down": why, and what it said last: "sealed", "failed", "last_seen_s"}}}``;
    None when it is in no job. ``complete``: the steps every node sealed and none failed, a node
    that does not answer counting with what it last answered a status on this host (see
    :mod:`stager.client.last_answers`), as a reader's ``latest()`` counts it; ``readable``: those of them a
    reader can lease now (every region held by a node that answers: replicas)."""
    from . import last_answers
    from .readers.job_reader import JobReader

    reader = JobReader(endpoint, timeout, role="admin")  # admin: its leases read nothing
    try:
        reader.members()
        if not reader.job:
            return None
        remembered = last_answers.load(reader.job, reader.nodes)
        reader.last.update({n: r for n, (r, _) in remembered.items()})
        states, down = reader.states()
        now = time.time()
        last_answers.save(reader.job, {**remembered, **{n: (r, now) for n, r in states.items()}})
        complete, _ = reader.known_complete(states)
        nodes: dict[str, dict] = {}
        for n, e in reader.nodes.items():
            if n not in down:
                nodes[n] = {
                    "endpoint": e,
                    "sealed": states[n].sealed,
                    "staging": states[n].staging,
                    "failed": states[n].failed,
                }
                continue
            nodes[n] = {"endpoint": e, "down": down[n]}
            if n in remembered:  # not "staging": what it had in flight then is no part of any answer now
                said, at = remembered[n]
                nodes[n].update(sealed=said.sealed, failed=said.failed, last_seen_s=round(max(0.0, now - at), 1))
        readable = reader.readable(complete, states, down) if down else complete
        return {"job": reader.job, "node": reader.node, "complete": complete, "readable": readable, "nodes": nodes}
    finally:
        reader.close()
