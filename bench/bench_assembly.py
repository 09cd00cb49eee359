"""Full assembly per node (``serve --assemble-full``) on one host: 2 simulated nodes, tcp with CURVE between them.

    python bench/bench_assembly.py [--size-mib 256] [--json PATH]
    python bench/bench_assembly.py --transports [--size-mib 64] [--json PATH]

For the same FSDP job (ranks on both nodes), with and without ``--assemble-full``, in one run:
(a) the trainer's stage time (``stage(...).wait()``) per step: assembly must not slow it;
(b) from the version being complete (the last node's seal) to it being whole on node-0;
(c) a reader on node-0 loading the whole version into its own tensors (``Snapshot.load_into``):
    half over tcp without assembly, all from node-0's shared memory with it;
    anchor: a bare memcpy of the same bytes in the same process.

``--transports``: the daemons' CPU time for the same job with assembly off, assembly over CURVE
frames, and assembly over NIXL (``--transport nixl``, ``UCX_TLS=tcp``: the path hosts without RDMA
take); per GiB pulled across nodes (each assembled version: the half the other node holds), the
staging alone (assembly off) subtracted. CPU time, not wall time: on a loaded machine it still
compares the transports.
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
from bench_multinode import full_state  # noqa: E402
from common import curve_keys, machine, write_report  # noqa: E402
from stager.client.admin import daemon_status  # noqa: E402
from stager.dev.launch import SimulatedCluster, run_ranks  # noqa: E402
from stager.protocol import StagerError  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
STEPS = [1, 2, 3, 4]


def stage_timed(rank, world, size_mib, stamp_dir):
    """Stage STEPS FSDP-sharded over every rank; return each stage's time, note each seal's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from stager.client import StagingClient

    mesh = init_device_mesh("cpu", (world,))
    client = StagingClient(strict=True, timeout=60)
    times = []
    for step in STEPS:
        sd = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full_state(size_mib, step).items()}
        dist.barrier()
        t0 = time.perf_counter()
        client.stage(sd, step=step).wait(300)
        times.append(time.perf_counter() - t0)
        with open(os.path.join(stamp_dir, f"sealed-{step}-{rank}"), "w") as f:
            f.write(repr(time.time()))
        dist.barrier()
    client.close()
    return times


def _node0_reader(endpoint: str, queue) -> None:
    """A reader on node-0: load the newest version into preallocated tensors, 3 times; a bare memcpy anchor."""
    os.environ["STAGER_HOST_ID"] = "node-0"
    from stager.client import Subscriber

    torch.set_num_threads(1)
    runs, anchor = [], []
    with Subscriber(endpoint, timeout=120) as sub:
        with sub.latest() as snap:
            params = {n: torch.empty(s, dtype=d) for n, d, s in snap.specs()}
            src = {n: torch.ones(s, dtype=d) for n, d, s in snap.specs()}
        for p in params.values():
            p.fill_(0)  # fault the destination in before timing
        for _ in range(3):
            with sub.latest() as snap:
                t0 = time.perf_counter()
                snap.load_into(params)
                runs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for n, p in params.items():
                p.copy_(src[n])
            anchor.append(time.perf_counter() - t0)
    queue.put((runs, anchor))


def _assembled_at(endpoint: str, steps, deadline: float) -> dict[int, float]:
    """Poll node-0's status: when each step became whole there (a benchmark's clock, not a test's proof). Ends
    at the last step: a step the assembler passed over because a newer one was complete first is never whole
    (the newest complete version wins), so waiting for every step would wait out the deadline."""
    seen: dict[int, float] = {}
    while time.monotonic() < deadline and max(steps) not in seen:
        try:
            status = daemon_status(endpoint)
        except StagerError:  # not reachable yet (a CURVE handshake under load): ask again
            time.sleep(0.05)
            continue
        for s in status.get("assembly", {}).get("assembled", []):
            seen.setdefault(s, time.time())
        time.sleep(0.005)
    return seen


def _cpu(endpoints) -> float:
    return sum(daemon_status(e)["cpu_seconds"] for e in endpoints)


def compare_transports(size_mib: int, keys: str, tmp: str, total: int) -> dict:
    """Daemon CPU seconds per GiB pulled across nodes: assembly over frames against over NIXL."""
    os.environ["UCX_TLS"] = "tcp"  # the daemons inherit it
    out: dict = {}
    try:
        for mode in ("off", "frames", "nixl"):
            print(f"[{time.strftime('%H:%M:%S')}] assembly {mode}", file=sys.stderr, flush=True)
            extra = () if mode == "off" else ("--assemble-full", "--transport", mode)
            stamps = os.path.join(tmp, f"stamps-t-{mode}")
            os.makedirs(stamps)
            serve = ("--memory-limit", f"{6 * size_mib}MiB", "--keep", "2", *extra)
            with SimulatedCluster(2, args=serve, auth_dir=keys) as cluster:
                before = _cpu(cluster.endpoints)
                run_ranks(stage_timed, 2, size_mib, stamps, nodes=cluster.nodes, timeout=900)
                deadline = time.monotonic() + 600
                while mode != "off" and time.monotonic() < deadline:  # until the last step is whole on both nodes
                    if all(STEPS[-1] in daemon_status(e)["assembly"]["assembled"] for e in cluster.endpoints):
                        break
                    time.sleep(0.05)
                statuses = [daemon_status(e) for e in cluster.endpoints]
                out[mode] = {
                    "daemons_cpu_s": _cpu(cluster.endpoints) - before,
                    "assembled": sum(s["counters"].get("assembled", 0) for s in statuses),
                    "frames_served_bytes": sum(s["counters"]["read_bytes"] for s in statuses),
                    "nixl_assembled_bytes": sum(s["transport"].get("assembled_over_nixl_bytes", 0) for s in statuses),
                }
    finally:
        os.environ.pop("UCX_TLS", None)
    for mode in ("frames", "nixl"):
        row = out[mode]
        pulled = row["assembled"] * total / 2  # each assembled version: the other node's half
        row["pulled_bytes"] = pulled
        row["cpu_s_per_gib_pulled"] = (row["daemons_cpu_s"] - out["off"]["daemons_cpu_s"]) / (pulled / GIB or 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--transports", action="store_true", help="assembly over frames against over NIXL")
    parser.add_argument("--json")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    if args.transports:
        tmp = tempfile.mkdtemp(prefix="stager-bench-asm-")
        report = machine()
        try:
            total = sum(t.numel() * 4 for t in full_state(args.size_mib, 1).values())
            report.update(bytes=total, transports=compare_transports(args.size_mib, curve_keys(tmp), tmp, total))
        finally:
            os.environ.pop("STAGER_AUTH_DIR", None)
            shutil.rmtree(tmp, ignore_errors=True)
        off = report["transports"]["off"]["daemons_cpu_s"]
        print(f"{total / MIB:.0f} MiB fp32 x {len(STEPS)} steps, 2 simulated nodes, tcp with CURVE, UCX_TLS=tcp")
        print(f"  daemons' CPU, assembly off: {off:.2f} s")
        for mode in ("frames", "nixl"):
            r = report["transports"][mode]
            print(
                f"  assembly over {mode:6s}: {r['daemons_cpu_s']:.2f} s, {r['assembled']} versions assembled, "
                f"{r['pulled_bytes'] / MIB:.0f} MiB pulled ({r['frames_served_bytes'] / MIB:.0f} MiB as frames, "
                f"{r['nixl_assembled_bytes'] / MIB:.0f} MiB over NIXL): {r['cpu_s_per_gib_pulled']:.2f} CPU-s/GiB"
            )
        write_report(args.json, report)
        return 0
    report: dict = machine()
    tmp = tempfile.mkdtemp(prefix="stager-bench-asm-")
    keys = curve_keys(tmp)
    total = sum(t.numel() * 4 for t in full_state(args.size_mib, 1).values())
    report["bytes"] = total
    try:
        for mode in ("off", "on"):
            print(f"[{time.strftime('%H:%M:%S')}] assembly {mode}", file=sys.stderr, flush=True)
            extra = ("--assemble-full",) if mode == "on" else ()
            stamps = os.path.join(tmp, f"stamps-{mode}")
            os.makedirs(stamps)
            limit = ("--memory-limit", f"{6 * args.size_mib}MiB", "--keep", "2", *extra)
            with SimulatedCluster(2, args=limit, auth_dir=keys) as cluster:
                q = ctx.Queue()
                import threading

                assembled: dict[int, float] = {}
                poller = None
                if mode == "on":
                    poller = threading.Thread(
                        target=lambda: assembled.update(
                            _assembled_at(cluster.endpoints[0], STEPS, time.monotonic() + 600)
                        )
                    )
                    poller.start()
                times = run_ranks(stage_timed, 2, args.size_mib, stamps, nodes=cluster.nodes, timeout=900)
                report[f"a_stage_s_{mode}"] = [max(r[i] for r in times) for i in range(len(STEPS))]
                if poller is not None:
                    poller.join()
                    lat = []
                    for step, at in sorted(assembled.items()):
                        sealed = [
                            float(open(os.path.join(stamps, f)).read())
                            for f in os.listdir(stamps)
                            if f.startswith(f"sealed-{step}-")
                        ]
                        lat.append(at - max(sealed))
                    report["b_complete_to_whole_s"] = lat
                    report["assembled_steps"] = sorted(assembled)
                r = ctx.Process(target=_node0_reader, args=(cluster.endpoints[0], q))
                r.start()
                report[f"c_load_into_s_{mode}"], report[f"c_memcpy_s_{mode}"] = q.get(timeout=900)
                r.join()
    finally:
        os.environ.pop("STAGER_AUTH_DIR", None)
        shutil.rmtree(tmp, ignore_errors=True)

    def fmt(xs):
        return ", ".join(f"{x:.3f}" for x in xs)

    print(f"{total / MIB:.0f} MiB fp32, 16 tensors, FSDP over 2 simulated nodes (1 rank each), tcp with CURVE")
    print(f"  (a) stage time per step, assembly off  {fmt(report['a_stage_s_off'])} s")
    print(f"                           assembly on   {fmt(report['a_stage_s_on'])} s")
    print(
        f"  (b) complete -> whole on node-0        {fmt(report['b_complete_to_whole_s'])} s "
        f"(steps {report['assembled_steps']})"
    )
    for mode in ("off", "on"):
        runs, anchor = report[f"c_load_into_s_{mode}"], report[f"c_memcpy_s_{mode}"]
        rate = total / statistics.median(runs)
        print(
            f"  (c) node-0 reader load_into, assembly {mode:3s} {fmt(runs)} s = {rate / 1e9:.2f} GB/s "
            f"= {statistics.median(anchor) / statistics.median(runs):.2f}x bare memcpy ({fmt(anchor)} s)"
        )
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
