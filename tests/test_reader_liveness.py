"""Readers on another host keep their sessions while silent, and lose them when their process dies.

The daemon ends the session of a peer on another host it has not heard from for --peer-timeout.
A reader sends heartbeats in the background (client/heartbeat.py), so a rollout worker busy for
minutes inside ``with sub.latest()`` keeps its leases and subscription; one killed loses them
within the peer timeout; and one whose session did end (a stopped process) is told why.
"""

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from dist_jobs import full_tensors, multi_node_stage, scaled
from helpers import wait_until

from stager.client import StagingClient, Subscriber
from stager.client.admin import daemon_status
from stager.client.connection import Connection
from stager.dev.launch import SimulatedCluster, run_ranks
from stager.protocol import Acquire, ErrorCode, ErrorReply, Hello, HelloReply, Ping, Pong, StagerError
from stager.protocol.endpoint import process_start_time

PEER_TIMEOUT = 2.0
SILENT = 4 * PEER_TIMEOUT

# A rollout worker on another host: leases the newest version (subscribed, as a worker following the
# trainer is), computes for SILENT seconds without touching the subscriber (a pure-Python loop, which
# holds the GIL as generation code does between its C calls), then reads every tensor and holds on.
READER = """
import hashlib, json, sys, time
import torch
from stager.client import Subscriber

def digest(t):
    return f"{t.dtype}{list(t.shape)}" + hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()

endpoint, silent = sys.argv[1], float(sys.argv[2])
with Subscriber(endpoint, timeout=30) as sub:
    snap = sub.wait_for_newer(None, timeout=60)
    print(json.dumps({"leased": snap.step}), flush=True)
    end, work = time.monotonic() + silent, 0
    while time.monotonic() < end:
        work += sum(i * i for i in range(2000))
    print(json.dumps({"read": {name: digest(snap[name]) for name in snap}}), flush=True)
    sys.stdin.readline()  # hold the lease until killed
"""


def _digest(t: torch.Tensor) -> str:
    return f"{t.dtype}{list(t.shape)}" + hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


class _Lines:
    """The JSON lines a subprocess prints, each within a deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.fd, self.buf = proc, proc.stdout.fileno(), b""

    def next(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if select.select([self.fd], [], [], left)[0]:
                chunk = os.read(self.fd, 1 << 16)
                assert chunk, f"the reader exited (code {self.proc.wait()}); its stderr is above"
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


@pytest.fixture
def keys(tmp_path):
    from stager.cli import main

    path = str(tmp_path / "keys")
    assert main(["keygen", path]) == 0
    return path


@pytest.mark.parametrize("nodes", [1, 2], ids=["one-daemon", "two-node-job"])
def test_a_silent_remote_reader_keeps_its_leases_and_a_killed_one_loses_them(nodes, keys, monkeypatch):
    monkeypatch.setenv("STAGER_AUTH_DIR", keys)  # CURVE over tcp, as across real hosts
    args = ("--memory-limit", "64MiB", "--peer-timeout", str(PEER_TIMEOUT))
    with SimulatedCluster(nodes, args=args, auth_dir=keys) as cluster:
        if nodes == 1:
            step = 1
            monkeypatch.setenv("STAGER_HOST_ID", "node-0")  # the trainer beside its daemon
            with StagingClient(cluster.endpoints[0], rank=0, local_world_size=1, world_size=1, strict=True) as c:
                c.stage({"model": scaled(full_tensors(), step)}, step=step).wait(60)
            monkeypatch.delenv("STAGER_HOST_ID")
        else:  # a job over two nodes: the reader leases (and subscribes) on both daemons
            step = 2
            run_ranks(multi_node_stage, 4, [1, 2], nodes=cluster.nodes)
        expected = {f"model.{k}": _digest(v) for k, v in scaled(full_tensors(), step).items()}

        def held() -> bool:  # every daemon lists the reader's lease and subscription
            return all((s := daemon_status(e))["leases"] == 1 and s["subscribers"] == 1 for e in cluster.endpoints)

        reader = subprocess.Popen([sys.executable, "-c", READER, cluster.endpoints[0], str(SILENT)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  env={**os.environ, "STAGER_HOST_ID": "reader-host"})  # on no daemon's host
        try:
            lines = _Lines(reader)
            assert lines.next(120) == {"leased": step}
            checks = 0
            while (got := lines.next(0.2)) is None:  # the reader is silent for 4 peer timeouts meanwhile
                assert held(), f"a daemon ended the lease of a live reader silent for less than {SILENT}s"
                checks += 1
            assert checks > 0 and got == {"read": expected}  # every tensor, bit for bit, after the pause
            assert held()
            killed = time.monotonic()
            reader.kill()
            reader.wait()
            wait_until(lambda: all(daemon_status(e)["leases"] == 0 for e in cluster.endpoints),
                       timeout=PEER_TIMEOUT + 15, interval=0.05)
            print(f"kill -9 of the reader: leases on {nodes} daemon(s) freed {time.monotonic() - killed:.2f}s "
                  f"later (--peer-timeout {PEER_TIMEOUT}s)")
            assert all(daemon_status(e)["subscribers"] == 0 for e in cluster.endpoints)
        finally:
            if reader.poll() is None:
                reader.kill()
            reader.wait()
            reader.stdin.close()
            reader.stdout.close()


def test_the_daemon_tells_a_connection_it_ended_for_silence_why(make_daemon, raw_peer):
    d = make_daemon(peer_timeout=0.5)
    peer = raw_peer(d.endpoint)
    hello = Hello(role="reader", pid=os.getpid(), start_time=process_start_time(os.getpid()), host_id="another-host")
    assert isinstance(peer.request(hello), HelloReply)
    for _ in range(15):  # heartbeats for 3 peer timeouts and more: it stays, and each is answered
        peer.send_frames(Ping(id=0).encode())
        pong = peer.recv()
        assert isinstance(pong, Pong) and pong.id == 0
        assert not peer.sock.poll(100)  # nothing else comes (and the heartbeats are paced)
        assert d.status()["readers"] == 1
    wait_until(lambda: d.status()["readers"] == 0)  # silent past the peer timeout: its session ends
    reply = peer.request(Acquire())
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.SESSION_EXPIRED.value, reply
    assert "without a message from it" in reply.message and "--peer-timeout 0.5s" in reply.message
    peer.send_frames(Ping(id=0).encode())  # a heartbeat now is answered: it learns why, unasked
    told = peer.recv()
    assert isinstance(told, ErrorReply) and told.id == 0 and told.code == ErrorCode.SESSION_EXPIRED.value
    stranger = raw_peer(d.endpoint)  # a connection that never said hello is told just that
    assert stranger.request(Acquire()).code == ErrorCode.NOT_REGISTERED.value
    assert isinstance(peer.request(hello), HelloReply)  # registered anew: acquires again
    assert peer.request(Acquire()).code == ErrorCode.NO_VERSION.value


def test_a_reader_whose_session_ended_is_told_why_and_subscribes_again(make_daemon, monkeypatch):
    d = make_daemon(peer_timeout=0.5)
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as c:
        c.stage({"w": torch.arange(6.0)}, step=1).wait(10)
    beating = threading.Event()  # cleared: the reader's process is stopped (SIGSTOP, a debugger)
    beat = Connection._beat
    monkeypatch.setattr(Connection, "_beat", lambda self: beat(self) if beating.is_set() else None)
    monkeypatch.setenv("STAGER_HOST_ID", "another-host")
    sub = Subscriber(d.endpoint, timeout=10)  # a reader on another host
    monkeypatch.delenv("STAGER_HOST_ID")
    try:
        snap = sub.latest()
        wait_until(lambda: d.status()["leases"] == 0)
        with pytest.raises(StagerError) as info:
            snap["w"]
        assert info.value.code == ErrorCode.SESSION_EXPIRED and "--peer-timeout 0.5s" in info.value.message
        snap.release()
        assert torch.equal(sub.get("w"), torch.arange(6.0))  # the next request registered anew
        # stopped while it waits for announcements: once running again, the answer to its first
        # heartbeat says its session ended, and it subscribes again
        got = {}
        waiter = threading.Thread(target=lambda: got.update(snap=sub.wait_for_newer(1, timeout=60)))
        waiter.start()
        wait_until(lambda: d.status()["subscribers"] == 1)
        wait_until(lambda: d.status()["subscribers"] == 0)
        beating.set()
        wait_until(lambda: d.status()["subscribers"] == 1)
        end = time.monotonic() + 3 * 0.5
        while time.monotonic() < end:  # it waits inside the connection for 3 peer timeouts: beating itself
            assert d.status()["subscribers"] == 1
        with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as c:
            c.stage({"w": torch.arange(6.0) * 2}, step=2).wait(10)
        waiter.join(60)
        assert got["snap"].step == 2 and torch.equal(got["snap"]["w"], torch.arange(6.0) * 2)
        got["snap"].release()
    finally:
        beating.set()
        sub.close()


def test_a_daemon_stopped_longer_than_the_peer_timeout_keeps_its_remote_readers(keys, monkeypatch):
    """The daemon's own stall (SIGSTOP: the hung-daemon case) is not its readers' silence. What a
    reader sent meanwhile may still sit in kernel buffers when the daemon resumes (ZeroMQ's I/O
    thread was stopped too), and whether the daemon reads it before its first housekeeping is a
    race; here the reader's heartbeats of the stall are held back until the daemon has run
    several housekeeping ticks after resuming, which makes that race's losing side certain."""
    peer_timeout, stopped = 1.5, 4.5
    monkeypatch.setenv("STAGER_AUTH_DIR", keys)  # CURVE over tcp, as across real hosts
    args = ("--memory-limit", "64MiB", "--peer-timeout", str(peer_timeout))
    with SimulatedCluster(1, args=args, auth_dir=keys) as cluster:
        daemon, endpoint = cluster.daemons[0], cluster.endpoints[0]
        monkeypatch.setenv("STAGER_HOST_ID", "node-0")  # the trainer beside its daemon
        with StagingClient(endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as c:
            c.stage({"model": scaled(full_tensors(), 3)}, step=3).wait(60)
        beating = threading.Event()
        beating.set()
        beat = Connection._beat

        def held_beat(self):  # while held: not sent, and tried again a tenth of the interval later
            if beating.is_set():
                beat(self)
            elif self.keepalive_s is not None:
                self._last_sent = time.monotonic() - self.keepalive_s * 0.9

        monkeypatch.setattr(Connection, "_beat", held_beat)
        monkeypatch.setenv("STAGER_HOST_ID", "reader-host")  # on no daemon's host
        sub = Subscriber(endpoint, timeout=30)
        monkeypatch.delenv("STAGER_HOST_ID")
        try:
            snap = sub.wait_for_newer(None, timeout=60)  # leased and subscribed
            status = daemon_status(endpoint)
            asked = time.monotonic()
            assert (status["leases"], status["subscribers"]) == (1, 1)
            beating.clear()
            os.kill(daemon.pid, signal.SIGSTOP)
            try:
                time.sleep(stopped)  # creates the stopped condition; the proof is the lease below
            finally:
                os.kill(daemon.pid, signal.SIGCONT)
            # the daemon's uptime when it resumed (one host, one monotonic clock), then 3 ticks of its own
            resumed = status["uptime_s"] + time.monotonic() - asked
            status = wait_until(lambda: (s := daemon_status(endpoint))["uptime_s"] > resumed + 0.6 and s, timeout=60)
            beating.set()
            assert (status["leases"], status["subscribers"]) == (1, 1), "the daemon's stall ended a live reader"
            end = time.monotonic() + 2 * peer_timeout
            while time.monotonic() < end:  # heard again in time: the session goes on
                status = daemon_status(endpoint)
                assert (status["leases"], status["subscribers"]) == (1, 1)
            expected = {f"model.{k}": _digest(v) for k, v in scaled(full_tensors(), 3).items()}
            assert {name: _digest(snap[name]) for name in snap} == expected  # bit for bit, on the same lease
            snap.release()
        finally:
            beating.set()
            sub.close()
