"""Multi-node benchmark on one host: several daemons, each its own node, against their anchors, in one run.

    python bench/bench_multinode.py [--size-mib 512] [--json PATH]

(a) fan-out reads: a reader on no node's host reads a whole version (native view) whose tensors
    are FSDP-sharded over 1, 2 and 3 nodes, every byte over tcp with CURVE from each node's daemon;
    anchor: raw ZeroMQ PUSH/PULL over CURVE, one sender, same run (the per-source limit);
(b) distributed write-dcp (one writer per node, each its node's regions) against DCP's own
    multi-rank ``dcp.save`` of the same DTensor shards, 2 nodes / 2 ranks, same disk, same run;
(c) seal to complete: from the last node's seal (the ranks' ``handle.wait()`` returning) to a
    subscriber pointed at one daemon holding the complete version, 2 and 3 nodes.
Goal (a): >= 0.8x raw ZeroMQ per source, scaling with sources until a core or the socket is the limit.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_live import _raw_zmq  # noqa: E402
from common import curve_keys, machine, write_report  # noqa: E402
from stager.dev.launch import SimulatedCluster, run_ranks  # noqa: E402

MIB = 1 << 20


def full_state(size_mib: int, step: int) -> dict[str, torch.Tensor]:
    """``size_mib`` MiB of fp32 in 16 tensors (rows divisible by 6: even FSDP shards on 1-3 nodes)."""
    rows = size_mib * MIB // 4 // 16 // 1536 // 6 * 6
    g = torch.Generator().manual_seed(step)
    return {f"layers.{i}.w": torch.rand(rows, 1536, generator=g) for i in range(16)}


def stage_sharded(rank, world, size_mib, steps, stamp_dir):
    """Stage ``steps`` FSDP-sharded over every rank; note when each seal returned."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from stager.client import StagingClient

    mesh = init_device_mesh("cpu", (world,))
    client = StagingClient(strict=True, timeout=60)
    for step in steps:
        sd = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full_state(size_mib, step).items()}
        dist.barrier()
        client.stage(sd, step=step).wait(300)
        if stamp_dir:
            with open(os.path.join(stamp_dir, f"sealed-{step}-{rank}"), "w") as f:
                f.write(repr(time.time()))
        dist.barrier()
    client.close()


def _reader(endpoint: str, queue) -> None:
    from stager.client import Subscriber

    torch.set_num_threads(1)
    runs = []
    with Subscriber(endpoint, timeout=120) as sub:
        for _ in range(3):
            with sub.latest() as snap:
                t0, n = time.perf_counter(), 0
                for _, t in snap.items():
                    n += t.numel() * t.element_size()
                runs.append((time.perf_counter() - t0, n))
    queue.put(runs)


def _waiter(endpoint: str, steps: int, queue) -> None:
    from stager.client import Subscriber

    stamps = {}
    with Subscriber(endpoint, timeout=120) as sub:
        queue.put("ready")
        step = None
        while step is None or step < steps:  # a version completed right after another may be skipped
            snap = sub.wait_for_newer(step, timeout=300)
            stamps[snap.step] = time.time()
            step = snap.step
            snap.release()
    queue.put(stamps)


def dcp_writer(rank, world, out):
    import torch.distributed as dist
    import torch.distributed.checkpoint  # noqa: F401  (imported before timing, as the anchor's is)

    from stager.writers.write_dcp_dist import write_dcp_distributed

    dist.barrier()
    t0 = time.perf_counter()
    write_dcp_distributed(out)
    return time.perf_counter() - t0


def dcp_anchor(rank, world, size_mib, out):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    sd = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full_state(size_mib, 1).items()}
    dist.barrier()
    t0 = time.perf_counter()
    dcp.save(sd, checkpoint_id=out)
    dist.barrier()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--json")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    report: dict = machine()
    limit = ("--memory-limit", f"{4 * args.size_mib}MiB", "--keep", "2")
    tmp = tempfile.mkdtemp(prefix="stager-bench-mn-")
    keys = curve_keys(tmp)
    total = sum(t.numel() * 4 for t in full_state(args.size_mib, 1).values())
    report["bytes"] = total
    try:
        print(f"[{time.strftime('%H:%M:%S')}] (a) raw ZeroMQ anchor", file=sys.stderr, flush=True)
        report["a_raw_zmq_bytes_per_s"] = _raw_zmq(total, keys)
        for n in (1, 2, 3):
            print(f"[{time.strftime('%H:%M:%S')}] (a, c) {n} nodes", file=sys.stderr, flush=True)
            stamps = os.path.join(tmp, f"stamps-{n}")
            os.makedirs(stamps)
            with SimulatedCluster(n, args=limit, auth_dir=keys) as cluster:
                q = ctx.Queue()
                waiter = None
                if n > 1:
                    waiter = ctx.Process(target=_waiter, args=(cluster.endpoints[0], 3, q))
                    waiter.start()
                    assert q.get(timeout=120) == "ready"
                run_ranks(stage_sharded, n, args.size_mib, [1, 2, 3], stamps, nodes=cluster.nodes, timeout=900)
                if waiter is not None:
                    got = q.get(timeout=300)
                    waiter.join()
                    lat = []
                    for step, seen in got.items():
                        sealed = [
                            float(open(os.path.join(stamps, f)).read())
                            for f in os.listdir(stamps)
                            if f.startswith(f"sealed-{step}-")
                        ]
                        lat.append(seen - max(sealed))
                    report[f"c_seal_to_complete_s_{n}"] = lat
                r = ctx.Process(target=_reader, args=(cluster.endpoints[0], q))
                r.start()
                report[f"a_read_{n}"] = q.get(timeout=900)
                r.join()
        print(f"[{time.strftime('%H:%M:%S')}] (b) distributed write-dcp vs dcp.save", file=sys.stderr, flush=True)
        del os.environ["STAGER_AUTH_DIR"]
        with SimulatedCluster(2, args=limit) as cluster:
            run_ranks(stage_sharded, 2, args.size_mib, [1], "", nodes=cluster.nodes, timeout=900)
            ours, theirs = [], []
            for i in range(3):  # alternated, each into a new directory
                theirs.append(max(run_ranks(dcp_anchor, 2, args.size_mib, os.path.join(tmp, f"dcp-{i}"))))
                ours.append(max(run_ranks(dcp_writer, 2, os.path.join(tmp, f"ours-{i}"), nodes=cluster.nodes)))
                shutil.rmtree(os.path.join(tmp, f"dcp-{i}"), ignore_errors=True)
                shutil.rmtree(os.path.join(tmp, f"ours-{i}"), ignore_errors=True)
        report["b_write_dcp_distributed_s"], report["b_dcp_save_s"] = ours, theirs
    finally:
        os.environ.pop("STAGER_AUTH_DIR", None)
        shutil.rmtree(tmp, ignore_errors=True)

    raw = report["a_raw_zmq_bytes_per_s"]
    print(f"{total / MIB:.0f} MiB fp32, 16 tensors, FSDP-sharded over the nodes; reader on no node's host (tcp, CURVE)")
    print(f"  (a) raw ZeroMQ, one sender      {raw / 1e9:.3f} GB/s")
    for n in (1, 2, 3):
        runs = report[f"a_read_{n}"]
        rate = statistics.median(b / t for t, b in runs)
        print(
            f"      from {n} node(s)              {rate / 1e9:.3f} GB/s = {rate / raw:.2f}x raw "
            f"({rate / n / raw:.2f}x per source; runs {', '.join(f'{t:.2f}' for t, _ in runs)} s)"
        )
    ours, theirs = report["b_write_dcp_distributed_s"], report["b_dcp_save_s"]
    print(
        f"  (b) write-dcp, 1 writer/node     {', '.join(f'{t:.2f}' for t in ours)} s; DCP dcp.save 2 ranks "
        f"{', '.join(f'{t:.2f}' for t in theirs)} s -> {statistics.median(ours) / statistics.median(theirs):.2f}x"
    )
    for n in (2, 3):
        lat = report[f"c_seal_to_complete_s_{n}"]
        print(f"  (c) last seal -> complete, {n} nodes  {', '.join(f'{x * 1e3:.1f}' for x in lat)} ms")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
