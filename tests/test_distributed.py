"""Real torch.distributed jobs (gloo, CPU processes) staging to a real daemon process."""

import torch

from dist_jobs import fsdp_partial_node, mixed_layouts
from stager.dev.demo import run_demo
from stager.dev.launch import DaemonProcess, run_ranks


def test_fsdp2_training_loop_matches_unsharded_model(capsys):
    assert run_demo(steps=4, stage_every=2) == 0
    out = capsys.readouterr().out
    assert "bit for bit: yes" in out


def test_tp_hsdp_2d_uneven_replicated_and_layout_change():
    with DaemonProcess(args=("--memory-limit", "64MiB")) as daemon:
        results = run_ranks(mixed_layouts, 4, daemon.endpoint)
    status = results[0]["status"]
    first, second = results[0]["first"], results[0]["second"]
    assert first["tensors"] == 10 and second["tensors"] == 10 and not first["partial"]
    # every region crossed into the snapshot exactly once per node: replicas were not sent twice
    assert status["counters"]["ingested_bytes"] == first["nbytes"] + second["nbytes"]
    assert all(r["first"] == first for r in results)


def test_multi_node_job_seals_partial_snapshot():
    with DaemonProcess(args=("--memory-limit", "64MiB")) as daemon:
        results = run_ranks(fsdp_partial_node, 4, daemon.endpoint)
        assert results[0]["partial"] is True
        from stager.client import Subscriber
        from stager.client.admin import daemon_status
        from stager.protocol import ErrorCode, StagerError

        version = daemon_status(daemon.endpoint)["versions"][0]
        assert version["partial"] and version["held_regions"] == {"w": [[[0, 0], [2, 5]], [[2, 0], [2, 5]]]}
        with Subscriber(daemon.endpoint) as sub:
            try:
                sub.latest()
                raise AssertionError("a partial version must not pass as complete")
            except StagerError as exc:
                assert exc.code == ErrorCode.PARTIAL
            with sub.latest(allow_partial=True) as snap:
                assert list(snap) == ["b"]
                (off0, t0), (off1, t1) = snap.regions("w")
                assert off0 == (0, 0) and off1 == (2, 0)
                assert torch.equal(torch.cat([t0, t1]), torch.arange(20, dtype=torch.float32).view(4, 5))
