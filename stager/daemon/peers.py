"""Who is connected: trainer ranks and readers, their registration, liveness and departure.

Same-host peers are alive while their process is (checked by pid and start time, zombies
count as dead); peers on another host while they keep talking: trainer ranks ping every few
seconds, readers send heartbeats (pings with id 0) at a quarter of ``--peer-timeout``, from a
background thread while their owner is busy. A peer that leaves ends its leases, and a trainer
that leaves fails the steps it had not committed. A connection whose session ended for silence
is told so (SESSION_EXPIRED) when it speaks again, not merely that it is unknown.

Silence is measured on the daemon's clock, so time the daemon itself did not run (SIGSTOP, a
debugger, a throttled container, a long request) is not held against its peers: after such a
stall each remote peer gets a full peer timeout from the resume. What they sent meanwhile may
still sit in kernel buffers, unread by ZeroMQ's I/O thread, which was stopped too.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable

import psutil

from stager.protocol import Bye, ErrorCode, Hello, HelloReply, Message, Ok, StagerError
from stager.protocol.endpoint import process_start_time

from .state import DaemonState
from .status import PeersStatus
from .versions import Peer, Version

log = logging.getLogger("stager.daemon")
LIVENESS_INTERVAL_S = 1.0  # reading /proc for every peer: once a second is plenty
EXPIRED_KEPT = 1024  # connections dropped for silence, remembered to tell them why (ROUTER ids never repeat)
# a gap this long between liveness checks (ticks come every 0.2 s) means the daemon itself stalled
STALL_S = 1.0
TICK_S = 0.2  # the interval liveness checks are expected at (server.HOUSEKEEPING_S)


def last_seen_after_stall(last_seen: float, now: float, off_cpu: float) -> float:
    """A remote peer's ``last_seen`` once the loop comes back from ``off_cpu`` seconds of not running (stopped, or
    starved of CPU) between two liveness checks: that time does not count as its silence (its heartbeats of that
    time may still be queued), the time the loop ran does (busy or idle, it read what came). Restarting the silence
    at every stall instead let a silent peer outlive ``--peer-timeout`` many times over on a loaded host, where
    gaps over STALL_S come every few seconds.

    >>> last_seen_after_stall(100.0, 130.0, 26.0)  # heard 30 s ago, 26 s of it stopped: 4.2 s of silence
    125.8
    """
    return min(now, last_seen + max(0.0, off_cpu - TICK_S))


class PeerDirectory:
    """Who is registered: the peer behind a connection, or a typed error saying why there is none.
    Every handler looks peers up here; :class:`Peers` registers and drops them."""

    def __init__(self, state: DaemonState):
        self.state = state
        self.expired: OrderedDict[bytes, str] = OrderedDict()  # identity -> why its session ended

    def get(self, identity: bytes, role: str | None = None) -> Peer:
        """The registered peer behind ``identity`` (of ``role`` when given), else a typed error."""
        peer = self.state.peers.get(identity)
        if peer is None:
            if identity in self.expired:
                raise StagerError(ErrorCode.SESSION_EXPIRED, self.expired[identity])
            raise StagerError(
                ErrorCode.NOT_REGISTERED,
                "this connection has not said hello (or the daemon restarted); send Hello first",
            )
        if role and peer.role != role:
            raise StagerError(
                ErrorCode.BAD_MESSAGE, f"only {role} connections may send this; this one is a {peer.role}"
            )
        return peer

    def seen(self, identity: bytes) -> None:
        peer = self.state.peers.get(identity)
        if peer is not None:
            peer.last_seen = time.monotonic()

    def renewed(self, identity: bytes) -> None:
        """``identity`` registered again: its earlier session's end is no longer news."""
        self.expired.pop(identity, None)

    def expire(self, identity: bytes, why: str) -> None:
        """Remember why ``identity``'s session ended, for its next request (a bounded memory: the oldest go first)."""
        self.expired[identity] = why
        while len(self.expired) > EXPIRED_KEPT:
            self.expired.popitem(last=False)


class Peers:
    """Registers peers (Hello), drops them (Bye, death, silence) and checks liveness.

    Built after the parts that hold what a peer leaves behind: ``end_lease`` ends one of its leases
    (reading), ``fail_step`` fails a step a departed rank had not committed (steps)."""

    def __init__(
        self,
        state: DaemonState,
        directory: PeerDirectory,
        *,
        end_lease: Callable[[int], None],
        fail_step: Callable[[Version, str], None],
    ):
        self.state = state
        self.directory = directory
        self._end_lease = end_lease
        self._fail_step = fail_step
        self._next_liveness = 0.0
        # when check_liveness last ran: a long gap is a stall (also before the first tick: a daemon
        # stopped within its first 0.2 s)
        self._last_check = time.monotonic()
        self._last_ran: float | None = None  # the loop thread's CPU time at its last check (None: none yet)
        self._spared = False  # whether the last check spared remote peers (one right after a stall)

    def alive(self, peer: Peer) -> bool:
        if not peer.local:
            return time.monotonic() - peer.last_seen < self.state.peer_timeout
        try:
            if abs(process_start_time(peer.pid) - peer.start_time) > 0.05:  # the pid was reused
                return False
            # a killed rank its launcher has not reaped yet is a zombie: dead all the same
            return psutil.Process(peer.pid).status() != psutil.STATUS_ZOMBIE
        except (OSError, psutil.Error):
            return False

    def on_hello(self, identity: bytes, msg: Hello) -> Message:
        state = self.state
        local = msg.host_id == state.host_id
        existing = state.peers.get(identity)
        if existing is not None and (existing.role, existing.rank) != (msg.role, msg.rank):
            self.drop(existing, "registered again under another role or rank")
            existing = None
        if msg.role == "trainer":
            self._claim_rank(identity, msg)
        self.directory.renewed(identity)
        state.peers[identity] = Peer(
            identity,
            msg.role,
            msg.rank,
            msg.pid,
            float(msg.start_time),
            msg.host_id,
            local,
            time.monotonic(),
            leases=existing.leases if existing else set(),
        )
        log.info("%s %d connected (pid %d, %s)", msg.role, msg.rank, msg.pid, "local" if local else "remote")
        return HelloReply(session=state.session, host_id=state.host_id, daemon_pid=os.getpid())

    def _claim_rank(self, identity: bytes, msg: Hello) -> None:
        state = self.state
        holder = state.ranks.get(msg.rank)
        old = state.peers.get(holder) if holder not in (None, identity) else None
        if holder is not None and holder != identity and old is None:
            del state.ranks[msg.rank]  # defensive: a slot whose peer is gone is free
        if old is not None:
            same_process = (old.host_id, old.pid) == (msg.host_id, msg.pid) and abs(
                old.start_time - msg.start_time
            ) < 0.05
            if self.alive(old) and not same_process:
                raise StagerError(
                    ErrorCode.RANK_CONFLICT,
                    f"local rank {msg.rank} is already staged by live pid {old.pid}; give each rank of a "
                    "node its own LOCAL_RANK, or run one daemon per job (--endpoint)",
                )
        live = [r for r, i in state.ranks.items() if i not in (identity, holder)]
        if live and msg.local_world_size != state.local_world_size:
            raise StagerError(
                ErrorCode.RANK_CONFLICT,
                f"rank {msg.rank} says the node has {msg.local_world_size} ranks but connected ranks said "
                f"{state.local_world_size}; all ranks of a node must agree (LOCAL_WORLD_SIZE)",
            )
        if old is not None:
            self.drop(old, f"rank {msg.rank} reconnected")
        if not live:
            # a new job (or the same job restarted): a new timeline of steps, layouts planned anew
            state.epoch += 1
            state.failed.clear()  # step numbers that failed in the old timeline may be staged again
            state.local_world_size = msg.local_world_size
            state.current = None
        state.ranks[msg.rank] = identity

    def on_bye(self, identity: bytes, msg: Bye) -> Message:
        peer = self.state.peers.get(identity)
        if peer is not None:
            self.drop(peer, "said bye")
        return Ok()

    def drop(self, peer: Peer, reason: str) -> None:
        state = self.state
        state.peers.pop(peer.identity, None)
        state.subscribers.discard(peer.identity)
        for lease in list(peer.leases):
            self._end_lease(lease)
        if peer.role == "trainer" and state.ranks.get(peer.rank) == peer.identity:
            del state.ranks[peer.rank]
            for v in list(state.staging.values()):
                if peer.rank not in v.committed:  # what it committed is complete; the rest never will be
                    self._fail_step(v, f"rank {peer.rank} (pid {peer.pid}) left during step {v.step}: {reason}")
        log.info("%s %d (pid %d) dropped: %s", peer.role, peer.rank, peer.pid, reason)

    def check_liveness(self) -> None:
        now, ran = time.monotonic(), time.thread_time()
        last, self._last_check = self._last_check, now
        ran_before, self._last_ran = (ran if self._last_ran is None else self._last_ran), ran
        # the loop's time off the CPU since the last check, not its time busy (a long burst of requests read what
        # came meanwhile): a stall. No peer on another host is dropped in the check right after one, before the
        # loop read what came meanwhile, but only one check in a row is so spared (stalls may come at every check)
        off_cpu = (now - last) - (ran - ran_before)
        spared = off_cpu > STALL_S and not self._spared
        self._spared = spared
        if off_cpu > STALL_S:
            self._forgive_stall(now, off_cpu)
        # /proc is read for same-host peers once a second; a peer on another host costs a clock
        # comparison, so it is checked every tick: gone within --peer-timeout plus a tick
        local = now >= self._next_liveness
        if local:
            self._next_liveness = now + LIVENESS_INTERVAL_S
        for peer in list(self.state.peers.values()):
            if (peer.local and not local) or (not peer.local and spared) or self.alive(peer):
                continue
            if peer.local:
                self.drop(peer, "process exited")
                continue
            self._remember_expired(peer, now - peer.last_seen)
            self.drop(peer, f"silent for {now - peer.last_seen:.1f}s (--peer-timeout {self.state.peer_timeout:g}s)")

    def _forgive_stall(self, now: float, gap: float) -> None:
        """The loop did not run for ``gap`` seconds: it (or the whole process) was stalled. A remote
        peer's heartbeats of that time may not have been read yet: the stall is not counted as its silence."""
        remote = [p for p in self.state.peers.values() if not p.local]
        for peer in remote:
            peer.last_seen = last_seen_after_stall(peer.last_seen, now, gap)
        if remote:  # a warning where it mattered: without this, they would have been dropped
            log.log(
                logging.WARNING if gap > self.state.peer_timeout else logging.DEBUG,
                "the daemon did not run for %.1fs (stopped, or starved of CPU); that time does not count "
                "toward the silence of the %d peer(s) on other hosts (--peer-timeout %gs)",
                gap,
                len(remote),
                self.state.peer_timeout,
            )

    def _remember_expired(self, peer: Peer, silent: float) -> None:
        """Why ``peer``'s session ends, for its next request."""
        what = f"{len(peer.leases)} lease(s)" + (
            " and its subscription" if peer.identity in self.state.subscribers else ""
        )
        self.directory.expire(
            peer.identity,
            (
                f"the daemon ended this connection's session after {silent:.1f}s without a message from it "
                f"(--peer-timeout {self.state.peer_timeout:g}s), and with it {what}. Clients on another host send "
                "heartbeats in the background, so the process was stopped or cut off from the daemon (SIGSTOP, a "
                "debugger, the network) for that long; raise the daemon's --peer-timeout if such pauses are expected. "
                "The next request registers anew: acquire the version again (and subscribe)"
            ),
        )

    def status(self) -> PeersStatus:
        state = self.state
        return {
            "ranks": {
                str(p.rank): {"pid": p.pid, "local": p.local} for p in state.peers.values() if p.role == "trainer"
            },
            "local_world_size": state.local_world_size,
            "readers": sum(1 for p in state.peers.values() if p.role == "reader"),
        }
