"""The daemon's shared state: one object every handler reads and writes, declared in one place.

Handlers (peers, steps, reading, memory) each own one concern and reach each other only through
the methods they are given at construction; the data they share is the fields below. The socket
loop runs everything on one thread, so nothing here is locked.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from typing import Callable, Iterator

from stager.protocol import Message

from .versions import LayoutRecord, Peer, Version

Send = Callable[[bytes, Message], bool]  # False: dropped (peer gone or not reading)
# sends a message whose frames point into shared memory; returns one tracker per frame (None: dropped)
SendTracked = Callable[[bytes, Message], "list | None"]
FAILED_KEPT = 32  # failed steps remembered (with their reason) for status and late requests


@dataclasses.dataclass(eq=False)
class DaemonState:
    send: Send
    send_tracked: SendTracked
    keep: int  # sealed versions retained (--keep)
    step_timeout: float
    peer_timeout: float
    host_id: str
    session: str  # changes every daemon start: clients see a restart

    peers: dict[bytes, Peer] = dataclasses.field(default_factory=dict)
    ranks: dict[int, bytes] = dataclasses.field(default_factory=dict)  # local rank -> trainer identity
    local_world_size: int | None = None
    epoch: int = 0  # a new job (or a restarted one) starts a new timeline of steps
    plans: dict = dataclasses.field(default_factory=dict)  # (rank, digest) -> tuple[PlanEntry, ...]
    layouts: dict = dataclasses.field(default_factory=dict)  # (digests, full_world) -> LayoutRecord
    current: LayoutRecord | None = None  # the layout of the newest step
    staging: dict[int, Version] = dataclasses.field(default_factory=dict)  # steps in flight
    sealed: OrderedDict[int, Version] = dataclasses.field(default_factory=OrderedDict)  # by step
    orphans: set[Version] = dataclasses.field(default_factory=set)  # leased versions of an abandoned timeline
    failed: OrderedDict[int, str] = dataclasses.field(default_factory=OrderedDict)  # step -> reason
    leases: dict[int, tuple[bytes, Version]] = dataclasses.field(default_factory=dict)
    subscribers: set[bytes] = dataclasses.field(default_factory=set)
    seq: int = 0  # versions sealed by this daemon: announcements carry it, gaps show skips
    counters: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(
        ("sealed", "failed", "ingested_bytes", "requests", "errors", "read_bytes", "announcements_dropped",
         "memory_refusals", "evictions", "backpressure_waits"), 0))
    lease_ids: Iterator[int] = dataclasses.field(default_factory=lambda: itertools.count(1))
    layout_ids: Iterator[int] = dataclasses.field(default_factory=lambda: itertools.count(1))

    def latest(self) -> Version | None:
        return self.sealed[next(reversed(self.sealed))] if self.sealed else None

    def remember_failure(self, step: int, reason: str) -> None:
        self.failed[step] = reason
        while len(self.failed) > FAILED_KEPT:
            self.failed.popitem(last=False)
