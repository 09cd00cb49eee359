"""`stager demo`: a daemon, a 2-rank FSDP2 training loop on CPU (gloo) staging every few steps,
and a reader that checks the last version equals the unsharded model and optimizer, bit for bit."""

from __future__ import annotations

import json
import time

import torch
import torch.nn as nn

from stager.launch import DaemonProcess, run_ranks


class TinyModel(nn.Module):
    """Odd sizes on purpose: FSDP2 over 2 ranks shards 37 and 5 rows unevenly."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 24)
        self.up = nn.Linear(24, 37)
        self.down = nn.Linear(37, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(x).mean(1))))


def sharded_model(world_size: int) -> tuple[TinyModel, torch.optim.Optimizer]:
    """TinyModel under FSDP2 (every layer and the root) over a 1-D CPU mesh, with AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world_size,))
    model = TinyModel()
    for layer in (model.embed, model.up, model.down):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train_rank(rank: int, world_size: int, endpoint: str, steps: int, every: int) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )
    from stager.client import StagingClient, Subscriber

    model, optim = sharded_model(world_size)
    client = StagingClient(endpoint, strict=True)
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    stage_ms, copied_ms, sealed_ms, handle = [], [], [], None
    gen = torch.Generator().manual_seed(1 + rank)
    for step in range(1, steps + 1):
        x = torch.randint(0, 64, (8, 6), generator=gen)
        loss = model(x).square().mean()
        loss.backward()
        loss = loss.detach()
        if handle is not None:  # the previous stage's copy overlapped with this forward/backward
            handle.wait_copied()
        optim.step()
        optim.zero_grad()
        if step % every == 0 or step == steps:
            state = {"model": get_model_state_dict(model),
                     "optim": get_optimizer_state_dict(model, optim, options=flat),
                     "train": {"step": step, "loss": loss.item()}}
            t0 = time.perf_counter()
            handle = client.stage(state, step=step)
            stage_ms.append((time.perf_counter() - t0) * 1e3)
            handle.wait_copied()
            copied_ms.append((time.perf_counter() - t0) * 1e3)
            handle.wait(60)
            sealed_ms.append((time.perf_counter() - t0) * 1e3)
    client.close()
    full = StateDictOptions(full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True)
    expected = {"model": get_model_state_dict(model, options=full),
                "optim": get_optimizer_state_dict(model, optim, options=full)}
    result = {"stage_ms": stage_ms, "copied_ms": copied_ms, "sealed_ms": sealed_ms}
    if rank == 0:
        from stager.client.flatten import flatten_state_dict

        expected_tensors, _ = flatten_state_dict(expected)
        with Subscriber(endpoint) as sub, sub.latest() as snap:
            mismatched = [k for k, v in expected_tensors.items() if k not in snap or not torch.equal(snap[k], v)]
            result.update(step=snap.step, tensors=len(snap), objects=snap.objects,
                          nbytes=sum(t.numel() * t.element_size() for t in snap.values()),
                          mismatched=mismatched, missing=sorted(set(snap) - set(expected_tensors)))
    return result


def run_demo(steps: int = 6, stage_every: int = 2, json_out: bool = False) -> int:
    with DaemonProcess(args=("--memory-limit", "256MiB")) as daemon:
        results = run_ranks(_train_rank, 2, daemon.endpoint, steps, stage_every)
    r0 = results[0]
    ok = not r0["mismatched"] and r0["step"] == steps
    summary = {
        "ok": ok, "step": r0["step"], "tensors": r0["tensors"], "bytes": r0["nbytes"],
        "train_state": {k: v for k, v in r0["objects"].items() if k.startswith("train.")},
        "mismatched": r0["mismatched"],
        "stage_ms_max": round(max(max(r["stage_ms"]) for r in results), 3),
        "wait_copied_ms_max": round(max(max(r["copied_ms"]) for r in results), 3),
        "sealed_ms_max": round(max(max(r["sealed_ms"]) for r in results), 3),
    }
    if json_out:
        print(json.dumps(summary))
    else:
        print(f"demo: 2-rank FSDP2 on CPU, {steps} steps, staged every {stage_every}")
        print(f"  last version: step {summary['step']}, {summary['tensors']} tensors, {summary['bytes']} bytes, "
              f"train state {summary['train_state']}")
        print(f"  stage() <= {summary['stage_ms_max']} ms, wait_copied <= {summary['wait_copied_ms_max']} ms, "
              f"sealed <= {summary['sealed_ms_max']} ms")
        print("  matches the unsharded model and optimizer bit for bit: " + ("yes" if ok else f"NO {r0['mismatched']}"))
    return 0 if ok else 1
