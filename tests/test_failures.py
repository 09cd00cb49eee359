"""Failures: ranks and readers that die, a daemon that dies, a daemon that is not there."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import error_code, wire_plan
from helpers import wait_until
from stager.client import StagingClient, Subscriber
from stager.client.admin import daemon_status
from stager.daemon.segments import list_segments
from stager.dev.launch import DaemonProcess
from stager.protocol import Begin, BeginReply, Commit, ErrorCode, StagerError
from stager.protocol.layout import plan_digest
from stager.protocol.shm import SHM_DIR

HERE = os.path.dirname(__file__)


def status_of(endpoint):
    return daemon_status(endpoint)


def test_rank_killed_mid_step_fails_only_that_step():
    width = 1 << 16
    with DaemonProcess(args=("--memory-limit", "64MiB", "--keep", "2")) as daemon:
        rank1 = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {HERE!r}); import dist_jobs; "
                f"dist_jobs.die_mid_step({daemon.endpoint!r}, 1, {width})",
            ]
        )
        try:
            w0 = torch.full((width,), 0.0)
            with StagingClient(daemon.endpoint, rank=0, local_world_size=2, world_size=2, strict=True) as client:
                # each rank holds its own tensor (as pipeline stages do), so rank 1 really writes
                client.stage({"w0": w0}, step=1).wait(60)
                with pytest.raises(StagerError) as info:
                    client.stage({"w0": w0}, step=2).wait(60)
            assert info.value.code == ErrorCode.STEP_FAILED and "rank 1" in info.value.message
            assert rank1.wait(30) == -signal.SIGKILL
        finally:
            rank1.kill()
        status = status_of(daemon.endpoint)
        states = {v["step"]: v["state"] for v in status["versions"]}
        assert states == {1: "sealed", 2: "failed"}
        assert "left during step 2" in status["versions"][-1]["reason"]
        # the previous version is intact and readable (not the scribbled bytes)
        with Subscriber(daemon.endpoint) as sub, sub.latest() as snap:
            assert snap.step == 1 and torch.equal(snap["w0"], w0)
            assert torch.equal(snap["w1"], torch.full((width,), 1.0))
        # the failed step's segment was unlinked: what is on /dev/shm is what the daemon accounts for
        files = list_segments(daemon.pid)
        assert sum(os.path.getsize(os.path.join(SHM_DIR, f)) for f in files) == status["memory"]["used"]
        # keep=2 rotates 3 segments (step 1's, step 2's, one pooled); step 2's was unlinked, not pooled
        assert len(files) == 2


def test_reader_killed_holding_a_lease_releases_it(make_daemon):
    d = make_daemon()
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        c.stage({"w": torch.ones(16)}, step=1).wait(10)
    code = (
        f"from stager.client import Subscriber; import os, signal; s = Subscriber({d.endpoint!r}); "
        "snap = s.latest(); print(snap.step, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "1"
    wait_until(lambda: d.status()["leases"] == 0)


def test_step_times_out_when_a_rank_never_commits(make_daemon, raw_peer):
    d = make_daemon(step_timeout=0.5)
    r0, r1 = raw_peer(d.endpoint), raw_peer(d.endpoint)
    r0.hello(rank=0, local_world_size=2)
    r1.hello(rank=1, local_world_size=2)
    plan0, plan1 = wire_plan(["w", "f32", [4], [0], [2]]), wire_plan(["w", "f32", [4], [2], [2]])
    r0.sock.send_multipart(Begin(id=1, step=1, digest=plan_digest(plan0), plan=plan0).encode())
    r1.sock.send_multipart(Begin(id=1, step=1, digest=plan_digest(plan1), plan=plan1).encode())
    assert isinstance(r0.recv(), BeginReply) and isinstance(r1.recv(), BeginReply)
    r0.sock.send_multipart(Commit(id=2, step=1).encode())
    reply = r0.recv(timeout=5)
    assert error_code(reply) == ErrorCode.STEP_FAILED.value and "ranks [1] did not commit" in reply.message


def test_daemon_down_never_blocks_the_training_loop(short_dir):
    endpoint = f"ipc://{short_dir}/none.sock"
    # a 60 s request timeout: a stage that waited for the daemon would not fail within wait_copied's 5 s
    client = StagingClient(endpoint, rank=0, local_world_size=1, world_size=1, timeout=60.0)
    sd = {"w": torch.ones(4)}
    for step in range(3):
        h = client.stage(sd, step=step)
        assert h.wait_copied(timeout=5) is False  # failed, not waited out (that would raise TIMEOUT)
        assert h.error.code == ErrorCode.UNAVAILABLE and "stager serve" in h.error.message
    client.close()
    strict = StagingClient(endpoint, rank=0, local_world_size=1, world_size=1, strict=True)
    with pytest.raises(StagerError):
        strict.stage(sd, step=1).wait_copied(timeout=5)
    strict.close()


LOOP = """
import json, sys, time, torch
from stager.client import StagingClient
from stager.protocol import StagerError
c = StagingClient(sys.argv[1], rank=0, local_world_size=1, world_size=1, timeout=2.0)
sd = {"w": torch.zeros(1 << 16)}
for step in range(1, 100000):
    sd["w"].fill_(step)
    t0 = time.monotonic()
    h = c.stage(sd, step=step)
    copied = h.wait_copied(timeout=30)
    try:
        h.wait(10); sealed = True
    except StagerError:
        sealed = False
    print(json.dumps({"step": step, "copied": copied, "sealed": sealed, "dt": time.monotonic() - t0}), flush=True)
    time.sleep(0.02)
"""


def test_daemon_killed_and_restarted_while_training_runs(short_dir):
    endpoint = f"ipc://{short_dir}/d.sock"
    first = DaemonProcess(endpoint, args=("--memory-limit", "16MiB")).start()
    loop = subprocess.Popen([sys.executable, "-c", LOOP, endpoint], stdout=subprocess.PIPE, text=True)
    records = []

    def read_until(pred, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = loop.stdout.readline()
            assert line, "the training loop died"
            records.append(json.loads(line))
            if pred(records[-1]):
                return records[-1]
        raise AssertionError(f"condition not met; last records {records[-5:]}")

    second = None
    try:
        read_until(lambda r: r["sealed"] and r["step"] >= 3)
        old_pid = first.pid
        assert list_segments(old_pid)
        first.stop(signal.SIGKILL)
        down = read_until(lambda r: not r["sealed"])
        read_until(lambda r: r["step"] >= down["step"] + 3)  # keeps stepping while the daemon is gone
        second = DaemonProcess(endpoint, args=("--memory-limit", "16MiB")).start()
        assert list_segments(old_pid) == []  # the new daemon reclaimed the dead one's shared memory
        back = read_until(lambda r: r["sealed"])
        with Subscriber(endpoint) as sub, sub.latest() as snap:
            assert snap.step >= back["step"] and float(snap["w"][0]) == float(snap.step)
    finally:
        loop.kill()
        loop.wait()
        first.stop()
        if second:
            second.stop()


def test_subscriber_keeps_waiting_across_a_daemon_restart(short_dir):
    endpoint = f"ipc://{short_dir}/d.sock"
    first = DaemonProcess(endpoint, args=("--memory-limit", "16MiB")).start()
    second = None
    try:
        with StagingClient(endpoint, strict=True) as c:
            c.stage({"w": torch.ones(8)}, step=1).wait(10)
        with Subscriber(endpoint) as sub:
            with sub.wait_for_newer(None, timeout=10) as snap:
                assert snap.step == 1
            first.stop(signal.SIGKILL)
            second = DaemonProcess(endpoint, args=("--memory-limit", "16MiB")).start()
            with StagingClient(endpoint, strict=True) as c:  # the new daemon's first version
                c.stage({"w": torch.full((8,), 2.0)}, step=2).wait(10)
            with sub.wait_for_newer(1, timeout=20) as snap:  # re-subscribes to the new daemon by itself
                assert snap.step == 2 and float(snap["w"][0]) == 2.0
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop()
