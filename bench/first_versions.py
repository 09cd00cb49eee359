"""The first checkpoints of a job: stager's first three versions against DCP's first async_save.

Part of bench_staging (``--first-rounds``). Each measurement runs in fresh rank processes (and,
for stager, a fresh daemon), so both start with no staging memory: DCP's first save allocates
its shared-memory staging buffers, stager's first three versions each fill a new segment of
the daemon's rotation (``--keep`` sealed versions + the one being staged). Rounds alternate
which of the two goes first, as memory freed by one is warm for the next on this VM.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

from common import fresh_memory_seconds, settle_memory
from stager.dev.launch import DaemonProcess, run_ranks

VERSIONS = 3


def _model_state(world_size: int, size_gib: float) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from bench_staging import _large_model

    torch.set_num_threads(1)
    model, _ = _large_model(init_device_mesh("cpu", (world_size,)), size_gib)
    return model.state_dict()


def _dcp_rank(rank: int, world_size: int, cfg: dict) -> list[float]:
    from bench_staging import _dcp

    state = _model_state(world_size, cfg["size_gib"])
    return _dcp(state, cfg["tmp"], f"first-{cfg['round']}", VERSIONS, 0, cfg["busy_ms"])["warmup_staged_ms"]


def _ours_rank(rank: int, world_size: int, endpoint: str, cfg: dict) -> list[float]:
    from bench_staging import _busy
    from stager.client import StagingClient

    state = _model_state(world_size, cfg["size_gib"])
    times = []
    with StagingClient(endpoint, strict=True) as client:
        for step in range(1, VERSIONS + 1):
            _busy(cfg["busy_ms"])
            dist.barrier()
            t0 = time.perf_counter()
            client.stage(state, step=step).wait(120)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(size_gib: float, world_size: int, rounds: int, busy_ms: float, memory_limit: str, tmp: str) -> dict:
    """``rounds`` x (DCP's first saves, stager's first versions), alternating which goes first."""
    dcp_first, ours, fresh, settled = [], [], [], []
    for r in range(rounds):
        cfg = {"size_gib": size_gib, "busy_ms": busy_ms, "tmp": tmp, "round": r}
        order = ("dcp", "ours", "fresh") if r % 2 == 0 else ("ours", "dcp", "fresh")
        for which in order:
            settled.append(settle_memory())
            if which == "fresh":
                fresh.append([t * 1e3 for t in fresh_memory_seconds(int(size_gib * 2**30))])
            elif which == "dcp":
                per_rank = run_ranks(_dcp_rank, world_size, cfg, timeout=600.0)
                dcp_first.append(max(times[0] for times in per_rank))
            else:
                with DaemonProcess(args=("--memory-limit", memory_limit)) as daemon:
                    per_rank = run_ranks(_ours_rank, world_size, daemon.endpoint, cfg, timeout=600.0)
                ours.append([max(v) for v in zip(*per_rank)])
    first = statistics.median(dcp_first)
    ours_median = [statistics.median(r[i] for r in ours) for i in range(VERSIONS)]
    return {
        "rounds": rounds,
        "busy_ms": busy_ms,
        "dcp_first_save_ms": dcp_first,
        "ours_first_versions_ms": ours,
        "fresh_memory_ms": fresh,
        "fresh_memory_later_median_ms": statistics.median(t for r in fresh for t in r[1:]),
        "settle_s": settled,
        "dcp_first_save_median_ms": first,
        "ours_first_versions_median_ms": ours_median,
        "ours_over_dcp_first": [t / first for t in ours_median],
    }


def report_lines(first: dict) -> list[str]:
    lines = [
        f"[first versions] fresh processes, {first['rounds']} rounds alternating the order, "
        f"{first['busy_ms']:g} ms busy before each step; max over ranks, median over rounds",
        f"  anchor: a fresh process writes 4 x as many new bytes: after the first, each "
        f"{first['fresh_memory_later_median_ms']:6.1f} ms "
        f"(rounds: {'; '.join(', '.join(f'{t:.0f}' for t in r) for r in first['fresh_memory_ms'])}; "
        f"memory settled {statistics.median(first['settle_s']):.0f} s (median) before each)",
        f"  DCP first async_save staging_completion   {first['dcp_first_save_median_ms']:10.1f} ms "
        f"(rounds: {', '.join(f'{t:.0f}' for t in first['dcp_first_save_ms'])})",
    ]
    for i, (t, ratio) in enumerate(zip(first["ours_first_versions_median_ms"], first["ours_over_dcp_first"])):
        rounds = ", ".join(f"{r[i]:.0f}" for r in first["ours_first_versions_ms"])
        lines.append(f"  stager version {i + 1} sealed                  {t:10.1f} ms = {ratio:.2f}x (rounds: {rounds})")
    return lines


if __name__ == "__main__":  # quick look: python bench/first_versions.py
    import sys
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print("\n".join(report_lines(measure(1.0, 2, 2, 0.0, "8GiB", tempfile.mkdtemp()))))
