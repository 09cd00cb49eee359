"""The train-loop hook against a daemon that dies, restarts, hangs or waits for slow ranks.

Real `stager serve` processes, killed with SIGKILL (or stopped with SIGSTOP) and restarted.
"Fast" is shown by the kind of failure, never by a clock: with the client's timeout at 30 s, a
call that gives up because it saw the connection drop fails UNAVAILABLE, one that waited the
timeout out fails TIMEOUT. Measured figures are printed (run with -s to see them).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import zmq

from helpers import has_ipv6_loopback, wait_until
from stager.client import StagingClient
from stager.client.admin import daemon_status
from stager.client.connection import Connection
from stager.client.hook.handle import StageHandle
from stager.client.hook.replies import SealTracker
from stager.dev.launch import free_port
from stager.protocol import ErrorCode, HelloReply, Ok, Ping, Pong, StagerError, Status, StatusReply, decode
from stager.protocol.endpoint import is_ipv6_endpoint

TIMEOUT = 30.0  # the client's configured timeout: a fast failure is any code but TIMEOUT
ARGS = ("--memory-limit", "32MiB", "--step-timeout", "30")


def _client(endpoint, rank, local_world_size=2, **kw):
    kw.setdefault("timeout", TIMEOUT)
    return StagingClient(endpoint, rank=rank, local_world_size=local_world_size, world_size=local_world_size, **kw)


def _sd(rank, value=1.0):
    return {f"w{rank}": torch.full((64,), value)}  # each rank its own tensor: both really write


def _in_flight(endpoint, step) -> bool:
    """The daemon holds ``step`` in flight (a begin of it arrived)."""
    return any(v["step"] == step and v["state"] == "staging" for v in daemon_status(endpoint)["versions"])


def _error(handle, timeout=120.0) -> StagerError:
    with pytest.raises(StagerError) as info:
        handle.wait(timeout)
    return info.value


@pytest.fixture
def daemons(daemon_processes):
    return lambda endpoint, args=ARGS: daemon_processes(endpoint, *args)


# ------------------------------------------------------------------ a daemon killed, hung or restarted mid-call


def test_a_begin_in_flight_fails_fast_when_the_daemon_is_killed_and_the_next_stage_seals(endpoint, daemons):
    first = daemons(endpoint)
    with _client(endpoint, 0) as r0:
        h = r0.stage(_sd(0), step=1)  # a new layout: the daemon holds the begin for rank 1's plan
        wait_until(lambda: _in_flight(endpoint, 1))
        t0 = time.monotonic()
        first.stop(signal.SIGKILL)
        err = _error(h)
        print(
            f"\nbegin in flight: failed {1000 * (time.monotonic() - t0):.0f} ms after kill -9 "
            f"(timeout {TIMEOUT:.0f} s): {err}"
        )
        assert err.code == ErrorCode.UNAVAILABLE and "lost the connection" in err.message, err
        daemons(endpoint)
        with _client(endpoint, 1) as r1:  # staging resumes at the very next step
            h0, h1 = r0.stage(_sd(0, 2.0), step=2), r1.stage(_sd(1, 2.0), step=2)
            assert h0.wait(60)["step"] == 2 and h1.wait(60)["step"] == 2


def test_the_stage_after_a_timed_out_begin_waits_for_the_reconnect(endpoint, daemons):
    d = daemons(endpoint)
    with _client(endpoint, 0, local_world_size=1, timeout=1.0) as c:
        c.stage(_sd(0), step=1).wait(30)
        os.kill(d.pid, signal.SIGSTOP)  # hung: the connection stays up, nothing answers
        try:
            err = _error(c.stage(_sd(0), step=2))
            h = c.stage(_sd(0), step=3)  # queued while the daemon still cannot answer a handshake
            t0 = time.monotonic()
            # it stays stopped a moment (0.2 s, within the reconnect's 0.5 s), or until the stage gave up
            wait_until(lambda: h.done() or time.monotonic() - t0 > 0.2)
        finally:
            os.kill(d.pid, signal.SIGCONT)
        t0 = time.monotonic()
        assert h.wait(30)["step"] == 3  # the reconnect hello waited for the new socket to connect
        print(f"\nstage after a timed-out begin sealed {1000 * (time.monotonic() - t0):.0f} ms after SIGCONT")
        # silence (not even pongs) ended the begin's wait after the timeout, not after the seal timeout
        assert err.code == ErrorCode.TIMEOUT and "no answer to pings" in err.message, err


def test_a_rank_that_skipped_a_step_across_a_restart_unblocks_the_others(endpoint, daemons):
    """Rank 0's stage of step 2 fails (daemon down) and rank 0 stages nothing more (it waits in a
    collective for rank 1); rank 1 reaches the restarted daemon at step 2. Rank 0's client tells
    the daemon it gave up on step 2 as soon as it reconnects: rank 1 must not wait for it."""
    first = daemons(endpoint)
    with _client(endpoint, 0) as r0, _client(endpoint, 1) as r1:
        h0, h1 = r0.stage(_sd(0), step=1), r1.stage(_sd(1), step=1)
        assert h0.wait(60)["step"] == 1 and h1.wait(60)["step"] == 1
        first.stop(signal.SIGKILL)
        assert _error(r0.stage(_sd(0), step=2)).code == ErrorCode.UNAVAILABLE
        daemons(endpoint)
        t0 = time.monotonic()
        err = _error(r1.stage(_sd(1), step=2))
        print(
            f"\nrank 1's step 2 failed {1000 * (time.monotonic() - t0):.0f} ms after its stage "
            f"(timeout {TIMEOUT:.0f} s, step timeout 30 s): {err}"
        )
        assert err.code == ErrorCode.STEP_FAILED and "rank 0 aborted step 2" in err.message, err
        h0, h1 = r0.stage(_sd(0, 3.0), step=3), r1.stage(_sd(1, 3.0), step=3)
        assert h0.wait(60)["step"] == 3 and h1.wait(60)["step"] == 3


@pytest.mark.parametrize("order", ["behind_first", "ahead_first"])
def test_a_step_another_rank_went_past_fails_at_once(endpoint, daemons, order):
    """After a restart one rank reaches the daemon at step 5, the other (whose stage of step 5
    failed) at step 6: whichever begin comes first, step 5 fails at once and step 6 seals."""
    daemons(endpoint)
    with _client(endpoint, 0) as r0, _client(endpoint, 1) as r1:
        if order == "behind_first":
            h1 = r1.stage(_sd(1), step=5)
            wait_until(lambda: _in_flight(endpoint, 5))
            h0 = r0.stage(_sd(0), step=6)
        else:
            h0 = r0.stage(_sd(0), step=6)
            wait_until(lambda: _in_flight(endpoint, 6))
            h1 = r1.stage(_sd(1), step=5)
        err = _error(h1)
        assert err.code == ErrorCode.STEP_FAILED and "rank 0" in err.message and "timed out" not in err.message, err
        assert "without beginning" in err.message, err
        h1 = r1.stage(_sd(1), step=6)
        assert h0.wait(60)["step"] == 6 and h1.wait(60)["step"] == 6


# ------------------------------------------------------------------ ranks slow to begin


def test_a_rank_slow_to_begin_a_new_layout_does_not_fail_the_step(endpoint, daemons):
    timeout = 1.0
    daemons(endpoint)
    with _client(endpoint, 0, timeout=timeout) as r0:
        h0 = r0.stage(_sd(0), step=1)
        wait_until(lambda: _in_flight(endpoint, 1))
        t0 = time.monotonic()
        # rank 1 arrives four client timeouts later; meanwhile rank 0's begin must still be waiting
        wait_until(lambda: h0.done() or time.monotonic() - t0 > 4 * timeout, timeout=60)
        assert not h0.done(), h0.error
        with _client(endpoint, 1, timeout=timeout) as r1:
            assert r1.stage(_sd(1), step=1).wait(60)["step"] == 1
        assert h0.wait(60)["step"] == 1


def test_a_rank_that_never_begins_fails_the_step_at_the_daemons_step_timeout(endpoint, daemons):
    daemons(endpoint, args=("--memory-limit", "32MiB", "--step-timeout", "3"))
    with _client(endpoint, 0, timeout=1.0) as r0:
        t0 = time.monotonic()
        err = _error(r0.stage(_sd(0), step=1))
        print(f"\nbegin waited {time.monotonic() - t0:.1f} s (client timeout 1 s, step timeout 3 s): {err}")
        assert err.code == ErrorCode.STEP_FAILED, err  # the daemon's verdict, not the client's TIMEOUT
        assert "ranks [1] never began it" in err.message and "timed out after 3s" in err.message, err


# ------------------------------------------------------------------ restarts while a job stages

RANK_LOOP = """
import json, os, sys, time, torch, torch.distributed as dist
from stager.client import StagingClient
dist.init_process_group("gloo")
rank = dist.get_rank()
c = StagingClient(sys.argv[1], timeout=30.0, seal_timeout=120.0)
sd = {f"w{rank}": torch.zeros(1 << 12)}
tick = torch.zeros(1)
for step in range(1, 100000):
    sd[f"w{rank}"].fill_(step)
    t0 = time.monotonic()
    h = c.stage(sd, step=step)
    h.wait_copied(timeout=300)
    try:
        h.wait(300); code, message = None, ""
    except Exception as exc:
        code, message = getattr(getattr(exc, "code", None), "value", "?"), str(exc)[:300]
    print(json.dumps({"step": step, "sealed": code is None, "code": code, "message": message,
                      "dt": time.monotonic() - t0, "t": time.monotonic()}), flush=True)
    # the ranks move in lockstep, as a training job's collectives make them, and stop together: a rank that
    # saw the stop file alone would leave the other's next step waiting for it until --step-timeout
    tick.fill_(float(os.path.exists(sys.argv[2])))
    dist.all_reduce(tick)
    if tick.item() > 0:
        break
    time.sleep(0.1)
"""


def test_daemon_restarts_while_two_ranks_stage_every_100ms(endpoint, daemons, short_dir):
    restarts = 4
    stop_file = os.path.join(short_dir, "stop")
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
    )
    daemon = daemons(endpoint)
    ranks, records = [], {0: [], 1: []}
    for r in range(2):
        ranks.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK_LOOP, endpoint, stop_file],
                stdout=subprocess.PIPE,
                text=True,
                env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            )
        )

    def read(r):
        for line in ranks[r].stdout:
            records[r].append(json.loads(line))

    readers = [threading.Thread(target=read, args=(r,), daemon=True) for r in range(2)]
    for t in readers:
        t.start()

    def sealed_after(t, n=1):  # both ranks sealed n steps they staged after time t
        return all(sum(x["sealed"] and x["t"] - x["dt"] > t for x in records[r]) >= n for r in range(2))

    resumed = []
    try:
        wait_until(lambda: sealed_after(0), timeout=120)
        for _ in range(restarts):
            daemon.stop(signal.SIGKILL)
            killed = time.monotonic()
            wait_until(
                lambda: all(any(not x["sealed"] and x["t"] > killed for x in records[r]) for r in range(2)), timeout=120
            )
            daemon = daemons(endpoint)
            ready = time.monotonic()
            wait_until(lambda: sealed_after(ready, 3), timeout=120)  # staging resumed: a few steps, then kill again
            first = max(min(x["t"] for x in records[r] if x["sealed"] and x["t"] - x["dt"] > ready) for r in range(2))
            resumed.append(first - ready)
    finally:
        open(stop_file, "w").close()
        for p in ranks:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    failed = [x for r in range(2) for x in records[r] if not x["sealed"]]
    codes = sorted({x["code"] for x in failed})
    print(
        f"\n{restarts} restarts: {sum(len(v) for v in records.values())} stages, {len(failed)} failed ({codes}); "
        f"slowest failed stage {max(x['dt'] for x in failed):.2f} s (timeout {TIMEOUT:.0f} s); "
        f"both ranks sealed again {', '.join(f'{1000 * s:.0f}' for s in resumed)} ms after the daemon was ready; "
        f"slowest sealed stage {max(x['dt'] for r in range(2) for x in records[r] if x['sealed']):.2f} s"
    )
    assert not [x for x in failed if x["code"] == ErrorCode.TIMEOUT.value or "timed out" in x["message"]], failed
    assert len(resumed) == restarts


def test_a_lost_connection_fails_only_the_seals_sent_on_it():
    class Conn:  # what SealTracker reads of a Connection
        session, connected, generation = "s1", True, 1

    tracker = SealTracker(Conn(), seal_timeout=60.0)
    old, new = StageHandle(1, strict=False), StageHandle(2, strict=False)
    tracker.add(41, old, 0.0)
    tracker.add(43, new, 0.0)
    tracker.ping_id = 42
    tracker.on_lost(42)  # the monitor saw the connection drop after request 42 went out
    assert old.done() and old.error.code == ErrorCode.UNAVAILABLE and "lost the connection" in old.error.message
    assert not new.done() and list(tracker.pending) == [43] and tracker.ping_id is None


# ------------------------------------------------------------------ IPv6 endpoints


@pytest.mark.parametrize(
    "endpoint,v6",
    [
        ("tcp://[::1]:5555", True),
        ("tcp://[fe80::1%25lo]:5555", True),
        ("tcp://127.0.0.1:5555", False),
        ("tcp://localhost:5555", False),
        ("ipc:///tmp/x.sock", False),
    ],
)
def test_ipv6_literals_are_recognised(endpoint, v6):
    assert is_ipv6_endpoint(endpoint) is v6


def test_a_reply_of_another_type_than_the_request_expects_is_a_typed_error(short_dir):
    """``Connection.request(expect=...)``: a daemon that answers a request with a reply of the
    wrong type is a BAD_MESSAGE naming both (one place, for every request that expects a type)."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{short_dir}/wrong.sock"
    router.bind(endpoint)
    conn = Connection(endpoint, role="admin")

    def answer(make):
        assert router.poll(10_000)
        identity, *frames = router.recv_multipart()
        router.send_multipart([identity, *make(decode(frames).id).encode()])

    try:
        replier = threading.Thread(
            target=lambda: (answer(lambda rid: HelloReply(id=rid, session="s")), answer(lambda rid: Ok(id=rid))),
            daemon=True,
        )
        replier.start()
        with pytest.raises(StagerError) as info:
            conn.request(Status(), 10.0, expect=StatusReply)  # says hello first: answered as it should be
        replier.join(10)
        assert info.value.code == ErrorCode.BAD_MESSAGE and "unexpected ok reply to status" in info.value.message
    finally:
        conn.close()
        router.close()


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_an_ipv6_endpoint_is_reachable():
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.IPV6, 1)
    port = router.bind_to_random_port("tcp://[::1]")
    conn = Connection(f"tcp://[::1]:{port}", role="admin")
    try:
        assert conn.wait_connected(10), "the client never connected to tcp://[::1]"
        rid = conn.send(Ping())
        assert router.poll(10_000)
        identity, *frames = router.recv_multipart()
        router.send_multipart([identity, *Pong(id=decode(frames).id, session="s").encode()])
        assert isinstance(conn.wait_reply(rid, 10.0, "ping"), Pong)
    finally:
        conn.close()
        router.close()


def test_a_connection_nobody_reads_never_stops_the_processs_zmq_io_thread(make_daemon, short_dir, monkeypatch):
    """An idle connection to a peer that keeps dropping it queues a monitor event per attempt.
    Past libzmq's 2000-message monitor queue the I/O thread used to block for good, holding the
    socket's monitor lock: every other socket of the process stopped and closing it hung."""
    import socket

    from stager.client import dealer

    monkeypatch.setattr(dealer, "RECONNECT_IVL_MS", 1)  # an attempt a millisecond instead of 4 a second
    monkeypatch.setattr(dealer, "RECONNECT_IVL_MAX_MS", 1)
    path = os.path.join(short_dir, "drops.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    accepted = [0]

    def drop_every_connection():  # a peer that accepts each connection and closes it at once
        while accepted[0] >= 0:
            try:
                peer, _ = listener.accept()
            except OSError:
                return
            peer.close()
            accepted[0] += 1

    dropper = threading.Thread(target=drop_every_connection, daemon=True)
    dropper.start()
    idle = Connection(f"ipc://{path}", role="reader")
    try:
        wait_until(lambda: accepted[0] >= 3000, timeout=120)  # past the old queue's 2000 messages
        d = make_daemon()
        assert daemon_status(d.endpoint)["versions"] == []  # another socket of this process still works
        # the owner reads every event queued meanwhile (thousands) and sees the peer down
        assert idle.poll_monitor(0) is False and not idle.connected
    finally:
        closer = threading.Thread(target=idle.close, daemon=True)
        closer.start()
        closer.join(30)
        accepted[0] = -(1 << 30)
        listener.close()
    assert not closer.is_alive(), "closing an unread connection hung"
