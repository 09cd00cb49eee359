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
import time

import pytest
import torch

from dist_jobs import full_tensors, multi_node_stage, scaled
from helpers import wait_until
from stager.client import StagingClient
from stager.client.admin import daemon_status
from stager.dev.launch import SimulatedCluster, run_ranks
from stager.protocol import Acquire, ErrorCode, ErrorReply, Hello, HelloReply, Ping, Pong
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

        reader = subprocess.Popen(
            [sys.executable, "-c", READER, cluster.endpoints[0], str(SILENT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "STAGER_HOST_ID": "reader-host"},
        )  # on no daemon's host
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
            wait_until(
                lambda: all(daemon_status(e)["leases"] == 0 for e in cluster.endpoints),
                timeout=PEER_TIMEOUT + 15,
                interval=0.05,
            )
            print(
                f"kill -9 of the reader: leases on {nodes} daemon(s) freed {time.monotonic() - killed:.2f}s "
                f"later (--peer-timeout {PEER_TIMEOUT}s)"
            )
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


# A reader on another host whose process the test stops (SIGSTOP) and continues (SIGCONT) at the points
# it waits for a line on stdin; it prints what it saw as JSON lines.
STOPPED_READER = """
import json, sys
from stager.client import Subscriber
from stager.protocol import StagerError

def say(**what):
    print(json.dumps(what), flush=True)

sub = Subscriber(sys.argv[1], timeout=10)
snap = sub.latest()
say(leased=snap.step)
sys.stdin.readline()  # stopped meanwhile, until the daemon ended the session
try:
    snap["w"]
    say(read="no error")
except StagerError as exc:
    say(code=exc.code.value, message=exc.message)
snap.release()
say(again=sub.get("w").tolist())  # the next request registers anew
say(waiting=1)
newer = sub.wait_for_newer(1, timeout=60)  # stopped meanwhile, while it waits inside the connection
say(newer=newer.step, w=newer["w"].tolist())
newer.release()
sub.close()
"""


def _reader(script, *args):
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "STAGER_HOST_ID": "reader-host"},
    )  # on no daemon's host


def _finish(reader):
    if reader.poll() is None:
        os.kill(reader.pid, signal.SIGCONT)
        reader.kill()
    reader.wait()
    reader.stdin.close()
    reader.stdout.close()


def test_a_reader_whose_session_ended_is_told_why_and_subscribes_again(make_daemon):
    d = make_daemon(peer_timeout=0.5)
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as c:
        c.stage({"w": torch.arange(6.0)}, step=1).wait(10)
    reader = _reader(STOPPED_READER, d.endpoint)
    try:
        lines = _Lines(reader)
        assert lines.next(60) == {"leased": 1}
        os.kill(reader.pid, signal.SIGSTOP)  # the reader's process is stopped (SIGSTOP, a debugger)
        wait_until(lambda: d.status()["leases"] == 0)
        os.kill(reader.pid, signal.SIGCONT)
        reader.stdin.write(b"go\n")
        reader.stdin.flush()
        told = lines.next(60)
        assert told["code"] == ErrorCode.SESSION_EXPIRED.value and "--peer-timeout 0.5s" in told["message"], told
        assert lines.next(60) == {"again": torch.arange(6.0).tolist()}
        assert lines.next(60) == {"waiting": 1}
        # stopped while it waits for announcements: once running again, the answer to its first
        # heartbeat says its session ended, and it subscribes again
        wait_until(lambda: d.status()["subscribers"] == 1)
        os.kill(reader.pid, signal.SIGSTOP)
        wait_until(lambda: d.status()["subscribers"] == 0)
        os.kill(reader.pid, signal.SIGCONT)
        wait_until(lambda: d.status()["subscribers"] == 1)
        end = time.monotonic() + 3 * 0.5
        while time.monotonic() < end:  # it waits inside the connection for 3 peer timeouts: beating itself
            assert d.status()["subscribers"] == 1
        with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as c:
            c.stage({"w": torch.arange(6.0) * 2}, step=2).wait(10)
        assert lines.next(60) == {"newer": 2, "w": (torch.arange(6.0) * 2).tolist()}
        assert reader.wait(60) == 0
    finally:
        _finish(reader)


# A reader on another host that leases the newest version, then waits for a line on stdin (the test
# stops it meanwhile) and reads every tensor of that lease.
LEASED_READER = """
import hashlib, json, sys
import torch
from stager.client import Subscriber

def digest(t):
    return f"{t.dtype}{list(t.shape)}" + hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()

with Subscriber(sys.argv[1], timeout=30) as sub:
    snap = sub.wait_for_newer(None, timeout=60)
    print(json.dumps({"leased": snap.step}), flush=True)
    sys.stdin.readline()
    print(json.dumps({"read": {name: digest(snap[name]) for name in snap}}), flush=True)
    snap.release()
"""


def test_a_daemon_stopped_longer_than_the_peer_timeout_keeps_its_remote_readers(keys, monkeypatch):
    """The daemon's own stall (SIGSTOP: the hung-daemon case) is not its readers' silence. What a
    reader sent meanwhile may still sit in kernel buffers when the daemon resumes (ZeroMQ's I/O
    thread was stopped too), and whether the daemon reads it before its first housekeeping is a
    race; here the reader's process is stopped with the daemon and continued only once the daemon
    has run several housekeeping ticks after resuming, which makes that race's losing side certain."""
    peer_timeout, stopped = 3.0, 7.0
    monkeypatch.setenv("STAGER_AUTH_DIR", keys)  # CURVE over tcp, as across real hosts
    args = ("--memory-limit", "64MiB", "--peer-timeout", str(peer_timeout))
    with SimulatedCluster(1, args=args, auth_dir=keys) as cluster:
        daemon, endpoint = cluster.daemons[0], cluster.endpoints[0]
        monkeypatch.setenv("STAGER_HOST_ID", "node-0")  # the trainer beside its daemon
        with StagingClient(endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as c:
            c.stage({"model": scaled(full_tensors(), 3)}, step=3).wait(60)
        monkeypatch.delenv("STAGER_HOST_ID")
        reader = _reader(LEASED_READER, endpoint)
        try:
            lines = _Lines(reader)
            assert lines.next(120) == {"leased": 3}  # leased and subscribed
            status = daemon_status(endpoint)
            asked = time.monotonic()
            assert (status["leases"], status["subscribers"]) == (1, 1)
            os.kill(reader.pid, signal.SIGSTOP)  # its heartbeats are held back until the daemon ran a while
            os.kill(daemon.pid, signal.SIGSTOP)
            try:
                time.sleep(stopped)  # creates the stopped condition; the proof is the lease below
            finally:
                os.kill(daemon.pid, signal.SIGCONT)
            # the daemon's uptime when it resumed (one host, one monotonic clock), then 3 ticks of its own
            resumed = status["uptime_s"] + time.monotonic() - asked
            status = wait_until(lambda: (s := daemon_status(endpoint))["uptime_s"] > resumed + 0.6 and s, timeout=60)
            os.kill(reader.pid, signal.SIGCONT)
            assert (status["leases"], status["subscribers"]) == (1, 1), "the daemon's stall ended a live reader"
            end = time.monotonic() + 2 * peer_timeout
            while time.monotonic() < end:  # heard again in time: the session goes on
                status = daemon_status(endpoint)
                assert (status["leases"], status["subscribers"]) == (1, 1)
            reader.stdin.write(b"go\n")
            reader.stdin.flush()
            expected = {f"model.{k}": _digest(v) for k, v in scaled(full_tensors(), 3).items()}
            assert lines.next(60) == {"read": expected}  # bit for bit, on the same lease
            assert reader.wait(60) == 0
        finally:
            _finish(reader)


def test_a_silent_remote_reader_is_dropped_although_the_daemon_stalls_again_and_again(keys, monkeypatch):
    """Stalls of the daemon longer than a tick (a loaded host) do not count as a remote reader's silence, but
    the time the daemon ran does: a reader silent for good is dropped although the stalls come more often than
    --peer-timeout (each stall restarted its silence before, so it held its lease for as long as they came)."""
    peer_timeout = 3.0
    monkeypatch.setenv("STAGER_AUTH_DIR", keys)
    args = ("--memory-limit", "64MiB", "--peer-timeout", str(peer_timeout))
    with SimulatedCluster(1, args=args, auth_dir=keys) as cluster:
        daemon, endpoint = cluster.daemons[0], cluster.endpoints[0]
        monkeypatch.setenv("STAGER_HOST_ID", "node-0")
        with StagingClient(endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as c:
            c.stage({"model": scaled(full_tensors(), 3)}, step=3).wait(60)
        monkeypatch.delenv("STAGER_HOST_ID")
        reader = _reader(LEASED_READER, endpoint)
        try:
            assert _Lines(reader).next(120) == {"leased": 3}
            os.kill(reader.pid, signal.SIGSTOP)  # silent from now on
            deadline = time.monotonic() + 120
            while daemon_status(endpoint)["leases"]:
                assert time.monotonic() < deadline, "a silent reader kept its lease through the daemon's stalls"
                os.kill(daemon.pid, signal.SIGSTOP)  # a stall of 1.5 s, then 0.5 s of running: the condition
                try:
                    time.sleep(1.5)
                finally:
                    os.kill(daemon.pid, signal.SIGCONT)
                time.sleep(0.5)
            assert daemon_status(endpoint)["subscribers"] == 0
        finally:
            os.kill(reader.pid, signal.SIGCONT)
            _finish(reader)
