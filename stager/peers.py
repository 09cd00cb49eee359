"""Who is connected: trainer ranks and readers, their registration, liveness and departure.

Same-host peers are alive while their process is (checked by pid and start time, zombies
count as dead); peers on another host while they keep talking (clients ping every few seconds).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import psutil

from stager.protocol import Bye, ErrorCode, Hello, HelloReply, Message, Ok, StagerError

log = logging.getLogger("stager.daemon")


@dataclasses.dataclass(eq=False)
class Peer:
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



class PeerHandlers:
    """Mixed into :class:`stager.handlers.StagingState`, whose state these methods use."""

    def _alive(self, peer: Peer) -> bool:
        if not peer.local:
            return time.monotonic() - peer.last_seen < self.peer_timeout
        try:
            proc = psutil.Process(peer.pid)
            # a killed rank its launcher has not reaped yet is a zombie: dead all the same
            return abs(proc.create_time() - peer.start_time) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def on_hello(self, identity: bytes, msg: Hello) -> Message:
        local = msg.host_id == self.host_id
        existing = self.peers.get(identity)
        if existing is not None and (existing.role, existing.rank) != (msg.role, msg.rank):
            self.drop_peer(existing, "registered again under another role or rank")
            existing = None
        if msg.role == "trainer":
            holder = self.ranks.get(msg.rank)
            old = self.peers.get(holder) if holder not in (None, identity) else None
            if holder is not None and holder != identity and old is None:
                del self.ranks[msg.rank]  # defensive: a slot whose peer is gone is free
            if old is not None:
                same_process = (old.host_id, old.pid) == (msg.host_id, msg.pid) and abs(
                    old.start_time - msg.start_time) < 0.5
                if self._alive(old) and not same_process:
                    raise StagerError(
                        ErrorCode.RANK_CONFLICT,
                        f"local rank {msg.rank} is already staged by live pid {old.pid}; give each rank of a "
                        "node its own LOCAL_RANK, or run one daemon per job (--endpoint)",
                    )
            live = [r for r, i in self.ranks.items() if i not in (identity, holder)]
            if live and msg.local_world_size != self.local_world_size:
                raise StagerError(
                    ErrorCode.RANK_CONFLICT,
                    f"rank {msg.rank} says the node has {msg.local_world_size} ranks but connected ranks said "
                    f"{self.local_world_size}; all ranks of a node must agree (LOCAL_WORLD_SIZE)",
                )
            if old is not None:
                self.drop_peer(old, f"rank {msg.rank} reconnected")
            if not live:
                # a new job (or the same job restarted): a new timeline of steps, layouts planned anew
                self.epoch += 1
                self.local_world_size = msg.local_world_size
                self.current = None
            self.ranks[msg.rank] = identity
        self.peers[identity] = Peer(identity, msg.role, msg.rank, msg.pid, float(msg.start_time), msg.host_id,
                                    local, time.monotonic(), leases=existing.leases if existing else set())
        log.info("%s %d connected (pid %d, %s)", msg.role, msg.rank, msg.pid, "local" if local else "remote")
        return HelloReply(session=self.session, host_id=self.host_id, daemon_pid=os.getpid())

    def on_bye(self, identity: bytes, msg: Bye) -> Message:
        peer = self.peers.get(identity)
        if peer is not None:
            self.drop_peer(peer, "said bye")
        return Ok()

    def drop_peer(self, peer: Peer, reason: str) -> None:
        self.peers.pop(peer.identity, None)
        self.subscribers.discard(peer.identity)
        for lease in list(peer.leases):
            self._end_lease(lease)
        if peer.role == "trainer" and self.ranks.get(peer.rank) == peer.identity:
            del self.ranks[peer.rank]
            for v in list(self.staging.values()):
                if peer.rank not in v.committed:  # what it committed is complete; the rest never will be
                    self.fail(v, f"rank {peer.rank} (pid {peer.pid}) left during step {v.step}: {reason}")
        log.info("%s %d (pid %d) dropped: %s", peer.role, peer.rank, peer.pid, reason)
