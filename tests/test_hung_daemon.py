"""A daemon that shows no sign of life (stopped with SIGSTOP) against one that is alive but slow.

A stopped daemon must not hold the train loop: ``wait_copied()`` gives up once the daemon has
not acknowledged the step's begin within ``ack_timeout`` (1 s by default), the step is skipped
(``handle.skipped``, ``client.stats["skipped"]``) and, while the daemon stays silent, the next
stages are skipped at once. A daemon that acknowledged the begin (it answers a ping sent after it)
and only holds the reply (waiting for memory, for the other ranks) is waited for: nothing is lost.

Real ``stager serve`` processes. The clients' ``timeout`` is 30 s: a wait that returned within
the generous deadlines below did not wait that out. No wall-clock time is asserted.
"""

import json
import os
import signal
import threading
import time

import pytest
import torch
import zmq

from dist_jobs import stage_through_a_hung_daemon
from helpers import wait_until
from stager.client import StagingClient, Subscriber
from stager.client.admin import daemon_status
from stager.client.connection import Connection
from stager.dev.launch import run_ranks
from stager.protocol import ErrorCode, Ok, Ping, Pong, StagerError, Status, decode

TIMEOUT = 30.0  # the clients' timeout: a stopped daemon used to hold wait_copied() this long
RETURNED = 10.0  # a wait_copied() not back within this (far above the 1 s ack timeout) failed the test
MiB = 1 << 20


@pytest.fixture
def daemons(daemon_processes):
    return lambda endpoint, *args: daemon_processes(endpoint, "--step-timeout", "60", *args)


def _client(endpoint, rank=0, local_world_size=1, **kw):
    return StagingClient(
        endpoint, rank=rank, local_world_size=local_world_size, world_size=local_world_size, timeout=TIMEOUT, **kw
    )


class Router:
    """A hand-driven daemon: answers pings when told to (holding them meanwhile, as a hung daemon's
    queue does), and a request once it answered enough pings."""

    def __init__(self, endpoint):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.pongs, self.answer_pings, self.answer_after_pongs = 0, True, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        held, pings = None, []
        while not self.stop.is_set():
            if self.sock.poll(20):
                identity, *frames = self.sock.recv_multipart()
                msg = decode(frames)
                if isinstance(msg, Ping):
                    pings.append((identity, msg.id))
                else:
                    held = (identity, msg.id)
            while self.answer_pings and pings:
                identity, rid = pings.pop(0)
                self.sock.send_multipart([identity, *Pong(id=rid, session="s").encode()])
                self.pongs += 1
            if held and self.answer_after_pongs is not None and self.pongs >= self.answer_after_pongs:
                self.sock.send_multipart([held[0], *Ok(id=held[1]).encode()])
                held = None

    def close(self):
        self.stop.set()
        self.thread.join(10)
        self.sock.close()


def test_the_answer_to_a_ping_sent_after_a_request_acknowledges_it(short_dir):
    router = Router(f"ipc://{short_dir}/r.sock")
    conn = Connection(f"ipc://{short_dir}/r.sock", role="trainer")
    conn.ack_timeout, conn.patience = 0.2, 60.0
    try:
        assert conn.wait_connected(10)
        # acknowledged (pings answered), the reply held well past the ack timeout: the wait goes on
        router.answer_after_pongs = 3  # pings after the first answer come every second: 2 s and more
        assert isinstance(conn.wait_reply(conn.send(Status()), 30.0, "status"), Ok)
        assert router.pongs >= 3 and conn.silent_since is None
        # nothing answered: NO_SIGN_OF_LIFE after the ack timeout (not the 30 s timeout), and silent since
        router.answer_pings, router.answer_after_pongs = False, None
        with pytest.raises(StagerError) as info:
            conn.wait_reply(conn.send(Status()), 30.0, "status")
        assert info.value.code == ErrorCode.NO_SIGN_OF_LIFE and "within 0.2s of status" in info.value.message
        assert conn.silent_since is not None and not conn.await_life(0.3)
        router.answer_pings = True  # the daemon answers again: the silence ends at the first answer
        assert conn.await_life(30) and conn.silent_since is None
    finally:
        conn.close()
        router.close()


def _sealed(endpoint) -> list[int]:
    return sorted(v["step"] for v in daemon_status(endpoint)["versions"] if v["state"] == "sealed")


def test_a_stopped_daemon_costs_one_ack_timeout_then_stages_are_skipped_until_it_answers(endpoint, daemons):
    d = daemons(endpoint, "--memory-limit", "32MiB", "--keep", "8")
    with _client(endpoint) as client:
        sd = {"w": torch.zeros(1 << 12)}
        assert client.stage(sd, step=1).wait(60)["step"] == 1
        os.kill(d.pid, signal.SIGSTOP)  # hung: the connection stays up and nothing answers
        try:
            # step 2 waits for its ack; step 3, staged at once, is queued behind it; 4 and 5 find the daemon silent
            t0 = time.monotonic()
            handles = {step: client.stage(sd, step=step) for step in (2, 3)}
            for step in (2, 3, 4, 5):
                if step not in handles:
                    t0 = time.monotonic()
                    handles[step] = client.stage(sd, step=step)
                handle = handles[step]
                assert handle.wait_copied(RETURNED) is False  # returned (else TIMEOUT), and nothing was copied
                print(f"\nstep {step}: stage()+wait_copied() {1000 * (time.monotonic() - t0):.0f} ms, daemon stopped")
                assert handle.skipped and handle.error.code == ErrorCode.NO_SIGN_OF_LIFE, handle.error
                assert "no sign of life" in handle.error.message and f"step {step} skipped" in handle.error.message
            assert "within 1.0s of begin of step 2" in handles[2].error.message, handles[2].error
            assert client.stats == {"stages": 5, "skipped": 4}
        finally:
            os.kill(d.pid, signal.SIGCONT)
        t0 = time.monotonic()
        step, sealed = 6, None
        while sealed is None:  # the first stages after SIGCONT may still find it silent: the next ones go ahead
            assert time.monotonic() - t0 < 30, "staging did not resume within 30 s of SIGCONT"
            sd["w"].fill_(step)
            handle = client.stage(sd, step=step)
            if handle.wait_copied(RETURNED):
                sealed = handle.wait(60)
            else:
                assert handle.skipped, handle.error  # still silent to this client: skipped, not failed
                step += 1
        print(f"staging resumed {1000 * (time.monotonic() - t0):.0f} ms after SIGCONT, at step {step}")
        assert sealed["step"] == step and client.stats["skipped"] == 4 + step - 6
    assert _sealed(endpoint) == [1, step]  # nothing of the skipped steps is visible
    with Subscriber(endpoint) as sub, sub.latest() as snap:
        assert snap.step == step and torch.equal(snap["w"], torch.full((1 << 12,), float(step)))


def test_the_ack_timeout_comes_from_the_environment(endpoint, daemons, monkeypatch):
    monkeypatch.setenv("STAGER_ACK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="STAGER_ACK_TIMEOUT='soon'.*positive number"):
        _client(endpoint)
    with pytest.raises(ValueError, match="ack_timeout.*positive number"):
        _client(endpoint, ack_timeout=0)
    monkeypatch.setenv("STAGER_ACK_TIMEOUT", "0.3")
    d = daemons(endpoint, "--memory-limit", "32MiB")
    with _client(endpoint) as client:
        assert client.stage({"w": torch.zeros(8)}, step=1).wait(60)["step"] == 1
        os.kill(d.pid, signal.SIGSTOP)
        try:
            handle = client.stage({"w": torch.ones(8)}, step=2)
            assert handle.wait_copied(RETURNED) is False
        finally:
            os.kill(d.pid, signal.SIGCONT)
        assert handle.skipped and "within 0.3s of begin of step 2" in handle.error.message, handle.error


def test_a_begin_carrying_a_large_plan_is_given_time_to_be_acknowledged(endpoint, daemons):
    """The begin of a new layout carries the whole plan, which the daemon decodes and lays out before
    it can answer anything (0.75 s per 1e4 entries measured on a loaded 2-core host): a daemon
    only busy with that is not hung, and the step seals instead of being skipped."""
    daemons(endpoint, "--memory-limit", "64MiB")
    with _client(endpoint, ack_timeout=0.05) as client:
        step, warm = 1, None
        while warm is None:  # the connection and its hello, on a loaded host: once one small step sealed
            assert step < 100, "no small step sealed with ack_timeout 0.05 s"
            handle = client.stage({"warm": torch.zeros(4)}, step=step)
            if handle.wait_copied(RETURNED):
                warm = handle.wait(60)
            step += 1
        skipped = client.stats["skipped"]
        # a new layout: 20000 entries, its begin takes the daemon far longer than 0.05 s (about 1.5 s here)
        sd = {f"layers.{i}.w": torch.full((2,), float(i)) for i in range(20000)}
        handle = client.stage(sd, step=step)
        assert handle.wait_copied(120) and not handle.skipped, handle.error
        assert handle.wait(120)["step"] == step and client.stats["skipped"] == skipped
    with Subscriber(endpoint) as sub, sub.latest() as snap:
        assert snap.step == step and torch.equal(snap["layers.19999.w"], torch.full((2,), 19999.0))


def test_a_daemon_waiting_for_memory_is_alive_and_the_step_is_not_lost(endpoint, daemons):
    """The daemon acknowledges the begin at once but holds the reply for memory (back-pressure), far
    longer than the ack timeout: the client keeps waiting and the step seals once memory is free."""
    # 4 MiB a version, room for two: a third needs version 1 evicted, which a reader's lease prevents
    daemons(endpoint, "--memory-limit", "10MiB", "--keep", "1")
    sd = {"w": torch.zeros(MiB)}
    with _client(endpoint, backpressure_timeout=120) as client, Subscriber(endpoint) as sub:
        assert client.stage(sd, step=1).wait(60)["step"] == 1
        with sub.at(1):  # leased: version 1 cannot make room
            assert client.stage(sd, step=2).wait(60)["step"] == 2
            sd["w"].fill_(3)
            handle = client.stage(sd, step=3)
            copied = []
            waiter = threading.Thread(target=lambda: copied.append(handle.wait_copied(120)), daemon=True)
            waiter.start()
            wait_until(lambda: 3 in daemon_status(endpoint)["retention"]["waiting_for_memory"], timeout=60)
            t0 = time.monotonic()
            # three ack timeouts later the step must still be waiting, not skipped
            wait_until(lambda: handle.done() or time.monotonic() - t0 > 3.0, timeout=60)
            assert not handle.done() and not copied, handle.error
        waiter.join(60)  # the lease ended: memory for step 3
        assert copied == [True] and handle.wait(60)["step"] == 3
        assert client.stats == {"stages": 3, "skipped": 0}
        with sub.latest() as snap:
            assert snap.step == 3 and torch.equal(snap["w"], torch.full((MiB,), 3.0))


def test_a_begin_waiting_for_the_other_rank_is_not_skipped(endpoint, daemons):
    daemons(endpoint, "--memory-limit", "32MiB")
    with _client(endpoint, 0, 2) as r0:
        h0 = r0.stage({"w0": torch.zeros(64)}, step=1)  # a new layout: held until rank 1's plan arrives
        wait_until(lambda: any(v["step"] == 1 for v in daemon_status(endpoint)["versions"]), timeout=60)
        t0 = time.monotonic()
        wait_until(lambda: h0.done() or time.monotonic() - t0 > 3.0, timeout=60)  # three ack timeouts
        assert not h0.done(), h0.error
        with _client(endpoint, 1, 2) as r1:
            assert r1.stage({"w1": torch.ones(64)}, step=1).wait(60)["step"] == 1
        assert h0.wait(60)["step"] == 1 and r0.stats["skipped"] == 0


def _records(control_dir, rank) -> list[dict]:
    try:
        with open(os.path.join(control_dir, f"rank{rank}.jsonl")) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def test_a_two_rank_job_trains_through_a_stopped_daemon_and_stages_again_after_sigcont(endpoint, daemons, short_dir):
    d = daemons(endpoint, "--memory-limit", "32MiB")
    control = os.path.join(short_dir, "job")
    os.mkdir(control)
    job: dict = {}

    def train():
        try:
            job["results"] = run_ranks(stage_through_a_hung_daemon, 2, endpoint, control, timeout=300)
        except BaseException as exc:
            job["error"] = exc

    def both(predicate, n) -> bool:
        if "error" in job:
            raise AssertionError(f"the job failed: {job['error']}")
        return all(sum(map(predicate, _records(control, r))) >= n for r in range(2))

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    try:
        wait_until(lambda: both(lambda x: x["sealed"], 2), timeout=120)
        os.kill(d.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:  # training goes on: steps staged after the stop, each skipped
            wait_until(lambda: both(lambda x: x["t"] > stopped and x["skipped"], 4), timeout=60)
        finally:
            os.kill(d.pid, signal.SIGCONT)
        resumed = time.monotonic()
        wait_until(lambda: both(lambda x: x["t"] > resumed and x["sealed"], 2), timeout=60)
    finally:
        open(os.path.join(control, "done"), "w").close()
        trainer.join(120)
    assert "error" not in job, job.get("error")
    records = {r: _records(control, r) for r in range(2)}
    for r, result in enumerate(job["results"]):
        mine = records[r]
        skipped = [x for x in mine if x["skipped"]]
        assert result["stats"] == {"stages": len(mine), "skipped": len(skipped)}, (result, len(mine))
        assert all(x["code"] == ErrorCode.NO_SIGN_OF_LIFE.value for x in skipped), skipped
        assert not [x for x in mine if x["code"] == ErrorCode.TIMEOUT.value], mine  # none waited the timeout out
        during = max(x["stall"] for x in mine if stopped < x["t"] < resumed)
        print(
            f"\nrank {r}: {len(mine)} steps, {len(skipped)} skipped; worst stage()+wait_copied() while stopped "
            f"{1000 * during:.0f} ms"
        )
    # a step one rank skipped is sealed by none: nothing half-done is visible
    skipped_steps = {x["step"] for r in range(2) for x in records[r] if x["skipped"]}
    assert not [x for r in range(2) for x in records[r] if x["sealed"] and x["step"] in skipped_steps]
