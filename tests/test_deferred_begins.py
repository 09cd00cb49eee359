"""Every way the daemon holds a Begin back ends in a reply within the step timeout.

A Begin is deferred (answered later, not at once) in exactly these places (``Steps.on_begin`` parks
it in ``Version.waiting_begin``; every other outcome is an immediate reply or typed error):

- planning: a new layout waits for every local rank's plan (a partner rank that never begins);
- allocating, memory: no room within ``--memory-limit`` (back-pressure, up to the rank's
  ``wait_ms``, which the daemon caps at the step timeout);
- allocating, a segment being created on the daemon's background thread.

Each such step is in ``DaemonState.staging`` whatever its phase, and ``Steps.check_timeouts`` fails
every step there once it is older than ``--step-timeout``, answering its waiting begins with
``step_failed``. Not deferred: a step beyond ``MAX_IN_FLIGHT`` (``memory_limit`` at once), a step
a partner already went past, a drain (``unavailable`` at once). These tests park four begins in each
way, as the fuzz campaign's trainer peer did (see RELIABILITY.md), and wait for each reply with a
deadline far above the step timeout: the reply must be the daemon's typed verdict, naming the bound.
"""

import os
import signal
import sys
import threading
import time

import pytest

from conftest import RawPeer, wire_plan
from helpers import wait_until
from stager.dev.launch import DaemonProcess
from stager.protocol import (
    Acquire,
    AcquireReply,
    Begin,
    BeginReply,
    Commit,
    ErrorCode,
    ErrorReply,
    Hello,
    Sealed,
    decode,
)
from stager.protocol.endpoint import host_id, process_start_time
from stager.protocol.layout import plan_digest

STEP_TIMEOUT = 1  # seconds; replies are awaited for REPLY_DEADLINE (a loaded CI machine is slow, never this slow)
REPLY_DEADLINE = 60.0
PARKED = 4  # begins in flight at once, as the fuzz campaign's peers keep
STRESS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "stress")


def _hello(peer: RawPeer, rank: int, lws: int, *, remote: bool = False):
    pid = 10 if remote else os.getpid()  # a remote rank: another host's pid, alive while it talks
    reply = peer.request(
        Hello(
            role="trainer",
            rank=rank,
            local_world_size=lws,
            world_size=lws,
            pid=pid,
            start_time=1.5 if remote else process_start_time(pid),
            host_id="elsewhere:boot" if remote else host_id(),
        )
    )
    assert reply.TYPE == "hello_reply", reply


def _begin(peer: RawPeer, step: int, plan, wait_ms: int = 0) -> int:
    msg = Begin(step=step, digest=plan_digest(plan), plan=plan, wait_ms=wait_ms)
    msg.id = peer.next_id()
    peer.send_frames(msg.encode())
    return msg.id


def _replies(peer: RawPeer, ids) -> dict:
    """The replies to ``ids``, each awaited up to REPLY_DEADLINE (a missing one fails the test)."""
    got = {}
    while set(ids) - set(got):
        assert peer.sock.poll(int(REPLY_DEADLINE * 1000)), f"no reply to begins {sorted(set(ids) - set(got))}"
        reply = decode(peer.sock.recv_multipart())
        assert reply.id in ids and reply.id not in got, reply
        got[reply.id] = reply
    return got


def _timed_out(reply, phase: str) -> None:
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == ErrorCode.STEP_FAILED.value, reply
    assert f"timed out after {STEP_TIMEOUT}s in phase {phase}" in reply.message, reply.message
    assert "--step-timeout" in reply.message, reply.message  # says what to do


@pytest.fixture
def serve(short_dir):
    started = []

    def start(*args):
        d = DaemonProcess(
            f"ipc://{short_dir}/d.sock", args=("--step-timeout", str(STEP_TIMEOUT), "--peer-timeout", "60", *args)
        ).start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
def test_begins_waiting_for_a_partner_ranks_plan_are_answered_at_the_step_timeout(serve, remote):
    d = serve("--memory-limit", "16MiB")
    peer = RawPeer(d.endpoint)
    try:
        _hello(peer, 1, 2, remote=remote)  # rank 0 of the node never begins: no layout can be planned
        plan = wire_plan(["w", "f32", [8, 4], [4, 0], [4, 4]])
        ids = [_begin(peer, step, plan, wait_ms=10**9) for step in range(1, PARKED + 1)]
        for reply in _replies(peer, ids).values():  # the rank is silent meanwhile, as a blocked rank would be
            _timed_out(reply, "planning")
            assert "ranks [0] never began it" in reply.message, reply.message
    finally:
        peer.close()


def test_begins_waiting_for_memory_are_answered_within_the_step_timeout(serve):
    d = serve("--memory-limit", "4MiB", "--keep", "1")
    peer, reader = RawPeer(d.endpoint), RawPeer(d.endpoint)
    try:
        _hello(peer, 0, 1)
        plan = wire_plan(["w", "f32", [768, 1024], [0, 0], [768, 1024]])  # 3 MiB: one segment fits, not two
        assert isinstance(peer.request(Begin(step=1, digest=plan_digest(plan), plan=plan)), BeginReply)
        assert isinstance(peer.request(Commit(step=1)), Sealed)
        reader.hello(role="reader")
        lease = reader.request(Acquire(step=1))  # the newest version, leased: nothing can make room
        assert isinstance(lease, AcquireReply), lease
        # a rank's wait_ms far beyond the step timeout: the daemon caps the back-pressure wait at it
        ids = [_begin(peer, step, plan, wait_ms=10**9) for step in range(2, PARKED + 2)]
        for reply in _replies(peer, ids).values():
            assert isinstance(reply, ErrorReply), reply
            if reply.code == ErrorCode.MEMORY_LIMIT.value:  # the back-pressure wait ended first
                assert "release leases" in reply.message and "raise --memory-limit" in reply.message, reply.message
            else:  # or the step's timeout, in the same housekeeping tick
                _timed_out(reply, "allocating")
    finally:
        peer.close()
        reader.close()


class _HeldSegments:
    """The daemon's segment factory, held: every segment stays 'being created' until ``release``."""

    def __init__(self, make):
        self.make, self.release = make, threading.Event()
        self.preallocated = make.preallocated

    def __call__(self, *args, **kw):
        self.release.wait(REPLY_DEADLINE)
        return self.make(*args, **kw)


def test_begins_waiting_for_a_segment_being_created_are_answered_at_the_step_timeout(make_daemon, raw_peer):
    # the one case a real process cannot hold on demand: creation is a posix_fallocate on a background
    # thread; here the in-process daemon's factory waits for the test instead
    d = make_daemon(step_timeout=float(STEP_TIMEOUT))
    budget = d.daemon.budget
    held = budget._make = _HeldSegments(budget._make)
    peer = raw_peer(d.endpoint)
    try:
        _hello(peer, 0, 1)
        plan = wire_plan(["w", "f32", [4, 4], [0, 0], [4, 4]])
        ids = [_begin(peer, step, plan, wait_ms=10**9) for step in range(1, PARKED + 1)]
        for reply in _replies(peer, ids).values():
            _timed_out(reply, "allocating")
    finally:
        held.release.set()


# ------------------------------------------------------------------ the fuzz campaign's accounting of them


def _fuzz():
    """The fuzz campaign's module (stress/fuzz.py)."""
    if STRESS not in sys.path:
        sys.path.insert(0, STRESS)
    import fuzz

    return fuzz


def _fuzz_peer(endpoint: str, reply_timeout: float):
    """A fuzz campaign peer, driven by hand: its send, pump and failure accounting (its thread never runs)."""
    fuzz = _fuzz()
    return fuzz.Peer(0, "trainer", endpoint, 0, fuzz.Control(0), fuzz.Messages(), reply_timeout, host_id(), 0)


def _fuzz_send(fuzz_peer, kind: str, body: dict, desc: str) -> None:
    msgs = fuzz_peer.msgs
    fuzz_peer.send([msgs.pack(msgs.header(kind, next(fuzz_peer.ids), body))], desc)


def test_the_fuzz_campaign_allows_a_deferred_begin_the_daemons_step_timeout(serve):
    """The cf5dd60 finding (RELIABILITY.md): the campaign gave a begin the daemon may hold back for its
    step timeout the same reply timeout as an immediate request, so a starved daemon's deferred
    replies were the first counted as unanswered. Here the reply timeout is shorter than the step
    timeout, so the daemon's (correct) answer always comes after it."""
    step_timeout = _fuzz().STEP_TIMEOUT  # the campaign's daemon's
    d = serve("--memory-limit", "16MiB", "--step-timeout", f"{step_timeout:g}")
    peer = _fuzz_peer(d.endpoint, reply_timeout=step_timeout - 2)
    try:
        # the wire example's hello, which the campaign's trainer peer sends: rank 1 of 2, on another host
        hello = Hello(role="trainer", rank=1, local_world_size=2, world_size=4, pid=10)
        _fuzz_send(peer, "hello", hello.body(), "hello/trainer")
        peer.drain(time.monotonic() + REPLY_DEADLINE)
        assert peer.codes["hello_reply"] == 1, (peer.codes, peer.failures)
        plan = wire_plan(["fz0.w", "f32", [4, 4], [0, 0], [4, 4]])
        for step in range(1, PARKED + 1):  # held back: rank 0 never begins
            _fuzz_send(peer, "begin", Begin(step=step, digest=plan_digest(plan), plan=plan).body(), "begin/trainer")
        peer.drain(time.monotonic() + REPLY_DEADLINE)
        assert peer.failures == [], peer.failures
        assert peer.codes["step_failed"] == PARKED and peer.slowest["deferred"][1] == "begin/trainer", peer.codes
    finally:
        peer.sock.close(0)


def test_the_fuzz_campaign_names_a_late_reply_with_the_request_it_answers(serve):
    """A reply that comes after its request was counted unanswered is one failure that says how late
    it came (a starved or stopped daemon), not a second one about a reply nobody asked for."""
    d = serve("--memory-limit", "16MiB")
    peer = _fuzz_peer(d.endpoint, reply_timeout=1.0)
    os.kill(d.pid, signal.SIGSTOP)  # the daemon does not run: the ping cannot be answered in time
    try:
        _fuzz_send(peer, "ping", {}, "ping/valid")
        wait_until(lambda: peer.pump(50) or peer.failures, timeout=REPLY_DEADLINE)
        os.kill(d.pid, signal.SIGCONT)
        wait_until(lambda: peer.pump(50) or peer.codes["(late)"] or len(peer.failures) > 1, timeout=REPLY_DEADLINE)
        assert len(peer.failures) == 1, peer.failures
        assert "no reply within 1s to ping/valid (answered after" in peer.failures[0], peer.failures
        assert peer.failures[0].endswith(": pong)"), peer.failures
    finally:
        os.kill(d.pid, signal.SIGCONT)
        peer.sock.close(0)
