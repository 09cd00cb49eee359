"""The stress campaigns of stress/ in their --quick form: each exits 0 and its last line says PASS.

The full campaigns (100k fuzz messages, 20 kills per target, a 10-minute soak) are run by hand and
recorded in RELIABILITY.md; CI runs these short versions. The selected campaigns are started
together when the first test of this file runs (much of their time is process start-up and waiting,
so together they take little more than the longest: ~2 minutes on 2 cores), and each test then
waits for its own.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

STRESS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "stress")
CAMPAIGNS = {
    "fuzz": ["fuzz.py", "--quick"],
    "kill": ["kill.py", "--quick", "--target", "daemon,export-hf,write-dcp"],
    "kill-rank": ["kill.py", "--quick", "--target", "rank"],
    "soak": ["soak.py", "--quick"],
    # with --assemble-full: the same kills and reads, plus both daemons assembling (a fifth campaign
    # beside the four starved the fuzz's daemon on 2 cores; the plain run's 20 rounds are in RELIABILITY.md)
    "kill-node": ["kill_node.py", "--quick", "--assemble-full"],
}
LIMIT_S = 420  # a campaign still running after this is a failure (each bounds its own waits far below)

pytestmark = pytest.mark.timeout(LIMIT_S + 60)


def selected(session) -> list[str]:
    """The campaigns the selected tests of this file need (``-k fuzz`` starts only the fuzz)."""
    names = []
    for item in session.items:
        if item.path == Path(__file__):
            callspec = getattr(item, "callspec", None)
            names.append(callspec.params["name"] if callspec else "kill-rank")
    return names


@pytest.fixture(scope="module")
def campaigns(request, tmp_path_factory):
    procs = {}
    logs = tmp_path_factory.mktemp("stress")
    try:
        for name in selected(request.session):
            script, *args = CAMPAIGNS[name]
            with open(logs / f"{name}.out", "w") as out:  # a file, not a pipe: nobody reads it until the end
                proc = subprocess.Popen(
                    [sys.executable, os.path.join(STRESS, script), *args], stdout=out, stderr=subprocess.STDOUT
                )
            proc.output = logs / f"{name}.out"
            procs[name] = proc
        yield procs
    finally:
        for proc in procs.values():  # SIGTERM: a campaign cleans up its daemons, temp dirs and segments
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def finished(campaigns, name):
    proc = campaigns[name]
    try:
        proc.wait(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(60)
        pytest.fail(f"{name} ran over {LIMIT_S}s:\n{proc.output.read_text()[-4000:]}")
    out = proc.output.read_text()
    lines = [line for line in out.splitlines() if line.strip()]
    return proc.returncode, lines, out


@pytest.mark.parametrize("name", ["fuzz", "kill", "soak", "kill-node"])
def test_campaign_passes(campaigns, name):
    rc, lines, out = finished(campaigns, name)
    assert rc == 0 and lines and "PASS" in lines[-1], f"{name} exited {rc}:\n{out[-4000:]}"
    if name == "kill-node":  # its daemons' stderr: a thread that died (the assembler's) shows here
        assert "Traceback" not in out, out[-4000:]


def test_kill_rank_campaign_passes(campaigns):
    rc, lines, out = finished(campaigns, "kill-rank")
    assert rc == 0 and lines and "PASS" in lines[-1], f"kill-rank exited {rc}:\n{out[-4000:]}"
