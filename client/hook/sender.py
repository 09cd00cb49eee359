"""Sending: the requests of one step, in order Begin -> (Put ...) -> Commit, or Abort.

The :class:`Sender` owns the request side of the connection for staging: saying hello when the
daemon does not know this rank, choosing shared memory or frames, which plans the daemon has
already seen (so Begin carries only the digest), the assignments the daemon handed out per
layout, and the host buffers behind in-flight Put frames. Replies to Commit arrive later and
belong to :class:`~.replies.SealTracker`; the sender only returns the Commit's request id.
"""

from __future__ import annotations

import ctypes
import math

from stager.protocol import (
    Abort,
    Begin,
    BeginReply,
    Commit,
    ErrorCode,
    Ok,
    Put,
    RemoteError,
    StagerError,
)
from stager.protocol.layout import PlanEntry

from ..connection import Connection

# A Begin that carries the plan is transferred, decoded, digest-checked and laid out on the daemon's
# one thread before anything (the answer to a ping sent after it) can say it arrived: its first sign
# of life may come this much later per plan entry. Measured with a real daemon on a loaded 2-core
# host: 0.75 s per 1e4 entries for the whole begin (1.6 s of 7.5 s for 1e5 entries was decoding);
# allowed: about 3x that, so a daemon only slow at it is not taken for hung (and the first step of
# every new layout, and every step after a daemon restart, skipped). A hung daemon is still found.
PLAN_ACK_S_PER_ENTRY = 2e-4


class Sender:
    """Talks the staging requests of one rank over ``conn`` (the worker thread's connection)."""

    def __init__(self, conn: Connection, *, full_world: bool, timeout: float, wait_ms: int, transport: str):
        self.conn = conn
        self.full_world = full_world
        self.timeout = timeout
        self.wait_ms, self.transport = wait_ms, transport
        self.plans_sent: set[tuple[str, str]] = set()  # (daemon session, digest) the daemon knows
        self.assignments: dict[tuple[str, str], list] = {}  # (session, layout) -> placements per entry
        self.put_buffers: list = []  # host copies behind the latest Put frames (see _send_put)

    def connect(self) -> bool:
        """Say hello if the daemon does not know this rank; True: write through shared memory."""
        if self.conn.session is None:
            self.conn.hello(self.timeout)
        return self.transport == "shm" or (self.transport == "auto" and self.conn.same_host)

    def begin(self, step: int, plan: list[PlanEntry], digest: str, shm: bool) -> BeginReply:
        """Ask where ``step`` goes. The plan travels only when this daemon session has not seen its
        digest; a PLAN_REQUIRED answer (the daemon forgot it) resends with the plan, NOT_REGISTERED
        (a restarted daemon, or one that dropped a silent peer) says hello again first."""
        for attempt in range(2):
            sent_key = (self.conn.session, digest)
            with_plan = sent_key not in self.plans_sent or attempt > 0
            msg = Begin(
                step=step,
                digest=digest,
                plan=tuple(plan) if with_plan else None,
                full_world=self.full_world,
                shm=shm,
                wait_ms=self.wait_ms,
            )
            ack = self.conn.ack_timeout
            if with_plan and ack is not None:
                ack += len(plan) * PLAN_ACK_S_PER_ENTRY
            try:
                # back-pressure: the daemon may hold the answer up to wait_ms on top of the timeout
                reply = self.conn.request(msg, self.timeout + self.wait_ms / 1000, expect=BeginReply, ack_timeout=ack)
            except RemoteError as exc:
                if exc.code == ErrorCode.PLAN_REQUIRED and attempt == 0:
                    continue
                if exc.code in (ErrorCode.NOT_REGISTERED, ErrorCode.SESSION_EXPIRED) and attempt == 0:
                    self.conn.hello(self.timeout)  # the daemon dropped us (restart, silence): register again
                    continue
                raise
            self.plans_sent.add((self.conn.session, digest))
            return reply
        raise StagerError(ErrorCode.INTERNAL, "unreachable")

    def assignment(self, reply: BeginReply, entries: int) -> list:
        """This rank's placements for ``reply``'s layout: the reply's own when it carries one (a new
        layout), else the one remembered for that layout in this daemon session."""
        key = (self.conn.session, reply.layout)
        if reply.assignment is not None:
            # assignments of an earlier daemon session can never be used again
            self.assignments = {k: v for k, v in self.assignments.items() if k[0] == self.conn.session}
            self.assignments[key] = reply.assignment
        assignment = self.assignments.get(key)
        if assignment is None or len(assignment) != entries:
            raise StagerError(ErrorCode.INTERNAL, f"no assignment for layout {reply.layout}")
        return assignment

    def put(self, step: int, assignment: list, locals_: list, batch_bytes: int) -> None:
        """Send this rank's regions as frames (a daemon on another host), in batches of about
        ``batch_bytes``: that bounds the memory held on both sides."""
        batch_idx = []
        batch_frames = []
        size = 0
        keep_alive: list = []
        for index, (where, local) in enumerate(zip(assignment, locals_)):
            if where is None:
                continue
            host = local.detach().contiguous().cpu() if local.is_cuda or not local.is_contiguous() else local
            keep_alive.append(host)
            nbytes = host.numel() * host.element_size()
            # a zero-copy frame over the tensor's bytes: zmq sends from it without a Python copy
            frame = (ctypes.c_char * nbytes).from_address(host.data_ptr()) if nbytes else b""
            batch_idx.append(index)
            batch_frames.append(frame)
            size += nbytes
            if size >= batch_bytes:
                self._send_put(step, batch_idx, batch_frames, keep_alive)
                batch_idx = []
                batch_frames = []
                size = 0
                keep_alive = []
        if batch_idx:
            self._send_put(step, batch_idx, batch_frames, keep_alive)

    def _send_put(self, step: int, regions: list, frames: list, buffers: list) -> None:
        # frames point into ``buffers`` without owning them; a socket reset closes asynchronously,
        # so the last batch's buffers stay referenced until the next batch was acknowledged
        self.put_buffers.append(buffers)
        # no quick acknowledgement here: a ping sent behind a batch of frames is answered only once
        # they all arrived, and the live tensors' bytes are not out yet (wait_copied waits for them)
        put = Put(step=step, regions=regions, frames=frames)
        self.conn.request(put, self.timeout, expect=Ok, ack_timeout=math.inf)
        del self.put_buffers[:-1]

    def commit(self, step: int, objects: dict, model_info: dict | None, quant: dict) -> int:
        """Send the Commit without waiting: the Sealed reply comes when every rank of the node
        committed. Returns its request id for the seal tracker."""
        return self.conn.send(Commit(step=step, objects=objects, model_info=model_info, quant=quant))

    def abort(self, step: int, reason: str) -> None:
        """Tell the daemon ``step`` will not be committed (best effort: it may be unreachable)."""
        try:
            self.conn.send(Abort(step=step, reason=reason[:500]))
        except StagerError:
            pass
