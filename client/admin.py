"""Admin requests any tool may send: the daemon's status, as one call.

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
