"""Remote peers' silence across the daemon loop's stalls (pure clock logic of ``stager.daemon.peers``, on a fake
clock: which time counts as a peer's silence, and that a silent peer is always dropped in the end)."""

import pytest

from stager.daemon import peers as peers_mod
from stager.daemon.peers import PeerDirectory, Peers, last_seen_after_stall
from stager.daemon.state import DaemonState
from stager.daemon.versions import Peer


@pytest.mark.fast
@pytest.mark.parametrize(
    "last_seen, now, off_cpu, expected",
    [
        (100.0, 130.0, 26.0, 125.8),  # stopped 26 s: that time is not silence
        (100.0, 101.0, 0.5, 100.3),  # a short stall: forgiven but for a tick
        (100.0, 101.0, 0.1, 100.0),  # under a tick: nothing forgiven
        (100.0, 101.0, 5.0, 101.0),  # never later than now
    ],
)
def test_only_the_time_the_loop_did_not_run_is_forgiven(last_seen, now, off_cpu, expected):
    assert last_seen_after_stall(last_seen, now, off_cpu) == pytest.approx(expected)


class _Clock:
    def __init__(self):
        self.wall = 1000.0
        self.cpu = 0.0

    def monotonic(self) -> float:
        return self.wall

    def thread_time(self) -> float:
        return self.cpu


def _silent_remote(clock: _Clock, timeout: float):
    state = DaemonState(keep=1, step_timeout=10.0, peer_timeout=timeout, host_id="here", session="s")
    dropped = []
    peers = Peers(state, PeerDirectory(state), end_lease=lambda lease: None, fail_step=lambda v, why: None)
    peers.drop = lambda peer, reason: (dropped.append(reason), state.peers.pop(peer.identity))
    peer = Peer(b"r", "reader", 0, 1, 0.0, "elsewhere", False, clock.wall)
    state.peers[b"r"] = peer
    return peers, dropped


@pytest.mark.fast
@pytest.mark.parametrize(
    "gap, busy",
    [
        (1.2, 1.1),  # every check after a burst of requests that kept the loop busy 1.1 s of 1.2 s
        (1.2, 0.0),  # every check after the loop was starved (off the CPU) 1.2 s
        (3.0, 0.0),  # long stalls, one after the other
    ],
)
def test_a_silent_remote_peer_is_dropped_even_when_every_check_comes_after_a_stall(monkeypatch, gap, busy):
    clock = _Clock()
    monkeypatch.setattr(peers_mod, "time", clock)
    timeout = 3.0
    peers, dropped = _silent_remote(clock, timeout)
    checks = 0
    while not dropped:
        clock.wall += gap
        clock.cpu += busy
        peers.check_liveness()
        checks += 1
        # busy time is silence; off-CPU time is forgiven but for a tick, and every other check may drop
        assert checks * min(gap, busy + 0.2) < 3 * timeout + 2 * gap, "a silent peer outlived its timeout"
    assert "silent for" in dropped[0]
