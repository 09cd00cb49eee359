"""The daemon's request handlers, composed: one object per concern over one shared state.

``Handlers`` builds the parts in dependency order, each given what it needs when it is made:

    PeerDirectory   who is registered (every part looks peers up here)
    ChangeMaps      what changed per sealed version, computed on its own thread
    Retention       budget and retention (never calls back: see below) <- change maps' pins yield to staging
    Subscriptions   who is told about each sealed version
    Steps           staging and sealing             <- announce; tells change maps when steps are in flight
    Reading         leases and remote reads         <- steps' retry when a lease end freed memory
    Peers           registration and liveness       <- reading's end_lease, steps' fail for departures
    JobMembership   the multi-node job
    NixlServing     NIXL grants of leased versions (--transport nixl)
    FullAssembly    whole versions (--assemble-full) <- announce; its own outbox (the assembler socket)

Events that flow back against that order (memory freed, a peer gone) are callables handed to the
later part at construction; nothing is wired afterwards. ``Handlers`` routes each request type to
the method that owns it, runs housekeeping, and composes status from the piece each part reports
(:func:`~.status.compose`). Requests on the daemon's endpoint go to :meth:`Handlers.handle`; those on
the private assembler socket (``--assemble-full``) to :meth:`Handlers.handle_assembly`, the only place
assembly messages are served.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from stager.protocol import (
    Abort,
    Acquire,
    AssembleBegin,
    AssembleDone,
    Begin,
    Bye,
    Changes,
    Commit,
    ErrorCode,
    Hello,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Put,
    Read,
    Release,
    StagerError,
    Status,
    StatusReply,
    Subscribe,
)
from stager.protocol.job import JobInfo, Join
from stager.protocol.nixl import NixlInfo

from .changes import ChangeMaps
from .membership import JobMembership
from .memory import Retention, SegmentBudget
from .nixl_agent import NixlServing, SegmentRegistry, refuse_nixl
from .peers import PeerDirectory, Peers
from .reading import Reading, Subscriptions
from .state import DaemonState, Outbox
from .status import LoopStatus, compose
from .steps import Steps
from .whole_versions import FullAssembly


class Handlers:
    """Everything the socket loop calls: :meth:`handle` per request, :meth:`housekeep` per tick."""

    def __init__(
        self,
        state: DaemonState,
        budget: SegmentBudget,
        outbox: Outbox,
        *,
        advertise: str,
        loop_status: Callable[[], LoopStatus],
        assembly_outbox: Outbox | None = None,
        nixl: SegmentRegistry | None = None,
        change_dtypes: tuple = (),
        change_keep: int = 64,
        change_bytes: int = 64 << 20,
        read_cast_memory: int = 1 << 30,
    ):
        self.state, self._loop_status = state, loop_status
        self.directory = PeerDirectory(state)
        self.changes = ChangeMaps(state, self.directory, dtypes=change_dtypes, keep=change_keep, max_bytes=change_bytes)
        self.memory = Retention(state, budget, yield_pins=self.changes.yield_pins)
        self.subscriptions = Subscriptions(state, self.directory, outbox)
        self.steps = Steps(
            state, self.directory, self.memory, outbox, announce=self._sealed, in_flight=self.changes.gate.hold
        )
        self.reading = Reading(
            state,
            self.directory,
            self.memory,
            outbox,
            memory_freed=self.steps.retry_waiting,
            cast_limit=read_cast_memory,
        )
        self.peers = Peers(state, self.directory, end_lease=self.reading.end_lease, fail_step=self.steps.fail)
        self.job = JobMembership(state, advertise)
        # serve --assemble-full: the daemon's half; the assembler (a consumer) talks to it on its own socket
        self.assembly = (
            FullAssembly(state, self.memory, self.subscriptions.announce, assembly_outbox)
            if assembly_outbox is not None
            else None
        )
        # --transport nixl: the agent (a resource, built before the budget whose factory registers each segment)
        self.nixl = NixlServing(state, self.directory, nixl) if nixl is not None else None
        self.routes: dict[type, Callable[[bytes, Message], Message | None]] = {
            Hello: self.peers.on_hello,
            Bye: self.peers.on_bye,
            Begin: self.steps.on_begin,
            Put: self.steps.on_put,
            Commit: self.steps.on_commit,
            Abort: self.steps.on_abort,
            Acquire: self.reading.on_acquire,
            Release: self.reading.on_release,
            Subscribe: self.subscriptions.on_subscribe,
            Read: self.reading.on_read,
            Changes: self.changes.on_changes,
            Status: self.on_status,
            Ping: self.on_ping,
            Join: self.job.on_join,
            JobInfo: self.job.on_job_info,
            AssembleBegin: self.refuse_assembly,
            AssembleDone: self.refuse_assembly,
            NixlInfo: self.nixl.on_info if self.nixl is not None else refuse_nixl,
        }
        self.assembly_routes: dict[type, Callable[[bytes, Message], Message | None]] = {
            Status: self.on_status,
            Ping: self.on_ping,
        }
        if self.assembly is not None:
            self.assembly_routes.update({AssembleBegin: self.assembly.on_begin, AssembleDone: self.assembly.on_done})

    def handle(self, identity: bytes, msg: Message) -> Message | None:
        self.directory.seen(identity)
        handler = self.routes.get(type(msg))
        if handler is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE} is a reply, not a request")
        return handler(identity, msg)

    def handle_assembly(self, identity: bytes, msg: Message) -> Message | None:
        """A request on the private assembler socket: the assembly messages, status and ping only."""
        handler = self.assembly_routes.get(type(msg))
        if handler is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_TYPE,
                f"{msg.TYPE} is not served on the assembler socket (only "
                f"{sorted(t.TYPE for t in self.assembly_routes)}); send it "
                "to the daemon's endpoint",
            )
        return handler(identity, msg)

    def refuse_assembly(self, identity: bytes, msg: Message) -> Message:
        raise StagerError(
            ErrorCode.FORBIDDEN,
            f"{msg.TYPE} is accepted only from this node's assembler, on the "
            "daemon's private assembler socket, never on its endpoint; run "
            "`stager serve --assemble-full`, which starts the assembler",
        )

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
        """Segments created in the background go to the steps waiting for them, then to an assembly
        waiting for its segment. The assembly is asked on every call, not only when this collect
        finished one: a trainer's Begin collects too (``SegmentBudget.take``) and may have pooled the
        assembly's segment already, and nothing else would answer its assemble_begin."""
        if self.memory.collect():
            self.steps.retry_waiting()
        if self.assembly is not None and self.assembly.waiting:  # after the steps: the trainer's come first
            self.assembly.retry()

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
            loop=self._loop_status(),
            shared=self.state.status(),
            versions=self.steps.versions(time.monotonic()),
            peers=self.peers.status(),
            reading=self.reading.status(),
            memory=self.memory.budget.status(),
            retention=self.memory.status(),
            subscribers=self.subscriptions.status(),
            job=self.job.status(),
            assembly=self.assembly.status() if self.assembly is not None else None,
            transport=self.nixl.status() if self.nixl is not None else {"mode": "frames"},
            changes=self.changes.status(),
        )

    def close(self) -> None:
        """Fail the steps in flight (the segments go with the daemon's resources)."""
        self.changes.close()
        self.steps.close()
