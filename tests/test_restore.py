"""Restoring training state from the daemon in place: other world sizes, typed errors, nothing half done."""

import pytest
import torch

from dist_jobs import (
    restore_fsdp_train_state,
    restore_model_as_tp,
    restore_with_one_bad_rank,
    stage_fsdp_train_state,
    train_with_staging,
)
from stager.client import StagingClient
from stager.dev.launch import DaemonProcess, run_ranks
from stager.protocol import ErrorCode, StagerError


def test_fsdp2_model_and_optimizer_restore_at_another_world_size_and_placement():
    with DaemonProcess(args=("--memory-limit", "64MiB")) as daemon:
        env = {"STAGER_ENDPOINT": daemon.endpoint}
        staged = run_ranks(stage_fsdp_train_state, 2, env=env)[0]
        restored = run_ranks(restore_fsdp_train_state, 3, env=env)
        as_tp = run_ranks(restore_model_as_tp, 3, env=env)
    for step, model in as_tp:  # FSDP (Shard(0), 2 ranks) -> TP (Shard(1), 3 ranks)
        assert step == 7 and sorted(model) == sorted(k for k in staged if k.startswith("model."))
        assert all((model[k] == staged[k]).all() for k in model)
    for step, train, after in restored:
        assert step == 7 and train == {"step": 7, "data": {"epoch": 1, "position": 1234}}
        assert sorted(after) == sorted(staged)
        assert [k for k, v in staged.items() if not (after[k] == v).all()] == []


@pytest.mark.parametrize(
    "target,text",
    [
        (
            {"w": torch.zeros(4, 5), "b": torch.zeros(3)},
            r"w: step 1 holds float32\[4, 4\], the model has float32\[4, 5\]",
        ),
        (
            {"w": torch.zeros(4, 4, dtype=torch.bfloat16), "b": torch.zeros(3)},
            r"w: step 1 holds float32\[4, 4\], the "
            r"model has bfloat16\[4, 4\]",
        ),
        ({"w": torch.zeros(4, 4), "b": torch.zeros(3), "extra": torch.zeros(1)}, "extra: not in step 1"),
    ],
    ids=["shape", "dtype", "unknown name"],
)
def test_a_mismatch_names_the_tensor_and_writes_nothing(make_daemon, target, text):
    d = make_daemon()
    with StagingClient(d.endpoint, strict=True) as client:
        client.stage({"w": torch.ones(4, 4), "b": torch.ones(3)}, step=1).wait(10)
        with pytest.raises(StagerError, match=text) as info:
            client.restore(target)
    assert info.value.code == ErrorCode.BAD_VALUE
    assert all(not t.any() for t in target.values())  # checked before any byte was written


def test_restore_a_chosen_step_and_plain_tensors(make_daemon):
    d = make_daemon()
    with StagingClient(d.endpoint, strict=True) as client:
        for step in (1, 2):
            client.stage({"w": torch.full((3, 2), float(step)), "meta": {"lr": step / 10}}, step=step).wait(10)
        sd = {"w": torch.zeros(3, 2), "meta": {"lr": 0.0}}
        assert client.restore(sd, step=1) == 1 and torch.equal(sd["w"], torch.ones(3, 2)) and sd["meta"]["lr"] == 0.1
        assert client.restore(sd) == 2 and torch.equal(sd["w"], torch.full((3, 2), 2.0))


def test_after_kill_9_of_every_rank_a_restarted_job_continues_with_the_uninterrupted_losses():
    with DaemonProcess(args=("--memory-limit", "64MiB")) as daemon:  # the daemon outlives the trainer
        env = {"STAGER_ENDPOINT": daemon.endpoint}
        with pytest.raises(RuntimeError):
            run_ranks(train_with_staging, 2, "fresh", 6, 3, env=env)  # SIGKILL in the middle of step 4
        resumed = run_ranks(train_with_staging, 2, "resume", 3, env=env)[0]  # restores step 3, trains 4-6
    with DaemonProcess(args=("--memory-limit", "64MiB")) as daemon:
        reference = run_ranks(train_with_staging, 2, "fresh", 6, env={"STAGER_ENDPOINT": daemon.endpoint})[0]
    assert sorted(resumed) == [4, 5, 6]
    assert {s: resumed[s] for s in resumed} == {s: reference[s] for s in resumed}  # bit for bit


def test_one_rank_that_does_not_match_fails_every_rank_and_none_restores():
    with DaemonProcess(args=("--memory-limit", "64MiB")) as daemon:
        results = run_ranks(restore_with_one_bad_rank, 2, env={"STAGER_ENDPOINT": daemon.endpoint})
    (code0, message0, written0), (code1, message1, written1) = results
    assert code0 == code1 == "bad_value" and not written0 and not written1
    assert "w: step 1 holds float32[4, 4], the model has float32[4, 5]" in message1
    assert message0.startswith("rank 1 failed while checking step 1") and "float32[4, 5]" in message0
