"""DCP checkpoints written by the daemon's side load with plain DCP into other layouts, bit for bit."""

import json
import os
import subprocess
import sys

import torch

from stager.dev.launch import DaemonProcess, run_ranks


def fsdp_stage_then_load_as_tp(rank, world, endpoint, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from stager.client import StagingClient
    from stager.dev.demo import sharded_model
    from stager.writers.write_dcp import write_dcp

    model, optim = sharded_model(world)
    mesh = init_device_mesh("cpu", (world,))
    model(torch.randint(0, 64, (4, 6))).square().mean().backward()
    optim.step()
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optim, options=flat),
        "train": {"step": 3, "data_seed": 11},
    }
    with StagingClient(endpoint, strict=True) as client:
        client.stage(state, step=3).wait(60)
    full_opts = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
    expected = {
        "model": get_model_state_dict(model, options=full_opts),
        "optim": get_optimizer_state_dict(model, optim, options=full_opts),
    }
    if rank == 0:
        (path,) = write_dcp(out_dir, endpoint=endpoint)
    torch.distributed.barrier()
    path = os.path.join(out_dir, "step-00000003")
    # another parallelism: 2-D tensors column-sharded (TP Shard(1)), vectors row-sharded
    template = {
        part: {
            k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(1) if v.dim() == 2 else Shard(0)])
            if v.dim()
            else torch.zeros_like(v)
            for k, v in sd.items()
            if isinstance(v, torch.Tensor)
        }
        for part, sd in expected.items()
    }
    template["train"] = {"step": 0, "data_seed": 0}
    dcp.load(template, checkpoint_id=path)
    for part, sd in expected.items():
        for k, v in sd.items():
            if isinstance(v, torch.Tensor):
                got = template[part][k]
                got = got.full_tensor() if hasattr(got, "full_tensor") else got
                assert torch.equal(got, v), f"{part}.{k}"
    assert template["train"] == {"step": 3, "data_seed": 11}
    if rank == 0:  # tensors cannot be returned through the result queue (shared by fd, gone at exit)
        torch.save(
            {f"{part}.{k}": v for part, sd in expected.items() for k, v in sd.items() if isinstance(v, torch.Tensor)},
            os.path.join(out_dir, "..", "expected.pt"),
        )
    return True


def test_dcp_from_2_rank_fsdp2_loads_into_tp_and_into_one_process(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = str(tmp_path / "dcp")
    with DaemonProcess(args=("--memory-limit", "64MiB")) as daemon:
        assert run_ranks(fsdp_stage_then_load_as_tp, 2, daemon.endpoint, out) == [True, True]
        expected = torch.load(str(tmp_path / "expected.pt"), weights_only=True)
        listing = subprocess.run(
            [
                sys.executable,
                "-m",
                "stager.cli",
                "write-dcp",
                "--endpoint",
                daemon.endpoint,
                "--out",
                str(tmp_path / "cli"),
                "--step",
                "3",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert listing.returncode == 0, listing.stderr
        report = json.loads(listing.stdout)  # the keys README and --help promise
        assert report["written"].endswith("step-00000003") and report["step"] == 3 and report["seconds"] >= 0
        assert report["bytes"] == sum(t.numel() * t.element_size() for t in expected.values())
        assert report["files"] == len([f for f in os.listdir(report["written"]) if f.endswith(".distcp")]) >= 1
    path = os.path.join(out, "step-00000003")
    assert os.path.realpath(os.path.join(out, "latest")) == path
    assert not [d for d in os.listdir(out) if d.startswith(".")]  # no partial directory left
    # one process, no process group: plain tensors
    template = {k: torch.zeros_like(v) for k, v in expected.items()}
    template["train.step"] = 0
    dcp.load(template, checkpoint_id=path, no_dist=True)
    assert all(torch.equal(template[k], v) for k, v in expected.items()) and template["train.step"] == 3
    converted = str(tmp_path / "full.pt")
    dcp_to_torch_save(path, converted)
    full = torch.load(converted, weights_only=True)
    assert all(torch.equal(full[k], v) for k, v in expected.items()) and full["train.data_seed"] == 11


def test_dcp_files_hold_each_tensor_byte_once(make_daemon, tmp_path):
    import torch.distributed.checkpoint as dcp

    from stager.client import StagingClient
    from stager.writers.write_dcp import write_dcp

    g = torch.Generator().manual_seed(5)
    model = {f"layers.{i}.w": torch.randn(64, 64, generator=g) for i in range(8)}
    d = make_daemon()
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
        client.stage({"model": model, "train": {"step": 2}}, step=2).wait(10)
    path = write_dcp(str(tmp_path / "dcp"), endpoint=d.endpoint)[0]
    data = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".distcp"))
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.values())
    assert data <= 1.05 * tensor_bytes + 1024 * len(model), f"{data} bytes for {tensor_bytes} bytes of tensors"
    template = {f"model.{k}": torch.zeros_like(v) for k, v in model.items()}
    dcp.load(template, checkpoint_id=path, no_dist=True)
    assert all(torch.equal(template[f"model.{k}"], v) for k, v in model.items())
