"""Staging benchmark: a bare copy_, DCP async_save + DefaultStager, and the stager daemon, on one state dict.

    python bench/bench_staging.py                      # 1 GiB over 2 gloo ranks, then 1k and 10k small tensors
    python bench/bench_staging.py --size-gib 0.1 --iters 2 --small 1000 --json /tmp/bench.json

Every rank runs, on the same state dict (FSDP2 ``fully_shard`` of a few large ``nn.Linear`` layers,
``model.state_dict()`` -> DTensors sharded ``Shard(0)`` over the ranks):

(a) anchor: ``copy_`` of each local shard into CPU memory allocated and touched before timing;
(b) DCP: ``async_save(..., async_stager=DefaultStager(StagingOptions(pinned=False, shared=True, async=True,
    non_blocking=False)))``: time until the call returns and until ``staging_completion``; the upload to disk
    is awaited outside of the timing (and reported for information);
(c) ours: ``StagingClient.stage()`` return, ``handle.wait_copied()``, ``handle.wait()`` (sealed), after enough
    warm-up steps that the daemon's snapshot segments are pooled and reused; plus the daemon's CPU seconds per
    GiB ingested over the timed steps (``Status``: ``cpu_seconds`` and ``counters.ingested_bytes``).

(a) and (c) run in alternating rounds (one bare copy, one staged step) so that their ratio sees the same
background load; (b) runs after them, as its own block (each save writes the checkpoint to /tmp, which takes
seconds). Then (a), (c) and (b) again on N small DTensors (256 fp32 elements per rank each) for every N of
``--small``; per-tensor overhead = (median sealed - median bare copy) / N. DCP is skipped on small sets larger
than ``--dcp-small-max`` (it needs ~10 s per save of 10000 small tensors here).

First (``--first-rounds``): the first checkpoints of a job, in fresh processes: DCP's first ``async_save``
against stager's first three versions (see bench/first_versions.py).

Ranks synchronize with ``dist.barrier()`` before every timed iteration. Each iteration is reduced by the max
over ranks (the slowest rank decides when staging is done), then summarized by the median and min over
iterations. Times are in milliseconds unless marked otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import first_versions  # noqa: E402
from common import machine, write_report  # noqa: E402
from stager.dev.launch import DaemonProcess, run_ranks

WORLD = 2
IN_FEATURES = 4096
LAYERS = 8
SMALL_NUMEL = 256  # fp32 elements per rank of each small tensor

# Targets, checked against medians (max over ranks per iteration, median over iterations).
STAGE_LIMIT_MS = 2.0
COPIED_VS_BARE = 1.2
SEALED_VS_DCP = 0.6
FIRST_VS_DCP_FIRST = 1.5  # each of the first three versions against DCP's first save
PER_TENSOR_LIMIT_US = 50.0


def _ms(ns: int) -> float:
    return ns / 1e6


# --------------------------------------------------------------------------- state dicts


def _large_model(mesh, size_gib: float) -> tuple[nn.Module, str]:
    """``LAYERS`` Linear(IN_FEATURES -> rows) layers holding ``size_gib`` GiB of fp32 weights in total,
    built on the meta device, sharded with FSDP2, then materialized on CPU (no costly random init)."""
    from torch.distributed.fsdp import fully_shard

    rows = max(WORLD, int(round(size_gib * 2**30 / (LAYERS * IN_FEATURES * 4) / WORLD)) * WORLD)
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(IN_FEATURES, rows) for _ in range(LAYERS)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.to_local().fill_(0.25 + i + dist.get_rank())  # touch every page
    return model, f"{LAYERS} x Linear({IN_FEATURES} -> {rows}) fp32 with bias, FSDP2 fully_shard"


def _small_state(mesh, n: int) -> dict:
    """``n`` DTensors of ``WORLD * SMALL_NUMEL`` fp32 elements sharded Shard(0): ``SMALL_NUMEL`` per rank."""
    from torch.distributed.tensor import DTensor, Shard

    rank = dist.get_rank()
    return {
        f"small.{i:05d}": DTensor.from_local(
            torch.full((SMALL_NUMEL,), float(i * WORLD + rank)), mesh, [Shard(0)], run_check=False
        )
        for i in range(n)
    }


def _locals(state: dict) -> list[torch.Tensor]:
    return [v._local_tensor if hasattr(v, "_local_tensor") else v for v in state.values()]


# --------------------------------------------------------------------------- the three measurements


def _busy(ms: float) -> None:
    """Keep the train thread computing for ``ms`` (small matmuls, as a forward/backward would) before a timed
    iteration; with 0 (default) the thread comes out of the previous iteration's wait and the barrier."""
    if ms <= 0:
        return
    a = torch.ones(256, 256)
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        torch.mm(a, a)


class _BareCopy:
    """(a): ``copy_`` of every local shard into CPU memory allocated and touched once, before any timing."""

    def __init__(self, state: dict):
        self.srcs = _locals(state)
        self.dsts = [torch.empty_like(s) for s in self.srcs]
        for d in self.dsts:
            d.fill_(0)

    def run(self) -> float:
        t0 = time.perf_counter_ns()
        for d, s in zip(self.dsts, self.srcs):
            d.copy_(s)
        return _ms(time.perf_counter_ns() - t0)

    def verified(self) -> bool:
        return all(torch.equal(d, s) for d, s in zip(self.dsts[:4], self.srcs[:4]))


def _schedstat_seconds(pid: int) -> float | None:
    """On-CPU time of every thread of ``pid`` (zmq I/O threads included) in ns resolution, from
    /proc/PID/task/*/schedstat; the Status figure (psutil) counts 10 ms clock ticks."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that just exited
    except OSError:
        return None
    return total / 1e9


class _DaemonStatus:
    """Rank 0's admin connection to the daemon: cpu_seconds and ingested bytes."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def get(self) -> dict:
        from stager.client.admin import daemon_status

        status = daemon_status(self.endpoint, 10.0)
        status["schedstat_seconds"] = _schedstat_seconds(status["pid"])
        return status

    def close(self) -> None:
        pass


def _anchor_and_ours(client, state: dict, steps: list[int], cfg: dict, status: _DaemonStatus | None) -> dict:
    """(a) and (c) in alternating rounds (a bare copy, then one staged step), so that both see the same
    background load; warm-ups first: ``warmup`` bare copies, ``ours_warmup`` staged steps.

    Each staged step: stage() return, wait_copied() and wait() (sealed), all from just before stage().
    ``steps`` is a step counter shared by all cases (one-element list): step numbers must keep increasing.
    """
    bare = _BareCopy(state)
    busy, iters = cfg["busy_ms"], cfg["iters"]
    res = {"copy_ms": [], "stage_ms": [], "copied_ms": [], "sealed_ms": [], "warmup_sealed_ms": []}

    def staged_step() -> tuple[float, float, float, dict]:
        steps[0] += 1
        t0 = time.perf_counter_ns()
        handle = client.stage(state, step=steps[0])
        t1 = time.perf_counter_ns()
        handle.wait_copied()
        t2 = time.perf_counter_ns()
        result = handle.wait(120)
        t3 = time.perf_counter_ns()
        return _ms(t1 - t0), _ms(t2 - t0), _ms(t3 - t0), result

    for _ in range(cfg["warmup"]):
        _busy(busy)
        dist.barrier()
        bare.run()
    for _ in range(cfg["ours_warmup"]):
        _busy(busy)
        dist.barrier()
        res["warmup_sealed_ms"].append(staged_step()[2])
    dist.barrier()
    before = status.get() if status is not None else None
    sched_steps = 0.0  # daemon on-CPU time during the staged steps only (rank 0 reads /proc)
    for _ in range(iters):
        _busy(busy)
        dist.barrier()
        res["copy_ms"].append(bare.run())
        _busy(busy)
        dist.barrier()
        s0 = _schedstat_seconds(before["pid"]) if before is not None else None
        stage_ms, copied_ms, sealed_ms, result = staged_step()
        if s0 is not None:
            s1 = _schedstat_seconds(before["pid"])
            sched_steps = sched_steps + (s1 - s0) if s1 is not None else sched_steps
        res["stage_ms"].append(stage_ms)
        res["copied_ms"].append(copied_ms)
        res["sealed_ms"].append(sealed_ms)
        res["sealed_nbytes"], res["sealed_tensors"] = result["nbytes"], result["tensors"]
    dist.barrier()
    res["verified"] = bare.verified()
    del bare
    if status is not None:
        after = status.get()
        cpu = after["cpu_seconds"] - before["cpu_seconds"]
        ingested = after["counters"]["ingested_bytes"] - before["counters"]["ingested_bytes"]
        gib = ingested / 2**30
        sched = (
            after["schedstat_seconds"] - before["schedstat_seconds"]
            if after["schedstat_seconds"] is not None and before["schedstat_seconds"] is not None
            else None
        )
        res["daemon"] = {
            "cpu_seconds": cpu,
            "ingested_bytes": ingested,
            "cpu_seconds_per_gib": cpu / gib if gib else None,
            "schedstat_seconds": sched,
            "schedstat_seconds_per_gib": sched / gib if gib and sched is not None else None,
            "schedstat_steps_seconds": sched_steps,
            "schedstat_steps_seconds_per_gib": sched_steps / gib if gib else None,
            "memory_used_before": before["memory"]["used"],
            "memory_used_after": after["memory"]["used"],
            "pooled_after": after["memory"]["pooled"],
            "keep": after["keep"],
            "sealed_delta": after["counters"]["sealed"] - before["counters"]["sealed"],
            "failed_delta": after["counters"]["failed"] - before["counters"]["failed"],
        }
    return res


def _dcp(state: dict, base: str, label: str, warmup: int, iters: int, busy_ms: float) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

    stager = DefaultStager(
        StagingOptions(
            use_pinned_memory=False, use_shared_memory=True, use_async_staging=True, use_non_blocking_copy=False
        )
    )
    res = {"return_ms": [], "staged_ms": [], "upload_ms": [], "warmup_staged_ms": []}
    try:
        for i in range(warmup + iters):
            path = os.path.join(base, f"dcp-{label}-{i}")
            _busy(busy_ms)
            dist.barrier()
            t0 = time.perf_counter_ns()
            resp = dcp.async_save(state, checkpoint_id=path, async_stager=stager)
            t1 = time.perf_counter_ns()
            if isinstance(resp, AsyncSaveResponse):
                resp.staging_completion.result()
                upload = resp.upload_completion
            else:  # an older API: a bare future of the upload
                stager.synchronize_staging()
                upload = resp
            t2 = time.perf_counter_ns()
            upload.result()  # not timed as staging; its collectives run on a background thread, so it
            t3 = time.perf_counter_ns()  # must finish before the main thread's next barrier
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(path, ignore_errors=True)
            if i < warmup:
                res["warmup_staged_ms"].append(_ms(t2 - t0))
                continue
            res["return_ms"].append(_ms(t1 - t0))
            res["staged_ms"].append(_ms(t2 - t0))
            res["upload_ms"].append(_ms(t3 - t0))
    finally:
        stager.close()
    return res


def _bench_rank(rank: int, world_size: int, endpoint: str, cfg: dict) -> dict:
    """One rank: all measurements, in order; returns raw per-iteration figures."""
    from torch.distributed.device_mesh import init_device_mesh

    from stager.client import StagingClient

    torch.set_num_threads(cfg["threads"])
    mesh = init_device_mesh("cpu", (world_size,))
    status = _DaemonStatus(endpoint) if rank == 0 else None
    client = StagingClient(endpoint, strict=True)
    steps = [0]
    warm, iters, busy = cfg["warmup"], cfg["iters"], cfg["busy_ms"]
    out: dict = {"rank": rank, "cases": {}}

    def case(label: str, state: dict, describe: str, with_dcp: bool) -> None:
        locs = _locals(state)
        rec = {
            "describe": describe,
            "tensors": len(state),
            "local_bytes": sum(t.numel() * t.element_size() for t in locs),
        }
        t = time.perf_counter()
        rec["ours"] = _anchor_and_ours(client, state, steps, cfg, status)
        if with_dcp:
            rec["dcp"] = _dcp(state, cfg["tmp"], label, warm, iters, busy)
        rec["wall_s"] = time.perf_counter() - t
        out["cases"][label] = rec

    model, describe = _large_model(mesh, cfg["size_gib"])
    case("large", model.state_dict(), describe, not cfg["skip_dcp"])
    del model
    for n in cfg["small"]:
        with_dcp = not cfg["skip_dcp"] and n <= cfg["dcp_small_max"]
        case(f"small{n}", _small_state(mesh, n), f"{n} DTensors of {WORLD * SMALL_NUMEL} fp32, Shard(0)", with_dcp)
    client.close()
    if status is not None:
        status.close()
    return out


# --------------------------------------------------------------------------- reduction and report


def _reduce(per_rank: list[list[float]]) -> dict | None:
    """Max over ranks per iteration, then median and min over iterations."""
    if not per_rank or any(not r for r in per_rank):
        return None
    worst = [max(vals) for vals in zip(*per_rank)]
    return {"median": statistics.median(worst), "min": min(worst), "max_over_ranks": worst, "per_rank": per_rank}


def _summarize(results: list[dict]) -> dict:
    cases = {}
    for label, r0 in results[0]["cases"].items():
        recs = [r["cases"][label] for r in results]
        c = {
            "describe": r0["describe"],
            "tensors": r0["tensors"],
            "total_bytes": sum(r["local_bytes"] for r in recs),
            "wall_s": max(r["wall_s"] for r in recs),
            "bare_copy_verified": all(r["ours"]["verified"] for r in recs),
            "bare_copy_ms": _reduce([r["ours"]["copy_ms"] for r in recs]),
            "stage_ms": _reduce([r["ours"]["stage_ms"] for r in recs]),
            "wait_copied_ms": _reduce([r["ours"]["copied_ms"] for r in recs]),
            "sealed_ms": _reduce([r["ours"]["sealed_ms"] for r in recs]),
            "ours_warmup_sealed_ms": _reduce([r["ours"]["warmup_sealed_ms"] for r in recs]),
            "sealed_nbytes": r0["ours"].get("sealed_nbytes"),
            "daemon": r0["ours"].get("daemon"),
        }
        if "dcp" in r0:
            c["dcp_return_ms"] = _reduce([r["dcp"]["return_ms"] for r in recs])
            c["dcp_staged_ms"] = _reduce([r["dcp"]["staged_ms"] for r in recs])
            c["dcp_upload_ms"] = _reduce([r["dcp"]["upload_ms"] for r in recs])
            c["dcp_warmup_staged_ms"] = _reduce([r["dcp"]["warmup_staged_ms"] for r in recs])
        if label != "large":
            n = c["tensors"]
            c["per_tensor_overhead_us"] = (c["sealed_ms"]["median"] - c["bare_copy_ms"]["median"]) * 1e3 / n
            c["per_tensor_overhead_copied_us"] = (c["wait_copied_ms"]["median"] - c["bare_copy_ms"]["median"]) * 1e3 / n
        cases[label] = c
    return cases


def _targets(cases: dict, first: dict | None) -> list[dict]:
    out = []

    def add(name, measured, limit, unit):
        if measured is None:
            out.append({"target": name, "measured": None, "limit": limit, "unit": unit, "ratio": None, "pass": None})
            return
        out.append(
            {
                "target": name,
                "measured": measured,
                "limit": limit,
                "unit": unit,
                "ratio": measured / limit,
                "pass": measured <= limit,
            }
        )

    for label, c in cases.items():
        add(f"stage() returns [{label}]", c["stage_ms"]["median"], STAGE_LIMIT_MS, "ms")
    large = cases["large"]
    add(
        "wait_copied / bare copy [large]",
        large["wait_copied_ms"]["median"] / large["bare_copy_ms"]["median"],
        COPIED_VS_BARE,
        "x",
    )
    dcp = large.get("dcp_staged_ms")
    add(
        "sealed / DCP staging_completion [large]",
        large["sealed_ms"]["median"] / dcp["median"] if dcp else None,
        SEALED_VS_DCP,
        "x",
    )
    for label, c in cases.items():
        if label != "large":
            add(f"per-tensor overhead [{label}]", c["per_tensor_overhead_us"], PER_TENSOR_LIMIT_US, "us")
    for i, ratio in enumerate(first["ours_over_dcp_first"] if first else []):
        add(f"version {i + 1} sealed / DCP first save", ratio, FIRST_VS_DCP_FIRST, "x")
    return out


def _fmt(stat: dict | None) -> str:
    return "           -         -" if stat is None else f"{stat['median']:12.3f} {stat['min']:9.3f}"


def _print_report(report: dict) -> None:
    m = report["meta"]
    print(f"stager staging benchmark  {m['date']}  host {m['host']}  {m['cpus']} cpus  torch {m['torch']}")
    print(
        f"{m['world_size']} gloo ranks on CPU, {m['threads_per_rank']} intra-op thread(s) per rank, "
        f"{m['iters']} timed iterations (warm-up: {m['warmup']}, ours {m['ours_warmup']}), "
        f"{m['busy_ms']:g} ms busy before each; "
        "max over ranks per iteration, then median / min over iterations"
    )
    rows = [
        ("(a) bare copy_ of local shards", "bare_copy_ms"),
        ("(b) DCP async_save returns", "dcp_return_ms"),
        ("    DCP staging_completion", "dcp_staged_ms"),
        ("    DCP upload done (info, untimed)", "dcp_upload_ms"),
        ("(c) stage() returns", "stage_ms"),
        ("    wait_copied()", "wait_copied_ms"),
        ("    wait() sealed", "sealed_ms"),
        ("    warm-up sealed (info)", "ours_warmup_sealed_ms"),
    ]
    for label, c in report["cases"].items():
        print()
        print(
            f"[{label}] {c['describe']}: {c['tensors']} tensors, {c['total_bytes'] / 2**20:.2f} MiB over all ranks "
            f"(wall {c['wall_s']:.1f} s)"
        )
        print(f"  {'':38s} {'median ms':>12s} {'min ms':>9s}")
        for name, key in rows:
            if key in c and c[key] is not None:
                print(f"  {name:38s} {_fmt(c[key])}")
            elif key.startswith("dcp"):
                print(f"  {name:38s}      skipped")
        if c.get("ours_warmup_sealed_ms"):
            warm = c["ours_warmup_sealed_ms"]["max_over_ranks"]
            print(f"  {'':38s} (warm-up steps: {', '.join(f'{w:.1f}' for w in warm)} ms)")
        d = c.get("daemon")
        if d:
            per = d["cpu_seconds_per_gib"]
            print(
                f"  daemon CPU: {d['cpu_seconds']:.3f} s over {d['ingested_bytes'] / 2**30:.3f} GiB ingested = "
                f"{'n/a' if per is None else f'{per:.4f}'} s/GiB (Status, 10 ms ticks)"
            )
            if d.get("schedstat_seconds_per_gib") is not None:
                print(
                    f"  daemon CPU (all threads, /proc schedstat): {d['schedstat_seconds'] * 1e3:.2f} ms = "
                    f"{d['schedstat_seconds_per_gib'] * 1e3:.3f} ms/GiB over the rounds; during the staged "
                    f"steps only {d['schedstat_steps_seconds'] * 1e3:.2f} ms = "
                    f"{d['schedstat_steps_seconds_per_gib'] * 1e3:.3f} ms/GiB"
                )
            print(
                f"  daemon shm used "
                f"{d['memory_used_before'] / 2**20:.0f} -> {d['memory_used_after'] / 2**20:.0f} MiB, "
                f"sealed {d['sealed_delta']}, failed {d['failed_delta']}"
            )
        if "per_tensor_overhead_us" in c:
            print(
                f"  per-tensor overhead: (sealed - bare) / N = {c['per_tensor_overhead_us']:.2f} us; "
                f"(wait_copied - bare) / N = {c['per_tensor_overhead_copied_us']:.2f} us"
            )
    if report.get("first_versions"):
        print()
        print("\n".join(first_versions.report_lines(report["first_versions"])))
    print()
    print(f"  {'target':45s} {'measured':>12s} {'limit':>9s} {'meas/limit':>10s}  result")
    for t in report["targets"]:
        if t["measured"] is None:
            print(f"  {t['target']:45s} {'-':>12s} {t['limit']:>8g}{t['unit']} {'-':>10s}  n/a")
            continue
        print(
            f"  {t['target']:45s} {t['measured']:>10.3f}{t['unit']:<2s} {t['limit']:>7g}{t['unit']:<2s}"
            f"{t['ratio']:>10.2f}  {'PASS' if t['pass'] else 'MISS'}"
        )
    print(f"\ntotal runtime {m['runtime_s']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0, help="total fp32 model size over all ranks (default 1.0)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per measurement (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations for (a) and (b) (default 2)")
    p.add_argument("--small", default="1000,10000", help="comma list of small-tensor counts ('' for none)")
    p.add_argument("--skip-dcp", action="store_true", help="do not measure DCP async_save")
    p.add_argument(
        "--dcp-small-max",
        type=int,
        default=1000,
        help="measure DCP on small-tensor sets only up to this many tensors (default 1000: DCP takes "
        "~0.6 s to stage and ~2 s to write 1000 small tensors here, ~10x that for 10000)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per rank (default 1, as torchrun sets OMP_NUM_THREADS)",
    )
    p.add_argument(
        "--busy-ms",
        type=float,
        default=0.0,
        help="ms of compute on the train thread before every timed iteration (default 0); with a "
        "busy train thread the client's staging thread tends to win the GIL right after stage()",
    )
    p.add_argument("--memory-limit", default="8GiB", help="daemon --memory-limit (default 8GiB)")
    p.add_argument(
        "--first-rounds",
        type=int,
        default=2,
        help="rounds of first-checkpoint measurements in fresh processes: DCP's first save against "
        "stager's first three versions (default 2; 0 to skip)",
    )
    p.add_argument(
        "--change-maps",
        help="daemon --change-maps (default: the daemon's); run with bfloat16 and none back to back to see "
        "what change maps cost a step",
    )
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON to PATH")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    small = [int(s) for s in args.small.split(",") if s.strip()]

    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench-staging-", dir="/tmp")
    first = None
    try:
        if args.first_rounds > 0 and not args.skip_dcp:
            first = first_versions.measure(
                args.size_gib, WORLD, args.first_rounds, args.busy_ms, args.memory_limit, tmp
            )
        maps = ("--change-maps", args.change_maps) if args.change_maps else ()
        with DaemonProcess(args=("--memory-limit", args.memory_limit, *maps)) as daemon:
            keep = int(daemon.info.get("keep", 2))
            # keep + 1 steps create keep + 1 segments (the newest `keep` sealed ones are retained while the
            # next step stages); from then on every step reuses a pooled segment the client has mapped already.
            ours_warmup = max(2, keep + 1)
            cfg = {
                "size_gib": args.size_gib,
                "iters": args.iters,
                "warmup": args.warmup,
                "ours_warmup": ours_warmup,
                "small": small,
                "skip_dcp": args.skip_dcp,
                "dcp_small_max": args.dcp_small_max,
                "threads": args.threads,
                "tmp": tmp,
                "busy_ms": args.busy_ms,
            }
            results = run_ranks(_bench_rank, WORLD, daemon.endpoint, cfg, timeout=900.0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "meta": {
            **machine(),
            "world_size": WORLD,
            "threads_per_rank": args.threads,
            "size_gib": args.size_gib,
            "iters": args.iters,
            "warmup": args.warmup,
            "ours_warmup": ours_warmup,
            "busy_ms": args.busy_ms,
            "daemon_keep": keep,
            "memory_limit": args.memory_limit,
            "change_maps": args.change_maps,
            "small": small,
            "skip_dcp": args.skip_dcp,
            "argv": sys.argv[1:],
            "runtime_s": time.perf_counter() - t_start,
        },
        "targets_definition": {
            "stage_ms_max": STAGE_LIMIT_MS,
            "wait_copied_over_bare_max": COPIED_VS_BARE,
            "sealed_over_dcp_staged_max": SEALED_VS_DCP,
            "per_tensor_overhead_us_max": PER_TENSOR_LIMIT_US,
        },
    }
    report["cases"] = _summarize(results)
    report["first_versions"] = first
    report["targets"] = _targets(report["cases"], first)
    _print_report(report)
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
