"""Replies and liveness: the steps committed but not yet sealed, and whether the daemon is there.

The :class:`SealTracker` owns the pending-commit table (request id -> handle, seal deadline,
connection generation), completes or fails handles from Sealed / ErrorReply messages, and
keeps the daemon honest with pings: every second while a seal is due (a restarted daemon
answers with a new session, and its predecessor's steps are lost), every ``keepalive_s`` when
idle (a daemon on another host drops peers it has not heard from). Whatever the reason a seal
can no longer arrive (disconnect, socket reset, restart, silence, deadline), the handle fails
at once rather than waiting out its own timeout.

Time is passed in (``now``), never read here, so every expiry is testable without sleeping.
"""

from __future__ import annotations

import logging

from stager.protocol import ErrorCode, ErrorReply, Ping, Pong, Sealed, StagerError

from .handle import StageHandle

log = logging.getLogger("stager.client")
SEAL_PING_S = 1.0  # ping interval while a seal is due: a restart is noticed within about a second


def report(handle: StageHandle, error: StagerError) -> None:
    """Fail ``handle`` with ``error`` and log it (non-strict clients see staging errors only here)."""
    log.warning("staging step %d failed: %s", handle.step, error)
    handle.fail(error)


class SealTracker:
    """Pending commits and pings of one connection; runs on the worker thread only."""

    def __init__(self, conn, seal_timeout: float) -> None:
        self.conn, self.seal_timeout = conn, seal_timeout
        self.pending: dict[int, tuple] = {}  # commit request id -> (handle, deadline, connection generation)
        self.generation = conn.generation
        self.ping_id: int | None = None
        self.last_ping = 0.0

    @property
    def awaiting(self) -> bool:
        """True while a reply is due (a seal or a pong): the worker then watches the socket."""
        return bool(self.pending) or self.ping_id is not None

    def add(self, rid: int, handle: StageHandle, now: float) -> None:
        """Track the Commit sent as request ``rid``: sealed by ``now + seal_timeout`` or failed."""
        self.pending[rid] = (handle, now + self.seal_timeout, self.conn.generation)

    def on_reply(self, reply) -> None:
        """Any message from the daemon that is not the answer to a blocking request."""
        entry = self.pending.pop(reply.id, None)
        if entry is not None:
            handle = entry[0]
            if isinstance(reply, Sealed):
                handle.seal(
                    {"step": reply.step, "nbytes": reply.nbytes, "tensors": reply.tensors, "partial": reply.partial}
                )
            elif isinstance(reply, ErrorReply):
                report(handle, reply.to_exception())
            else:
                report(handle, StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {reply.TYPE} reply to commit"))
            return
        if isinstance(reply, Pong) and reply.id == self.ping_id:
            self.ping_id = None
            if self.conn.session is not None and reply.session != self.conn.session:
                self.conn.session = None  # the next request says hello to the new daemon
                self.fail_all(ErrorCode.UNAVAILABLE, "the daemon restarted; the step was lost")

    def fail_all(self, code: ErrorCode, message: str) -> None:
        pending, self.pending = self.pending, {}
        for handle, _, _ in pending.values():
            report(handle, StagerError(code, f"step {handle.step}: {message}"))

    def on_lost(self, upto: int) -> None:
        """The connection dropped (the monitor said so, wherever it was read): every commit sent
        as request ``upto`` or earlier can never be sealed, nor a ping that old be answered."""
        if self.ping_id is not None and self.ping_id <= upto:
            self.ping_id = None
        for rid in [rid for rid in self.pending if rid <= upto]:
            handle = self.pending.pop(rid)[0]
            report(
                handle,
                StagerError(
                    ErrorCode.UNAVAILABLE,
                    f"step {handle.step}: lost the connection to the daemon before the step was sealed",
                ),
            )

    def check_connection(self) -> None:
        """Read the socket monitor; a disconnect while seals are due fails them (the daemon is gone)."""
        was_connected = self.conn.connected
        if not self.conn.poll_monitor(0) and was_connected and self.pending:
            self.fail_all(ErrorCode.UNAVAILABLE, "lost the connection to the daemon before the step was sealed")

    def maintain(self, now: float, *, keepalive_s: float, ping_timeout_s: float) -> None:
        """Expire what can no longer be sealed, and ping when one is due."""
        if self.conn.generation != self.generation:  # the socket was reset: its requests are lost
            self.generation = self.conn.generation
            self.ping_id = None
            for rid, (handle, _, gen) in list(self.pending.items()):
                if gen != self.generation:
                    del self.pending[rid]
                    report(
                        handle,
                        StagerError(
                            ErrorCode.UNAVAILABLE,
                            f"step {handle.step}: the connection to the daemon was reset before the step was sealed",
                        ),
                    )
        for rid, (handle, deadline, _) in list(self.pending.items()):
            if now >= deadline:
                del self.pending[rid]
                report(
                    handle,
                    StagerError(ErrorCode.TIMEOUT, f"step {handle.step} not sealed within {self.seal_timeout:.0f}s"),
                )
        # ping every second while a seal is due (a restarted daemon shows a new session), and every
        # keepalive_s when idle so a daemon on another host does not take this rank for dead
        interval = SEAL_PING_S if self.pending else keepalive_s
        if self.conn.session is not None and self.conn.connected and now - self.last_ping > interval:
            if self.ping_id is not None and now - self.last_ping > ping_timeout_s:
                self.conn.reset(silent_since=self.last_ping)
                self.fail_all(ErrorCode.UNAVAILABLE, "the daemon stopped answering")
                self.ping_id = None
                return
            if self.ping_id is not None:
                return  # still waiting for the last one
            try:
                self.ping_id = self.conn.send(Ping())
            except StagerError:
                self.ping_id = None
            self.last_ping = now
