"""Checksum manifests travel with exports; verify finds a flipped byte; diff names what differs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from stager.client import StagingClient
from stager.formats.integrity import diff, read_tensors, verify
from stager.writers.write_dcp import write_dcp


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
    from stager.writers.export_hf import export_hf

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


class _RunsCode:
    """Unpickling this runs a shell command: what a hostile ``.metadata`` would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plain_dcp(path, state=None):
    import torch.distributed.checkpoint as dcp

    from stager.formats.integrity import entry, write_manifest

    state = (
        state if state is not None else {"w": torch.arange(12.0).view(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}
    )
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    write_manifest(str(path), 1, "dcp", {k: entry(v) for k, v in state.items() if isinstance(v, torch.Tensor)})
    return str(path)


def test_hostile_dcp_metadata_never_runs(tmp_path, capsys):
    import pickle

    from stager.cli import main
    from stager.formats.integrity import UnsafeCheckpoint

    good = _plain_dcp(tmp_path / "good")
    assert verify(good)["ok"]  # the restricted reader still reads an ordinary checkpoint
    marker = tmp_path / "pwned"
    bad = _plain_dcp(tmp_path / "bad")
    with open(os.path.join(bad, ".metadata"), "rb") as f:
        metadata = pickle.load(f)
    metadata.planner_data["w"] = _RunsCode(marker)  # hidden deep inside genuine metadata
    with open(os.path.join(bad, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    for read in (verify, lambda p: dict(read_tensors(p))):
        with pytest.raises(UnsafeCheckpoint) as info:
            read(bad)
        assert os.path.join(bad, ".metadata") in info.value.message and "system" in info.value.global_name
        assert info.value.global_name in info.value.message
    assert main(["verify", bad]) == 2 and main(["diff", good, bad]) == 2
    err = capsys.readouterr().err
    assert "system" in err and "Traceback" not in err
    assert not marker.exists()


def test_non_tensor_dcp_items_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = _plain_dcp(tmp_path / "ckpt", {"w": torch.ones(3), "train.state": _RunsCode(marker)})
    assert not marker.exists()  # saving only pickled it
    assert list(dict(read_tensors(path))) == ["w"] and verify(path)["ok"]
    assert not marker.exists()  # DCP's own loader would torch.load(weights_only=False) it


def _truncate(path, keep):
    with open(path, "r+b") as f:
        f.truncate(keep)


def _garbage(path):
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(b"\x80\x04not a pickle at all" + b"x" * size)


def _data_file(d):
    return os.path.join(d, next(f for f in os.listdir(d) if f.endswith(".distcp")))


@pytest.mark.parametrize(
    "damage,culprit,words",
    [
        (lambda d: _truncate(os.path.join(d, ".metadata"), 40), ".metadata", "not readable DCP metadata"),
        (lambda d: _garbage(os.path.join(d, ".metadata")), ".metadata", "not readable DCP metadata"),
        (lambda d: os.unlink(_data_file(d)), ".distcp", "is missing"),
        (lambda d: _truncate(_data_file(d), 100), ".distcp", "is truncated"),
        (lambda d: _garbage(_data_file(d)), ".distcp", "cannot be read"),
    ],
    ids=["metadata-truncated", "metadata-garbage", "distcp-missing", "distcp-truncated", "distcp-garbage"],
)
def test_damaged_dcp_is_one_line_naming_the_file(tmp_path, capsys, damage, culprit, words):
    from stager.cli import main

    good = _plain_dcp(tmp_path / "good")
    bad = _plain_dcp(tmp_path / "bad")
    damage(bad)
    assert main(["diff", good, bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and words in err, err
    assert err.startswith("stager diff: ") and bad in err and culprit in err
    assert main(["verify", bad, "--json"]) == 1  # verify: corrupt, with the reason
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and culprit in report["error"] and words in report["error"]


def test_damaged_dcp_diff_from_the_command_line(tmp_path):
    good = _plain_dcp(tmp_path / "good")
    bad = _plain_dcp(tmp_path / "bad")
    _truncate(os.path.join(bad, ".metadata"), 40)
    out = stager("diff", good, bad)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert os.path.join(bad, ".metadata") in out.stderr


def test_checksum_of_a_strided_view_is_that_of_its_values():
    from stager.formats.integrity import checksum

    base = torch.randn(64, 48).bfloat16()
    for view in (base[:, 3:4], base.t(), base[::2, 5:9]):
        assert not view.is_contiguous() and checksum(view) == checksum(view.clone())
