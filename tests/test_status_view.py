"""`stager status`: the stable --json schema (checked against a live daemon and the README), the table
for people, and --watch."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch

from helpers import wait_until
from stager.client import StagingClient, Subscriber
from stager.status_view import OPTIONAL, STATUS_SCHEMA, bar, human_age, human_bytes, render, schema_errors

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (64 << 20, "64.0 MiB"),
        (int(13.2 * 2**30), "13.2 GiB"),
        (3 << 40, "3.0 TiB"),
    ],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize("s, text", [(None, "-"), (0.42, "0.4s"), (12, "12s"), (192, "3m12s"), (7500, "2h05m")])
def test_human_age(s, text):
    assert human_age(s) == text


@pytest.mark.parametrize(
    "used, limit, text",
    [(0, 4, "[--------]"), (1, 4, "[##------]"), (4, 4, "[########]"), (9, 4, "[########]"), (1, 0, "[--------]")],
)
def test_bar(used, limit, text):
    assert bar(used, limit, 8) == text


def test_live_status_matches_the_documented_schema(make_daemon):
    d = make_daemon(keep=2)
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c, Subscriber(d.endpoint) as sub:
        c.stage({"w": torch.ones(1 << 16)}, step=1).wait(10)
        sub.wait_for_newer(None, timeout=10).release()
        c.stage({"w": torch.ones(1 << 16)}, step=2).wait(10)
        status = wait_until(lambda: (s := d.status())["subscriber_lag"] and s)
    assert schema_errors(status) == []
    assert status["state"] == "serving" and status["endpoint"] == d.endpoint
    sealed = [v for v in status["versions"] if v["state"] == "sealed"]
    assert [v["step"] for v in sealed] == [1, 2] and all(v["age_s"] >= 0 for v in sealed)
    assert status["subscriber_lag"][0]["lag"] == 1
    text = render(status)
    assert "memory [" in text and "ranks 1/1" in text and "readers 1 (1 subscribed)" in text
    assert "STEP" in text and "STATE" in text and "LAG" in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert [r[:2] for r in rows] == [["1", "sealed"], ["2", "sealed"]] and rows[0][3:5] == ["256.0", "KiB"]
    assert f"{os.getpid():>10}" in text  # the reader's row, with its lag


@pytest.mark.parametrize(
    "broken, error",
    [
        (lambda s: s.pop("versions"), "versions: missing"),
        (lambda s: s["memory"].pop("limit"), "memory.limit: missing"),
        (lambda s: s.update(pid="1"), "pid: str, not int"),
        (lambda s: s.update(leases=True), "leases: bool, not int"),
    ],
)
def test_schema_errors_name_what_breaks(make_daemon, broken, error):
    status = make_daemon().status()
    broken(status)
    assert error in schema_errors(status)


def test_readme_documents_every_status_key():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Operations") :]
    for key in [*STATUS_SCHEMA, *OPTIONAL]:
        assert f"`{key}`" in section, f"README.md's Operations section does not document {key}"


def test_render_failed_partial_and_insecure():
    status = {
        "pid": 1,
        "state": "draining",
        "uptime_s": 75,
        "endpoint": "tcp://127.0.0.1:7",
        "insecure": True,
        "memory": {"used": 1 << 30, "limit": 4 << 30, "pooled": 0},
        "keep": 2,
        "ranks": {},
        "local_world_size": 2,
        "readers": 0,
        "subscribers": 0,
        "leases": 0,
        "retention": {"waiting_for_memory": [9]},
        "versions": [
            {"step": 8, "state": "sealed", "bytes": 10, "tensors": 1, "leases": 0, "partial": True, "age_s": 3},
            {"step": 9, "state": "failed", "reason": "rank 1 left"},
        ],
        "counters": {"sealed": 1, "failed": 1},
    }
    text = render(status)
    assert text.splitlines()[0] == "daemon pid 1  draining  up 1m15s  tcp://127.0.0.1:7"
    assert "INSECURE" in text and " 25%" in text and "waiting for memory: steps [9]" in text
    assert "partial" in text and "failed   rank 1 left" in text and "ranks 0/2" in text


def test_watch_refreshes_until_interrupted(make_daemon):
    d = make_daemon()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stager.cli", "status", "--endpoint", d.endpoint, "--json", "--watch", "0.05"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        first, second = json.loads(proc.stdout.readline()), json.loads(proc.stdout.readline())
        assert first["session"] == second["session"] and second["uptime_s"] > first["uptime_s"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_status_once_exits_1_without_a_daemon(short_dir):
    out = subprocess.run(
        [sys.executable, "-m", "stager.cli", "status", "--endpoint", f"ipc://{short_dir}/no.sock", "--timeout", "0.3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and out.stdout == "" and out.stderr.startswith("stager status: ")


def test_render_a_job_with_a_node_down():
    status = {
        "pid": 1,
        "memory": {"used": 0, "limit": 1 << 30},
        "keep": 2,
        "ranks": {},
        "local_world_size": 2,
        "readers": 0,
        "subscribers": 0,
        "leases": 0,
        "retention": {"waiting_for_memory": []},
        "versions": [],
        "counters": {},
        "job_nodes": {
            "job": "j",
            "node": "a",
            "complete": [3, 4],
            "readable": [3],
            "nodes": {
                "a": {"endpoint": "tcp://a:1", "sealed": [3, 4], "staging": [5], "failed": []},
                "b": {
                    "endpoint": "tcp://b:1",
                    "down": "did not answer",
                    "sealed": [3, 4],
                    "failed": [],
                    "last_seen_s": 75,
                },
                "c": {"endpoint": "tcp://c:1", "down": "did not answer"},
            },
        },
    }
    lines = render(status).splitlines()
    assert "job j  node a  complete steps 3,4  readable now 3" in lines
    assert any(
        line.split()[:3] == ["b", "3,4", "DOWN"] and "last seen 1m15s ago: did not answer" in line for line in lines
    )
    assert any(line.split()[:2] == ["c", "DOWN:"] for line in lines)


def test_remembered_answers_round_trip_and_a_bad_file_is_ignored(tmp_path, monkeypatch):
    from stager.client import last_answers
    from stager.protocol.job import JobInfoReply

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    nodes = {"a": "tcp://a:1", "b": "tcp://b:1"}
    said = JobInfoReply(job="j", node="b", endpoint="tcp://b:1", nodes={"b": "tcp://b:1"}, sealed=[3, 4], failed=[2])
    last_answers.save("j", {"b": (said, 100.0)})
    ((reply, at),) = last_answers.load("j", nodes).values()
    assert (reply.node, reply.sealed, reply.staging, reply.failed, at) == ("b", [3, 4], [], [2], 100.0)
    assert last_answers.load("another job", nodes) == {} and last_answers.load("j", {"a": "tcp://a:1"}) == {}
    (path,) = (tmp_path / "stager").glob("job-*.json")
    for junk in (
        "{",
        "[]",
        json.dumps({"job": "j", "nodes": {"b": {"sealed": ["x"], "staging": [], "failed": [], "at": 1}}}),
    ):
        path.write_text(junk)
        assert last_answers.load("j", nodes) == {}
