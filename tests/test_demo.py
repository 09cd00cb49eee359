"""`stager demo --json`: one command runs the trainer, a rollout subscriber, export-hf and write-dcp,
checks each output against the trainer's state, and says so in one JSON object."""

import json
import subprocess
import sys

import pytest

CONSUMERS = ("trainer", "subscriber", "export_hf", "write_dcp")


@pytest.fixture(scope="module")
def demo():
    proc = subprocess.run(
        [sys.executable, "-m", "stager.cli", "demo", "--steps", "4", "--every", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr  # --json prints one object, nothing else on stdout
    return proc, json.loads(lines[0])


def test_every_check_passed_and_exit_code_says_so(demo):
    proc, summary = demo
    failed = {k: v for k, v in summary["checks"].items() if not v["ok"]}
    assert not failed, failed
    assert summary["ok"] is True and proc.returncode == 0, proc.stderr
    assert set(summary["checks"]) == {*CONSUMERS, "cleanup"}


def test_each_consumer_handled_versions_up_to_the_last(demo):
    _, summary = demo
    consumers = summary["consumers"]
    assert set(consumers) == set(CONSUMERS)
    assert consumers["trainer"]["steps"] == [2, 4] and consumers["trainer"]["versions"] == 2
    for name in CONSUMERS:
        entry = consumers[name]
        assert entry["versions"] == len(entry["steps"]) >= 1, name
        assert entry["steps"][-1] == 4, name  # every reader got the final version
        assert set(entry["steps"]) <= {2, 4}, name
        assert entry["bytes"] > 0 and entry["median_ms"] is not None and entry["median_ms"] >= 0, name
    assert consumers["subscriber"]["skipped"] + consumers["subscriber"]["versions"] <= 2


def test_no_stray_warnings(demo):
    proc, _ = demo
    # the main process's own import of torch may warn about a missing numpy before the demo runs
    assert not proc.stderr.strip(), proc.stderr  # no stray warnings (numpy is a dependency: torch warns without it)
