"""A version whose staged hf_config is wrong (issue 22): a typed error naming the field, for a one-shot export
and an HF reader; a follower (export-hf / write-dcp --follow) logs one line and goes on, whatever failed."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from helpers import CONFIG, wait_until
from native_llama import NativeLlama
from stager.client import StagingClient, Subscriber
from stager.protocol import HFConfigError
from stager.writers.persist import for_each_version, step_dirname, step_of_dirname

# the model_info: passes staging's validation, then every HF consumer tripped over it
BAD_INFO = {
    "adapter": "llama3",
    "hf_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": [1], "head_dim": {"x": None}},
}
GOOD_INFO = {"adapter": "llama3", "hf_config": dict(CONFIG, model_type="llama")}


def _steps_in(out_dir):
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted(s for d in names if (s := step_of_dirname(d)) is not None)


def _stage(endpoint, step, model_info, sd):
    with StagingClient(endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
        client.stage(sd, step=step, model_info=model_info).wait(30)


def _llama_sd():
    torch.manual_seed(0)
    return NativeLlama(CONFIG, qkv_linear=False).state_dict()


def _cli(*args):
    return [sys.executable, "-m", "stager.cli", *args]


def _read(path):
    return open(path).read() if os.path.exists(path) else ""


def test_export_hf_follow_survives_a_bad_hf_config_and_exports_the_next_version(make_daemon, tmp_path):
    d = make_daemon()
    out, log_file, out_file = str(tmp_path / "hf"), str(tmp_path / "follower.log"), str(tmp_path / "stdout")
    _stage(d.endpoint, 1, BAD_INFO, {"w": torch.ones(4)})
    with open(out_file, "w") as stdout:
        proc = subprocess.Popen(
            _cli(
                "--log-file",
                log_file,
                "export-hf",
                "--endpoint",
                d.endpoint,
                "--out",
                out,
                "--follow",
                "--json",
                "--no-progress",
            ),
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        # the follower leases the newest version (step 1) first: it fails, is logged, and the follower waits on
        wait_until(lambda: "step 1" in _read(log_file) or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, f"the follower died on step 1: {proc.communicate(timeout=30)}"
        _stage(d.endpoint, 2, GOOD_INFO, _llama_sd())
        # printed once step 2 is exported (and published)
        wait_until(lambda: _read(out_file).endswith("\n") or proc.poll() is not None, timeout=60)
        assert proc.poll() is None and _steps_in(out) == [2]
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr + _read(log_file)
    failed = [line for line in _read(log_file).splitlines() if "step 1" in line]
    assert len(failed) == 1, _read(log_file)
    assert "num_key_value_heads" in failed[0] and "hf_config" in failed[0]
    assert [os.path.basename(json.loads(line)["exported"]) for line in _read(out_file).splitlines()] == [
        step_dirname(2)
    ]


def test_one_shot_export_of_a_bad_hf_config_is_one_typed_line(make_daemon, tmp_path):
    d = make_daemon()
    _stage(d.endpoint, 1, BAD_INFO, {"w": torch.ones(4)})
    proc = subprocess.run(
        _cli("export-hf", "--endpoint", d.endpoint, "--out", str(tmp_path / "hf"), "--step", "1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "[bad_value]" in lines[0] and "hf_config.num_key_value_heads" in lines[0] and "list" in lines[0]
    assert not _steps_in(str(tmp_path / "hf"))


def test_hf_reader_gets_the_typed_error_then_reads_the_next_version(make_daemon):
    d = make_daemon()
    _stage(d.endpoint, 1, BAD_INFO, {"w": torch.ones(4)})
    with Subscriber(d.endpoint, view="hf") as sub:
        with pytest.raises(HFConfigError) as info:
            sub.latest()
        assert info.value.field == "num_key_value_heads" and "list" in info.value.message
        _stage(d.endpoint, 2, GOOD_INFO, _llama_sd())
        with sub.latest() as snap:
            assert snap.step == 2 and "model.layers.0.self_attn.k_proj.weight" in snap.keys()


@pytest.mark.parametrize(
    "exc",
    [
        TypeError("int() argument must be ..., not 'list'"),
        KeyError("head_dim"),
        OSError(28, "No space left on device"),
        RuntimeError("view size is not compatible"),
    ],
)
def test_a_follower_survives_any_failure_of_one_version(make_daemon, tmp_path, caplog, exc):
    """for_each_version is every follower's loop (export-hf, write-dcp, the demo's): any exception from
    one version is one log line and one failure report, then the next version is written."""
    d = make_daemon()
    out = str(tmp_path / "out")
    reports, result = [], {}

    def write(snap):
        if snap.step == 1:
            raise exc
        os.makedirs(os.path.join(out, step_dirname(snap.step)))
        return os.path.join(out, step_dirname(snap.step))

    _stage(d.endpoint, 1, None, {"w": torch.ones(4)})
    follower = threading.Thread(
        target=lambda: result.update(
            paths=for_each_version(write, out, endpoint=d.endpoint, follow=True, max_writes=1, on_report=reports.append)
        ),
        daemon=True,
    )
    with caplog.at_level(logging.INFO, logger="stager.writers.persist"):
        follower.start()
        wait_until(lambda: reports or not follower.is_alive(), timeout=60)
        assert follower.is_alive(), "the follower stopped on step 1"
        _stage(d.endpoint, 2, None, {"w": torch.full((4,), 2.0)})
        follower.join(60)
    assert not follower.is_alive() and result["paths"] == [os.path.join(out, step_dirname(2))]
    assert [r["step"] for r in reports] == [1, 2] and reports[0]["error"] and "error" not in reports[1]
    records = [r for r in caplog.records if r.name == "stager.writers.persist"]
    assert len(records) == 1 and records[0].levelno == logging.ERROR and records[0].exc_info is None
    line = records[0].getMessage()
    assert "step 1" in line and type(exc).__name__ in line and "\n" not in line
