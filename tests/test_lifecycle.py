"""The daemon's lifecycle as an operator drives it: SIGTERM drains, SIGHUP reopens the logs, a second
daemon on an endpoint is refused naming the first; plus the pure phase logic, table-driven."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import error_code, wire_plan
from helpers import wait_until
from stager.client.admin import daemon_status
from stager.daemon.lifecycle import DRAINING, SERVING, STOPPING, Lifecycle, refusal
from stager.daemon.segments import list_segments
from stager.dev.launch import DaemonProcess
from stager.protocol import Acquire, Begin, BeginReply, Commit, ErrorCode, ErrorReply, Ping, Sealed, Subscribe
from stager.protocol.layout import plan_digest


@pytest.mark.parametrize(
    "phase, msg, in_flight, refused",
    [
        (SERVING, Begin(step=5), set(), False),
        (DRAINING, Begin(step=5), set(), True),  # a new stage
        (DRAINING, Begin(step=5), {5}, False),  # another rank's begin of the step in flight
        (DRAINING, Begin(step=6), {5}, True),
        (DRAINING, Commit(step=5), {5}, False),
        (DRAINING, Acquire(), set(), False),  # readers are served until the daemon exits
        (DRAINING, Ping(), set(), False),
        (STOPPING, Begin(step=1), set(), True),
    ],
)
def test_refusal(phase, msg, in_flight, refused):
    err = refusal(phase, msg, in_flight)
    assert (err is not None) == refused
    if refused:
        assert err.code is ErrorCode.UNAVAILABLE and "shutting down" in err.message


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize(
    "signals, advance, in_flight, phase, exits",
    [
        ([], 0, 0, SERVING, False),
        (["SIGTERM"], 0, 0, DRAINING, True),  # nothing in flight: exit at once
        (["SIGTERM"], 0, 2, DRAINING, False),  # steps in flight: wait for them
        (["SIGTERM"], 29.9, 1, DRAINING, False),
        (["SIGTERM"], 30.0, 1, DRAINING, True),  # drain timeout
        (["SIGTERM", "SIGTERM"], 0, 1, STOPPING, True),  # a second signal: now
        (["now"], 0, 1, STOPPING, True),  # Daemon.stop()
    ],
)
def test_lifecycle_phases(signals, advance, in_flight, phase, exits):
    clock = Clock()
    life = Lifecycle(drain_timeout=30.0, clock=clock)
    for sig in signals:
        life.request_stop(sig)
    clock.now += advance
    assert life.phase == phase and life.should_exit(in_flight) is exits


HALF = [wire_plan(["w", "f32", [4], [0], [2]]), wire_plan(["w", "f32", [4], [2], [2]])]


def _begin(rank, step):
    return Begin(step=step, digest=plan_digest(HALF[rank]), plan=HALF[rank])


def test_sigterm_drains_the_step_in_flight_and_refuses_new_ones(short_dir, raw_peer):
    endpoint = f"ipc://{short_dir}/drain.sock"
    daemon = DaemonProcess(endpoint, args=("--memory-limit", "16MiB", "--drain-timeout", "120")).start()
    try:
        r0, r1, reader = raw_peer(endpoint), raw_peer(endpoint), raw_peer(endpoint)
        r0.hello(rank=0, local_world_size=2)
        r1.hello(rank=1, local_world_size=2)
        reader.hello(role="reader", rank=0)
        reader.request(Subscribe())
        r0.sock.send_multipart(_begin(0, 1).encode())  # step 1 in flight: waits for rank 1
        wait_until(lambda: [v for v in daemon_status(endpoint)["versions"] if v["state"] == "staging"])

        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: daemon_status(endpoint)["state"] == "draining")
        notice = reader.recv(10)  # readers are told, unasked (id 0)
        assert isinstance(notice, ErrorReply) and notice.id == 0 and notice.code == "unavailable"
        assert "shutting down" in notice.message and str(daemon.pid) in notice.message
        refused = r1.request(_begin(1, 2))  # a new stage: typed refusal
        assert error_code(refused) == ErrorCode.UNAVAILABLE.value and "shutting down" in refused.message
        # the step in flight finishes: rank 1's begin is served, both commit, it seals
        assert isinstance(r1.request(_begin(1, 1)), BeginReply)
        assert isinstance(r0.recv(10), BeginReply)
        r0.sock.send_multipart(Commit(id=7, step=1).encode())
        r1.sock.send_multipart(Commit(id=8, step=1).encode())
        assert isinstance(r0.recv(10), Sealed) and isinstance(r1.recv(10), Sealed)
        assert daemon.proc.wait(30) == 0  # then it exits by itself
    finally:
        code = daemon.stop(signal.SIGKILL)
    assert code == 0
    assert list_segments(daemon.pid) == [] and not os.path.exists(endpoint[len("ipc://") :])


def _daemon_with_a_stuck_step(endpoint: str, raw_peer, drain_timeout: str) -> DaemonProcess:
    """A daemon with step 1 in flight that never seals: rank 0 began it, rank 1 never comes."""
    daemon = DaemonProcess(endpoint, args=("--memory-limit", "16MiB", "--drain-timeout", drain_timeout)).start()
    try:
        r0 = raw_peer(endpoint)
        r0.hello(rank=0, local_world_size=2)
        r0.sock.send_multipart(_begin(0, 1).encode())
        wait_until(lambda: daemon_status(endpoint)["versions"])
    except BaseException:
        daemon.stop(signal.SIGKILL)
        raise
    return daemon


def test_drain_timeout_fails_what_is_left_and_exits(short_dir, raw_peer):
    endpoint = f"ipc://{short_dir}/stuck.sock"
    daemon = _daemon_with_a_stuck_step(endpoint, raw_peer, "0.5")
    try:
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(60) == 0
    finally:
        code = daemon.stop(signal.SIGKILL)
    assert code == 0 and list_segments(daemon.pid) == []


def test_second_sigterm_stops_at_once(short_dir, raw_peer):
    endpoint = f"ipc://{short_dir}/twice.sock"
    daemon = _daemon_with_a_stuck_step(endpoint, raw_peer, "600")
    try:
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: daemon_status(endpoint)["state"] == "draining")
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(60) == 0
    finally:
        daemon.stop(signal.SIGKILL)
    assert list_segments(daemon.pid) == []


def test_sighup_reopens_the_log_file_and_logs_are_json_lines(short_dir, tmp_path):
    log_file = tmp_path / "stager.log"
    endpoint = f"ipc://{short_dir}/hup.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stager.cli",
            "--log-level",
            "INFO",
            "--log-format",
            "json",
            "--log-file",
            str(log_file),
            "serve",
            "--json",
            "--endpoint",
            endpoint,
            "--memory-limit",
            "16MiB",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        json.loads(proc.stdout.readline())  # ready
        import torch

        from stager.client import StagingClient

        with StagingClient(endpoint, rank=0, local_world_size=1, world_size=1) as c:
            c.stage({"w": torch.ones(8)}, step=3).wait(10)
        wait_until(lambda: "sealed step 3" in log_file.read_text())
        os.rename(log_file, tmp_path / "stager.log.1")  # logrotate
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: log_file.exists() and "reopened 1 log files" in log_file.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc.stdout.close()
    rotated = [json.loads(line) for line in (tmp_path / "stager.log.1").read_text().splitlines()]
    sealed = [r for r in rotated if r["msg"].startswith("sealed step 3")]
    assert sealed and sealed[0]["step"] == 3 and sealed[0]["level"] == "INFO" and sealed[0]["logger"] == "stager.daemon"
    connected = [r for r in rotated if "connected" in r["msg"] and r["msg"].startswith("trainer")]
    assert connected and connected[0]["rank"] == 0
    fresh = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert any("reopened" in r["msg"] for r in fresh)
    assert all({"ts", "level", "logger", "msg", "pid"} <= r.keys() for r in rotated + fresh)


def test_second_daemon_names_the_running_one(short_dir):
    endpoint = f"ipc://{short_dir}/busy.sock"
    with DaemonProcess(endpoint, args=("--memory-limit", "8MiB")) as first:
        second = subprocess.run(
            [sys.executable, "-m", "stager.cli", "serve", "--endpoint", endpoint, "--memory-limit", "8MiB"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2
        assert f"another stager daemon (pid {first.pid}) already serves {endpoint}" in second.stderr
        assert second.stderr.count("\n") == 1  # one line, no traceback
        assert daemon_status(endpoint)["pid"] == first.pid  # the first keeps serving


def test_a_resource_that_fails_to_close_does_not_keep_the_others(short_dir, caplog):
    """Resources.close gives back each resource whatever the others do: a metrics server whose
    close fails (logged) still leaves the socket, its file, the context and the lock given back."""
    from stager.daemon.config import DaemonConfig
    from stager.daemon.resources import Resources

    class BrokenMetrics:
        url = None

        def close(self):
            raise RuntimeError("the metrics server would not stop")

    endpoint = f"ipc://{short_dir}/res.sock"
    names = iter(range(1 << 20))
    config = DaemonConfig(endpoint=endpoint, memory_limit=1 << 20)
    res = Resources.open(config, lambda: f"stager-test-res-{os.getpid()}-{next(names)}")
    sock, ctx = res.sock, res.ctx
    res.metrics = BrokenMetrics()
    res.close()  # logged, not raised: a daemon's close goes on
    assert "closing the metrics server failed" in caplog.text
    assert sock.closed and ctx.closed and not os.path.exists(f"{short_dir}/res.sock")
    Resources.open(config, lambda: f"stager-test-res-{os.getpid()}-{next(names)}").close()  # the lock is free


@pytest.mark.parametrize(
    "msg, fields",
    [
        ("sealed step 12 (1.0 MiB, 3 tensors)", {"step": 12}),
        ("trainer 1 (pid 4242) dropped: process exited", {"rank": 1, "peer": "trainer 1 pid 4242"}),
        ("reader 0 connected (pid 77, local)", {"peer": "reader 0 pid 77"}),
        ("step 4 failed: rank 2 (pid 9) left during step 4: said bye", {"step": 4, "rank": 2}),
        ("request failed: [memory_limit] staging needs 1.0 MiB", {"code": "memory_limit"}),
        ("layout L1: 291 tensors", {}),
    ],
)
def test_fields_from_message(msg, fields):
    from stager.protocol.logs import fields_from_message

    assert fields_from_message(msg) == fields


def test_json_formatter_prefers_extra_and_keeps_tracebacks():
    import logging

    from stager.protocol.logs import JsonFormatter

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.getLogger("stager.t").makeRecord(
            "stager.t",
            logging.ERROR,
            __file__,
            1,
            "step %d: %s",
            (5, "bad"),
            sys.exc_info(),
            extra={"step": 6, "peer": "trainer 0 pid 1", "code": "internal"},
        )
    out = json.loads(JsonFormatter().format(record))
    assert (out["step"], out["peer"], out["code"], out["level"]) == (6, "trainer 0 pid 1", "internal", "ERROR")
    assert (
        out["msg"] == "step 5: bad"
        and "RuntimeError: boom" in out["exc"]
        and "\n" not in JsonFormatter().format(record)
    )


def test_sighup_reopens_a_followers_log_file_and_does_not_kill_it(short_dir, tmp_path):
    """logrotate sends SIGHUP to export-hf / write-dcp --follow too: the file is reopened, the follower lives."""
    import torch

    from stager.client import StagingClient

    log_file = tmp_path / "writer.log"
    with DaemonProcess(f"ipc://{short_dir}/hupw.sock", args=("--memory-limit", "16MiB")) as d:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stager.cli",
                "--log-level",
                "DEBUG",
                "--log-file",
                str(log_file),
                "write-dcp",
                "--endpoint",
                d.endpoint,
                "--out",
                str(tmp_path / "dcp"),
                "--follow",
                "--json",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
                c.stage({"w": torch.ones(8)}, step=1).wait(10)
                assert json.loads(proc.stdout.readline())["written"].endswith("step-00000001")
                wait_until(lambda: log_file.exists() and log_file.stat().st_size > 0)
                os.rename(log_file, tmp_path / "writer.log.1")
                proc.send_signal(signal.SIGHUP)
                c.stage({"w": torch.ones(8)}, step=2).wait(10)
                # still following after the SIGHUP (its default action would have killed it)
                assert json.loads(proc.stdout.readline())["written"].endswith("step-00000002")
            wait_until(lambda: log_file.exists() and log_file.stat().st_size > 0)  # the next records: a new file
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
            proc.stdout.close()
