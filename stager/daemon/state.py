"""The daemon's shared state: one object every handler reads and writes, declared in one place.

Handlers (peers, steps, reading, memory) each own one concern and reach each other only through
the methods they are given at construction; the data they share is the fields below, and what
they send goes through the :class:`Outbox` they are given. The socket loop runs everything on one
thread, so nothing here is locked.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

from stager.protocol import Message

from .status import SharedStatus
from .versions import LayoutRecord, Peer, Version

FAILED_KEPT = 32  # failed steps remembered (with their reason) for status and late requests


class Outbox(Protocol):
    """How handlers send messages nobody asked for now (deferred replies, announcements, read replies):
    never blocking the loop (the socket's :class:`~stager.daemon.outbox.SocketOutbox`)."""

    def send(self, identity: bytes, msg: Message) -> bool:
        """False when it was dropped (the peer is gone or not reading)."""

    def send_tracked(self, identity: bytes, msg: Message) -> list | None:
        """Send a message whose frames point into shared memory, without copying them: one tracker
        per frame (done once ZeroMQ no longer needs the bytes); None when dropped."""


@dataclasses.dataclass(eq=False)
class DaemonState:
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
    counters: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(
            (
                "sealed",
                "failed",
                "ingested_bytes",
                "requests",
                "errors",
                "read_bytes",
                "announcements_dropped",
                "memory_refusals",
                "evictions",
                "backpressure_waits",
                "read_cast_bytes",
            ),
            0,
        )
    )
    lease_ids: Iterator[int] = dataclasses.field(default_factory=lambda: itertools.count(1))
    layout_ids: Iterator[int] = dataclasses.field(default_factory=lambda: itertools.count(1))

    def latest(self) -> Version | None:
        return self.sealed[next(reversed(self.sealed))] if self.sealed else None

    def status(self) -> SharedStatus:
        return {
            "session": self.session,
            "epoch": self.epoch,
            "keep": self.keep,
            "peer_timeout": self.peer_timeout,
            "node": self.host_id,
            "seq": self.seq,
            "counters": dict(self.counters),
        }

    def remember_failure(self, step: int, reason: str) -> None:
        self.failed[step] = reason
        while len(self.failed) > FAILED_KEPT:
            self.failed.popitem(last=False)
