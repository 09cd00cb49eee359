"""A writer killed mid-write leaves its temporary behind; the next writer removes it (never a live one's)."""

import os
import subprocess
import sys

import pytest
import torch

from stager.writers.persist import remove_stale_temporaries, step_directory

pytestmark = pytest.mark.fast  # the fast tier: no daemon process, no torch.distributed job


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_write_removes_temporaries_of_dead_writers_only(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = out / f".step-00000003.partial-{dead}"
        (stale / "sub").mkdir(parents=True)
        (stale / "sub" / "model.safetensors").write_bytes(b"half")
        os.symlink("step-00000002", out / f".latest-{dead}")
        busy = out / f".step-00000004.partial-{live.pid}"  # a writer still at work
        busy.mkdir()
        (out / "step-00000002").mkdir()
        (out / f".notours.partial-{dead}").mkdir()  # not a step temporary: left alone
        with step_directory(str(out), 5) as tmp:
            torch.save(torch.ones(1), os.path.join(tmp, "x.pt"))
        names = set(os.listdir(out))
        assert stale.name not in names and f".latest-{dead}" not in names
        assert {busy.name, "step-00000002", "step-00000005", "latest", f".notours.partial-{dead}"} <= names
        assert os.readlink(out / "latest") == "step-00000005"
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temporaries(str(out)) == [busy.name]  # once its writer is dead, it goes too
    assert remove_stale_temporaries(str(tmp_path / "absent")) == []
