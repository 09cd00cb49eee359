"""`stager status`: one function composes the daemon's status from the piece each part reports.

Each part reports its own piece (a typed dict below) and knows nothing of the others:
the socket loop (:class:`LoopStatus`), the shared state (:class:`SharedStatus`), the steps
(:class:`VersionSummary` per version), peers, reading, the segment budget, retention, the
job membership and full assembly. :func:`compose` is the one place their keys are laid out;
the schema is documented in README.md ("Operations") and checked by tests/test_status_view.py
and tests/test_status_compose.py. Keys are only ever added.
"""

from __future__ import annotations

from typing import TypedDict


class LoopStatus(TypedDict):
    """What only the socket loop and its process know."""

    pid: int
    cpu_seconds: float
    state: str  # the lifecycle phase: serving, draining, stopping
    endpoint: str
    uptime_s: float
    subscriber_lag: list[dict]


class LoopOptions(LoopStatus, total=False):
    metrics: str  # the metrics URL, with --metrics
    insecure: bool  # tcp without authentication (--insecure-no-auth)


class SharedStatus(TypedDict):
    """The shared state's own fields (:class:`~stager.daemon.state.DaemonState`)."""

    session: str
    epoch: int
    keep: int
    peer_timeout: float
    node: str
    seq: int
    counters: dict[str, int]


class VersionSummary(TypedDict):
    step: int
    state: str  # staging, sealed or failed
    phase: str
    bytes: int
    tensors: int
    objects: int
    partial: bool
    leases: int


class VersionDetails(VersionSummary, total=False):
    held_regions: dict[str, list]  # partial versions: the regions this node holds
    assembled: bool  # the whole job's tensors (serve --assemble-full)
    reason: str  # why it failed
    age_s: float  # seconds since sealed, or since the first begin
    changed: dict[str, dict]  # reader dtype -> what changed since the previous version (change maps)


class FailedStep(TypedDict):
    """A failed step the daemon remembers (its version is gone)."""

    step: int
    state: str  # "failed"
    reason: str


class PeersStatus(TypedDict):
    ranks: dict[str, dict]  # local rank -> {pid, local}: trainer ranks connected
    local_world_size: int | None
    readers: int


class ReadsStatus(TypedDict):
    bytes_in_flight: int
    deferred: int
    cast_buffers: int  # reply buffers of reads cast by the daemon, in flight or kept for reuse


class ReadingStatus(TypedDict):
    reads: ReadsStatus
    leases: int


class MemoryStatus(TypedDict):
    used: int
    limit: int
    pooled: int
    draining: int
    preallocated: int


class RetentionStatus(TypedDict):
    policy: str
    leased_steps: list[int]
    waiting_for_memory: list[int]


class JobStatus(TypedDict):
    job: str
    node: str
    advertise: str
    nodes: dict[str, str]
    ranks: dict[str, list[int]]
    world_size: int


class AssemblyStatus(TypedDict):
    enabled: bool
    assembled: list[int]


def compose(
    *,
    loop: LoopStatus,
    shared: SharedStatus,
    versions: list,
    peers: PeersStatus,
    reading: ReadingStatus,
    memory: MemoryStatus,
    retention: RetentionStatus,
    subscribers: int,
    job: JobStatus | None,
    assembly: AssemblyStatus | None,
    transport: dict | None = None,
    changes: dict | None = None,
) -> dict:
    """The status object `stager status --json` prints, from each part's piece (pure: no part is
    asked anything here). ``versions``: :class:`VersionDetails` and :class:`FailedStep` entries."""
    status = {
        "session": shared["session"],
        "pid": loop["pid"],
        "epoch": shared["epoch"],
        "versions": versions,
        "ranks": peers["ranks"],
        "local_world_size": peers["local_world_size"],
        "readers": peers["readers"],
        "reads": reading["reads"],
        "leases": reading["leases"],
        "memory": memory,
        "keep": shared["keep"],
        "peer_timeout": shared["peer_timeout"],
        "node": shared["node"],
        "job": job,
        "retention": retention,
        "subscribers": subscribers,
        "seq": shared["seq"],
        "counters": shared["counters"],
        "cpu_seconds": loop["cpu_seconds"],
        "state": loop["state"],
        "endpoint": loop["endpoint"],
        "uptime_s": loop["uptime_s"],
        "subscriber_lag": loop["subscriber_lag"],
    }
    for key in ("metrics", "insecure"):  # only when they apply: `stager status` shows them then
        if key in loop:
            status[key] = loop[key]
    if assembly is not None:
        status["assembly"] = assembly
    if transport is not None:  # how remote readers get bytes: {"mode": "frames"} or NIXL's registrations
        status["transport"] = transport
    if changes is not None:
        status["changes"] = changes
    return status
