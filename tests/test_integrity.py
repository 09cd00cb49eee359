"""Checksum manifests travel with exports; verify finds a flipped byte; diff names what differs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from stager.client import StagingClient
from stager.integrity import diff, read_tensors, verify
from stager.write_dcp import write_dcp


def stager(*args):
    return subprocess.run([sys.executable, "-m", "stager.cli", *args], capture_output=True, text=True, timeout=120)


def flip_a_byte(path: str, offset_from_end: int = 5) -> None:
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        byte = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.fixture
def staged(make_daemon):
    d = make_daemon()
    sd = {"w": torch.randn(64, 16), "b": torch.randn(16), "train": {"step": 2}}
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as c:
        c.stage(sd, step=2, model_info={"adapter": "identity", "hf_config": {"model_type": "none"}}).wait(20)
    return d, sd


def test_verify_hf_and_dcp_exports_and_find_a_flipped_byte(staged, tmp_path):
    from stager.export_hf import export_hf

    d, sd = staged
    (hf,) = export_hf(str(tmp_path / "hf"), endpoint=d.endpoint)
    (dc,) = write_dcp(str(tmp_path / "dcp"), endpoint=d.endpoint)
    for path in (hf, dc):
        assert verify(path)["ok"] and verify(path)["checked"] == 2
        assert stager("verify", path).returncode == 0
    flip_a_byte(os.path.join(hf, "model.safetensors"))
    report = verify(hf)
    assert not report["ok"] and len(report["mismatched"]) == 1
    data_files = [f for f in os.listdir(dc) if f.endswith(".distcp")]
    flip_a_byte(os.path.join(dc, data_files[0]), offset_from_end=64)
    out = stager("verify", dc, "--json")
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    assert not report["ok"] and (report["mismatched"] or report.get("error"))


def test_diff_snapshot_against_exports(staged, tmp_path):
    d, sd = staged
    (dc,) = write_dcp(str(tmp_path / "dcp"), endpoint=d.endpoint)
    same = stager("diff", "latest", dc, "--endpoint", d.endpoint, "--json")
    assert same.returncode == 0 and json.loads(same.stdout)["identical"]
    other = {"w": sd["w"] + 0.5, "b": torch.zeros(8), "extra": torch.ones(1)}
    report = diff(dict(read_tensors(dc)), other)
    assert report["different"] == {"w": pytest.approx(0.5)}
    assert report["shape_mismatch"] == [["b", [16], [8]]] and report["only_b"] == ["extra"]
