"""Admin requests any tool may send: the daemon's status, and its multi-node job's, as one call each.

>>> daemon_status("ipc:///tmp/stager.sock")["versions"]  # doctest: +SKIP
[{'step': 4, 'state': 'sealed', ...}]
"""

from __future__ import annotations

from stager.protocol import ErrorCode, StagerError, Status, StatusReply

from .connection import Connection


def daemon_status(endpoint: str | None = None, timeout: float = 5.0) -> dict:
    """The status of the daemon at ``endpoint`` (default: ``$STAGER_ENDPOINT`` or the per-user
    socket); raises StagerError (UNAVAILABLE, TIMEOUT) when it does not answer."""
    conn = Connection(endpoint, role="admin")
    try:
        reply = conn.request(Status(), timeout)  # says hello first: waits (briefly) for the connection
        if not isinstance(reply, StatusReply):
            raise StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {reply.TYPE} reply to status")
        return reply.status
    finally:
        conn.close()


def job_status(endpoint: str | None = None, timeout: float = 5.0) -> dict | None:
    """The multi-node job of the daemon at ``endpoint``, asked of every node at once: ``{"job",
    "node" (the one asked), "complete" (steps every node sealed), "nodes": {id: {"endpoint",
    "sealed", "staging", "failed"} or {"endpoint", "down": why}}}``; None when it is in no job."""
    from stager.protocol.job import JobInfo, JobInfoReply

    from .readers.assembly import complete_steps
    from .readers.job import JobReader

    conn = Connection(endpoint, role="admin")
    reader = None
    try:
        info = conn.request(JobInfo(), timeout)
        if not isinstance(info, JobInfoReply):
            raise StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {info.TYPE} reply to job_info")
        if not info.job:
            return None
        reader = JobReader(conn, info, timeout, make_source=None)
        states, down = reader.states()
        nodes = {n: ({"endpoint": e, "down": down[n]} if n in down else
                     {"endpoint": e, "sealed": states[n].sealed, "staging": states[n].staging,
                      "failed": states[n].failed}) for n, e in info.nodes.items()}
        complete = complete_steps({n: r.sealed for n, r in states.items()}, {n: r.failed for n, r in states.items()})
        return {"job": info.job, "node": info.node, "complete": [] if down else complete, "nodes": nodes}
    finally:
        if reader is not None:
            reader.close()
        conn.close()
