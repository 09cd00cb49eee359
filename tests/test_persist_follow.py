"""Followers: write-dcp and export-hf with --follow, --every and --keep, and retention past step 10**8."""

import json
import os
import signal
import subprocess
import sys
import threading

import torch

from helpers import wait_until
from stager.client import StagingClient
from stager.writers.persist import prune, step_dirname, step_of_dirname
from stager.writers.write_dcp import write_dcp


def _steps_in(out_dir):
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted(s for d in names if (s := step_of_dirname(d)) is not None)


def test_step_directory_names_and_retention_past_1e8(tmp_path):
    assert step_dirname(7) == "step-00000007" and step_dirname(123456789) == "step-123456789"
    for step in (5, 99999999, 100000000, 100000001):
        (tmp_path / step_dirname(step)).mkdir()
    (tmp_path / "latest").mkdir()
    prune(str(tmp_path), keep=2)
    assert _steps_in(str(tmp_path)) == [100000000, 100000001]  # by number: step-100000000 sorts before step-99...
    assert (tmp_path / "latest").exists()


def test_write_dcp_follows_every_and_keeps(make_daemon, tmp_path):
    d = make_daemon()
    out = str(tmp_path / "dcp")
    result = {}
    follower = threading.Thread(
        target=lambda: result.update(
            paths=write_dcp(out, endpoint=d.endpoint, follow=True, every=2, keep=2, max_writes=3)
        ),
        daemon=True,
    )
    follower.start()
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
        for step, written_after in ((1, 1), (2, None), (3, 3), (4, None), (5, 5)):
            client.stage({"w": torch.full((8,), float(step))}, step=step).wait(30)
            if written_after is not None:  # the follower writes it (or a newer one) before we stage on
                wait_until(lambda s=written_after: os.path.exists(os.path.join(out, step_dirname(s))))
    follower.join(60)
    assert not follower.is_alive()
    assert [os.path.basename(p) for p in result["paths"]] == [step_dirname(1), step_dirname(3), step_dirname(5)]
    assert _steps_in(out) == [3, 5]  # --keep 2
    assert os.readlink(os.path.join(out, "latest")) == step_dirname(5)


def test_export_hf_cli_follows_until_interrupted(make_daemon, tmp_path):
    d = make_daemon()
    out = str(tmp_path / "hf")
    cmd = [
        sys.executable,
        "-m",
        "stager.cli",
        "export-hf",
        "--endpoint",
        d.endpoint,
        "--out",
        out,
        "--follow",
        "--every",
        "1",
        "--keep",
        "1",
        "--adapter",
        "identity",
        "--json",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
            for step in (10, 11):
                client.stage(
                    {"w": torch.full((4,), float(step))}, step=step, model_info={"hf_config": {"model_type": "test"}}
                ).wait(30)
                wait_until(lambda s=step: s in _steps_in(out), timeout=60)
        wait_until(lambda: _steps_in(out) == [11], timeout=60)  # --keep 1
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]  # one per export, as it is done
    assert [os.path.basename(r["exported"]) for r in lines] == [step_dirname(10), step_dirname(11)]
    assert [r["step"] for r in lines] == [10, 11] and all(r["bytes"] == 16 for r in lines)


def test_a_follower_that_cannot_write_one_version_goes_on_to_the_next(make_daemon, tmp_path, caplog):
    from stager.writers.export_hf import export_hf

    d = make_daemon()
    out = str(tmp_path / "hf")
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
        # step 1 names an adapter no exporter has: that export fails, the follower logs it and waits on
        client.stage(
            {"w": torch.ones(4)}, step=1, model_info={"adapter": "no_such_adapter", "hf_config": {"model_type": "test"}}
        ).wait(30)
        result = {}
        follower = threading.Thread(
            target=lambda: result.update(
                paths=export_hf(out, endpoint=d.endpoint, follow=True, max_exports=1, progress=False)
            ),
            daemon=True,
        )
        follower.start()
        with caplog.at_level("ERROR", logger="stager.writers.persist"):
            wait_until(lambda: "step 1 was not written" in caplog.text)
        client.stage(
            {"w": torch.full((4,), 2.0)},
            step=2,
            model_info={"adapter": "identity", "hf_config": {"model_type": "test"}},
        ).wait(30)
    follower.join(60)
    assert not follower.is_alive() and [os.path.basename(p) for p in result["paths"]] == [step_dirname(2)]


def test_exact_storage_is_the_same_memory_keeps_it_mapped_and_carries_nothing_of_stager():
    import gc
    import io
    import mmap
    import weakref

    from stager.writers.persist import exact_storage

    mapping = mmap.mmap(-1, 1 << 20)  # as a segment is mapped: the tensor owns the mapping
    alive = weakref.ref(mapping)
    segment = torch.frombuffer(mapping, dtype=torch.uint8)
    del mapping
    view = segment[4096 : 4096 + 64 * 4].view(torch.float32).view(8, 8)
    view.copy_(torch.arange(64.0).view(8, 8))
    out = exact_storage(view)
    assert out.data_ptr() == view.data_ptr() and out.untyped_storage().nbytes() == 64 * 4  # no copy, no more
    assert out.__dict__ == {} and torch.equal(out, torch.arange(64.0).view(8, 8))
    blob = io.BytesIO()
    torch.save({"w": out}, blob)
    assert len(blob.getvalue()) < 64 * 4 + 2048  # its bytes once, never the segment's
    loaded = torch.load(io.BytesIO(blob.getvalue()), weights_only=True)["w"]
    assert loaded.__dict__ == {} and torch.equal(loaded, out)
    del segment, view
    gc.collect()
    assert alive() is not None  # the mapping lives as long as the exact view
    assert torch.equal(out, torch.arange(64.0).view(8, 8))
    del out
    gc.collect()
    assert alive() is None
    big = torch.zeros(1 << 18)
    for odd in (big[5:5].view(0, 4), big[:64].view(8, 8).t()):  # no bytes, strided: torch.save writes storages
        blob = io.BytesIO()
        torch.save(exact_storage(odd), blob)
        assert len(blob.getvalue()) < 64 * 4 + 2048 and torch.equal(exact_storage(odd), odd)
