"""The daemon's records: peers, layouts, versions and the phases a step goes through (no sockets).

A step's life, as :class:`Phase` names it in code:

    PLANNING    begins arrive; a new layout waits for every rank's plan
    ALLOCATING  the layout is fixed; the step waits for a segment (being created, or memory)
    WRITING     every begin is answered; ranks copy their shards and commit
    SEALED      every rank committed: immutable, served to readers
    FAILED      a rank died, aborted, sent bad data or timed out; its segment is unlinked

Only SEALED versions are ever visible to readers.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import NamedTuple

from stager.protocol.layout import PlanEntry
from stager.protocol.quant import QuantSpec

from .planning import NodeLayout
from .segments import Segment
from .status import VersionDetails


class Phase(str, enum.Enum):
    PLANNING = "planning"
    ALLOCATING = "allocating"
    WRITING = "writing"
    SEALED = "sealed"
    FAILED = "failed"

    @property
    def in_flight(self) -> bool:
        return self in (Phase.PLANNING, Phase.ALLOCATING, Phase.WRITING)


@dataclasses.dataclass(eq=False)
class Peer:
    """One connection: a trainer rank, a reader or an admin tool."""

    identity: bytes
    role: str
    rank: int
    pid: int
    start_time: float
    host_id: str
    local: bool
    last_seen: float
    leases: set[int] = dataclasses.field(default_factory=set)
    layouts_sent: set[str] = dataclasses.field(default_factory=set)
    reads_in_flight: list = dataclasses.field(default_factory=list)  # (trackers, bytes) of unsent read replies
    deferred_reads: list = dataclasses.field(default_factory=list)  # Read requests held back (back-pressure)

    def read_bytes_in_flight(self) -> int:
        self.reads_in_flight = [(ts, n) for ts, n in self.reads_in_flight if not all(t.done for t in ts)]
        return sum(n for _, n in self.reads_in_flight)


class Pending(NamedTuple):
    """A request whose reply is deferred: who asked, and the request id to answer."""

    peer: bytes
    rid: int


@dataclasses.dataclass(eq=False)
class LayoutRecord:
    """A node layout the daemon planned, and the rank plans it was built from."""

    id: str
    layout: NodeLayout
    digests: dict[int, str]  # rank -> plan digest
    full_world: bool
    by_name: dict = dataclasses.field(default_factory=dict)  # fqn -> TensorLayout, filled on first remote read


@dataclasses.dataclass(eq=False)
class Version:
    """One step of the job on this node, from its first begin to sealed or failed."""

    step: int
    epoch: int
    started: float = dataclasses.field(default_factory=time.monotonic)
    phase: Phase = Phase.PLANNING
    record: LayoutRecord | None = None  # kept even if the daemon forgets the layout
    entries: dict[int, tuple[PlanEntry, ...]] = dataclasses.field(default_factory=dict)  # rank -> plan at begin
    segment: Segment | None = None
    digests: dict[int, str] = dataclasses.field(default_factory=dict)  # rank -> layout digest at begin
    shm_ranks: set[int] = dataclasses.field(default_factory=set)
    committed: set[int] = dataclasses.field(default_factory=set)
    put: dict[int, set[int]] = dataclasses.field(default_factory=dict)  # rank -> plan indices received
    waiting_begin: dict[int, Pending] = dataclasses.field(default_factory=dict)
    waiting_commit: dict[int, Pending] = dataclasses.field(default_factory=dict)
    full_world: bool = True  # False once a rank says the job spans nodes: gaps become "partial"
    wait_ms: int = 0  # the longest back-pressure wait any rank allows
    wait_deadline: float | None = None  # set while the step waits for memory
    objects: dict = dataclasses.field(default_factory=dict)
    objects_rank: int | None = None
    model_info: dict | None = None
    quant: dict[str, QuantSpec] = dataclasses.field(default_factory=dict)
    seq: int = 0  # the daemon's count of sealed versions when this one sealed
    leases: set[int] = dataclasses.field(default_factory=set)
    sealed_at: float | None = None
    reason: str = ""
    assembled: bool = False  # the whole job's tensors, pulled from the other nodes (serve --assemble-full)
    changes: dict | None = None  # reader dtype -> what changed since the previous version (daemon/changes.py)

    @property
    def layout(self) -> NodeLayout | None:
        return self.record.layout if self.record is not None else None

    def summary(self, now: float) -> VersionDetails:
        """This version's entry in status; ``now``: the monotonic clock, for its age."""
        layout = self.layout
        out: VersionDetails = {
            "step": self.step,
            "state": "staging" if self.phase.in_flight else self.phase.value,
            "phase": self.phase.value,
            "bytes": layout.nbytes if layout else 0,
            "tensors": len(layout.tensors) if layout else 0,
            "objects": len(self.objects),
            "partial": bool(layout and layout.partial),
            "leases": sum(lease > 0 for lease in self.leases),  # negative: the change-map thread's pins
        }
        if layout and layout.partial:
            out["held_regions"] = layout.held_regions()
        if self.assembled:
            out["assembled"] = True
        if self.reason:
            out["reason"] = self.reason
        if self.changes is not None:
            out["changed"] = self.changes
        since = self.sealed_at if self.phase is Phase.SEALED else self.started if self.phase.in_flight else None
        if since is not None:
            out["age_s"] = round(now - since, 3)
        return out
