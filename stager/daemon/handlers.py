"""The daemon's request handlers, composed: one object per concern over one shared state.

``Handlers`` builds the parts in dependency order, each given what it needs when it is made:

    PeerDirectory   who is registered (every part looks peers up here)
    ChangeMaps      what changed per sealed version, computed on its own thread
    Retention       budget and retention (never calls back: see below) <- change maps' pins yield to staging
    Subscriptions   who is told about each sealed version
    Steps           staging and sealing             <- announce
    Reading         leases and remote reads         <- steps' retry when a lease end freed memory
    Peers           registration and liveness       <- reading's end_lease, steps' fail for departures
    JobMembership   the multi-node job
    FullAssembly    whole versions (--assemble-full) <- announce

Events that flow back against that order (memory freed, a peer gone) are callables handed to the
later part at construction; nothing is wired afterwards. ``Handlers`` routes each request type to
the method that owns it, runs housekeeping, and composes status from the piece each part reports
(:func:`~.status.compose`).
"""

from __future__ import annotations

import time
from typing import Callable

from stager.protocol import (
    Abort, Acquire, Begin, Bye, Changes, Commit, ErrorCode, Hello, Message, Ping, Pong, ProtocolError, Put, Read,
    Release, Status, StatusReply, Subscribe,
)
from stager.protocol.job import JobInfo, Join

from .changes import ChangeMaps
from .membership import JobMembership
from .memory import Retention, SegmentBudget
from .peers import PeerDirectory, Peers
from .reading import Reading, Subscriptions
from .state import DaemonState, Outbox
from .status import LoopStatus, compose
from .steps import Steps
from .whole_versions import FullAssembly


class Handlers:
    """Everything the socket loop calls: :meth:`handle` per request, :meth:`housekeep` per tick."""

    def __init__(self, state: DaemonState, budget: SegmentBudget, outbox: Outbox, *, advertise: str,
                 loop_status: Callable[[], LoopStatus], new_segment_name: Callable[[], str],
                 assemble_full: bool = False, change_dtypes: tuple = (), change_keep: int = 64,
                 change_bytes: int = 64 << 20):
        self.state, self._loop_status = state, loop_status
        self.directory = PeerDirectory(state)
        self.changes = ChangeMaps(state, self.directory, dtypes=change_dtypes, keep=change_keep, max_bytes=change_bytes)
        self.memory = Retention(state, budget, yield_pins=self.changes.yield_pins)
        self.subscriptions = Subscriptions(state, self.directory, outbox)
        self.steps = Steps(state, self.directory, self.memory, outbox, announce=self._sealed)
        self.reading = Reading(state, self.directory, self.memory, outbox, memory_freed=self.steps.retry_waiting)
        self.peers = Peers(state, self.directory, end_lease=self.reading.end_lease, fail_step=self.steps.fail)
        self.job = JobMembership(state, advertise)
        # serve --assemble-full: the loop's half (its thread, a client, is attached by `stager serve`)
        self.assembly = (FullAssembly(state, self.memory, self.subscriptions.announce, new_segment_name)
                         if assemble_full else None)
        self.routes: dict[type, Callable[[bytes, Message], Message | None]] = {
            Hello: self.peers.on_hello, Bye: self.peers.on_bye,
            Begin: self.steps.on_begin, Put: self.steps.on_put, Commit: self.steps.on_commit,
            Abort: self.steps.on_abort,
            Acquire: self.reading.on_acquire, Release: self.reading.on_release,
            Subscribe: self.subscriptions.on_subscribe, Read: self.reading.on_read, Changes: self.changes.on_changes,
            Status: self.on_status, Ping: self.on_ping,
            Join: self.job.on_join, JobInfo: self.job.on_job_info,
        }

    def handle(self, identity: bytes, msg: Message) -> Message | None:
        self.directory.seen(identity)
        handler = self.routes.get(type(msg))
        if handler is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE} is a reply, not a request")
        return handler(identity, msg)

    def _sealed(self, v) -> None:
        self.changes.on_sealed(v, self.memory.unpinned)  # pins v and its predecessor before retention runs
        self.subscriptions.announce(v)

    def housekeep(self) -> None:
        self.collect_changes()
        self.collect_segments()
        self.peers.check_liveness()
        self.steps.check_timeouts()
        self.reading.resume_deferred()

    def collect_segments(self) -> None:
        """Segments created in the background go to the steps waiting for them."""
        if self.memory.collect():
            self.steps.retry_waiting()

    def collect_changes(self) -> None:
        """Change maps computed in the background are recorded; the versions they pinned may go."""
        if self.changes.collect(self.memory.unpinned):
            self.memory.enforce()
            self.steps.retry_waiting()

    def on_ping(self, identity: bytes, msg: Ping) -> Message:
        if msg.id == 0:  # a heartbeat: a connection without a session (ended for silence) is told why
            self.directory.get(identity)
        return Pong(session=self.state.session)

    def on_status(self, identity: bytes, msg: Status) -> Message:
        return StatusReply(status=self.status())

    def status(self) -> dict:
        """`stager status`: each part's piece, composed in one place."""
        return compose(
            loop=self._loop_status(), shared=self.state.status(), versions=self.steps.versions(time.monotonic()),
            peers=self.peers.status(), reading=self.reading.status(), memory=self.memory.budget.status(),
            retention=self.memory.status(), subscribers=self.subscriptions.status(), job=self.job.status(),
            assembly=self.assembly.status() if self.assembly is not None else None, changes=self.changes.status())

    def close(self) -> None:
        """Fail the steps in flight (the segments go with the daemon's resources)."""
        self.changes.close()
        self.steps.close()
