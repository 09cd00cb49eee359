"""Rank functions for real multi-process jobs (spawned; must be importable)."""

import os
import signal
import time

import torch
import torch.distributed as dist


def full_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "fsdp_uneven": torch.randn(7, 5, generator=g),  # Shard(0) over 4 ranks: 2, 2, 2, 1 rows
        "tiny": torch.randn(3, 2, generator=g),  # Shard(0) over 4 ranks: rank 3 holds nothing
        "tp_col": torch.randn(6, 10, generator=g),  # (Replicate, Shard(1)): TP inside HSDP replicas
        "hsdp": torch.randn(9, 3, generator=g),  # (Replicate, Shard(0)), uneven 5 + 4
        "two_d": torch.randn(8, 6, generator=g),  # (Shard(0), Shard(1))
        "strided": torch.randn(8, 4, generator=g),  # (Shard(0), Shard(0)) on a 2-D mesh
        "bf16_rows": torch.randn(5, 4, generator=g).bfloat16(),  # Shard(1) over 4 ranks, uneven
        "repl": torch.randn(4, generator=g),  # Replicate
        "plain": torch.arange(6),  # a plain tensor on every rank
        "scalar": torch.tensor(3.5),
    }


def mixed_layouts(rank, world, endpoint):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from stager.client import StagingClient, Subscriber
    from stager.client.admin import daemon_status

    mesh1 = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (2, world // 2))
    full = full_tensors()
    placements = {
        "fsdp_uneven": (mesh1, [Shard(0)]), "tiny": (mesh1, [Shard(0)]),
        "tp_col": (mesh2, [Replicate(), Shard(1)]), "hsdp": (mesh2, [Replicate(), Shard(0)]),
        "two_d": (mesh2, [Shard(0), Shard(1)]), "strided": (mesh2, [Shard(0), Shard(0)]),
        "bf16_rows": (mesh1, [Shard(1)]), "repl": (mesh1, [Replicate()]),
    }
    sd = {"model": {k: distribute_tensor(full[k], *placements[k]) if k in placements else full[k] for k in full},
          "train": {"step": 1, "names": ["a", "b"], "lr": 0.5}}
    client = StagingClient(endpoint, strict=True)
    h = client.stage(sd, step=1)
    assert h.wait_copied() is True
    first = h.wait(60)
    # a layout change between steps: a new tensor, a changed shape, a removed tensor
    full2 = dict(full)
    full2["fsdp_uneven"] = torch.randn(11, 5, generator=torch.Generator().manual_seed(1))
    full2["new"] = torch.randn(5, 5, generator=torch.Generator().manual_seed(2))
    del full2["tiny"]
    sd2 = {"model": {k: distribute_tensor(v, mesh1, [Shard(0)]) if k in ("fsdp_uneven", "new") else sd["model"][k]
                     for k, v in full2.items()}, "train": {"step": 2}}
    second = client.stage(sd2, step=2).wait(60)
    client.close()
    dist.barrier()
    out = {"first": first, "second": second}
    if rank == 0:
        out["status"] = daemon_status(endpoint)
        with Subscriber(endpoint) as sub:
            for step, expected, objects in ((1, full, {"train.step": 1, "train.names": ["a", "b"], "train.lr": 0.5}),
                                            (2, full2, {"train.step": 2})):
                with sub.at(step) as snap:
                    assert sorted(snap) == sorted(f"model.{k}" for k in expected), sorted(snap)
                    for k, v in expected.items():
                        got = snap[f"model.{k}"]
                        assert got.dtype == v.dtype and got.shape == v.shape, k
                        assert torch.equal(got, v), f"step {step}: {k} differs"
                    assert snap.objects == objects, snap.objects
    return out


def fsdp_partial_node(rank, world, endpoint):
    """A job of 4 ranks where this 'node' runs 2 of them: the snapshot is partial."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from stager.client import StagingClient

    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(torch.arange(40, dtype=torch.float32).view(8, 5), mesh, [Shard(0)])
    if rank >= 2:  # the other node's ranks have their own daemon; not simulated here
        dist.barrier()
        return None
    client = StagingClient(endpoint, rank=rank, local_world_size=2, world_size=world, strict=True)
    result = client.stage({"w": w, "b": torch.ones(3)}, step=1).wait(60)
    client.close()
    dist.barrier()
    return result


def die_mid_step(endpoint, rank, width):
    """Stage step 1 normally, then begin step 2, scribble over our region and SIGKILL ourselves."""
    from stager.client import StagingClient
    from stager.client.hook import client as staging

    w = torch.full((width,), float(rank))
    client = StagingClient(endpoint, rank=rank, local_world_size=2, world_size=2, strict=True)
    client.stage({f"w{rank}": w}, step=1).wait(30)
    original = staging._Worker._destinations

    def scribble_and_die(self, *args, **kwargs):
        for dst in original(self, *args, **kwargs):
            if dst is not None:
                dst.fill_(-7.0)
        os.kill(os.getpid(), signal.SIGKILL)

    staging._Worker._destinations = scribble_and_die
    client.stage({f"w{rank}": w}, step=2)
    time.sleep(60)
