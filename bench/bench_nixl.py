"""A remote reader's throughput: CURVE frames against NIXL (UCX tcp and UCX's default), in one run.

    python bench/bench_nixl.py [--size-mib 256] [--nodes 1] [--json PATH]

One to three simulated nodes (own host ids), each a daemon on tcp with CURVE and ``--transport nixl``,
hold a version FSDP-sharded over them; a reader process on no node's host reads the whole version
(native view) three times per transport: ``frames`` (every byte a CURVE-encrypted ZeroMQ frame),
``nixl`` with ``UCX_TLS=tcp`` (the path hosts without RDMA take) and ``nixl`` with UCX's default (on one
host: cma, a kernel copy between processes; on a fabric: RDMA). Anchor: raw ZeroMQ over CURVE, one
sender. Reported: GB/s (best of 3) and CPU seconds per GiB in the reader and in the daemons (their
``cpu_seconds`` before and after).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_live import _raw_zmq  # noqa: E402
from bench_multinode import full_state, stage_sharded  # noqa: E402
from common import curve_keys, machine, write_report  # noqa: E402
from stager.client.admin import daemon_status  # noqa: E402
from stager.dev.launch import SimulatedCluster, run_ranks  # noqa: E402

GIB = 1 << 30


def _reader(endpoint: str, transport: str, ucx_tls: str | None, queue) -> None:
    if ucx_tls:
        os.environ["UCX_TLS"] = ucx_tls
    import torch

    from stager.client import Subscriber
    from stager.client.readers import nixl_source

    torch.set_num_threads(1)
    runs = []
    with Subscriber(endpoint, timeout=120, transport=transport) as sub:
        for _ in range(3):
            with sub.latest() as snap:
                kinds = sorted({type(s).__name__ for s in snap._version.sources.values()})
                c0, t0, n = time.process_time(), time.perf_counter(), 0
                for _, t in snap.items():
                    n += t.numel() * t.element_size()
                runs.append((time.perf_counter() - t0, time.process_time() - c0, n))
    queue.put({"runs": runs, "sources": kinds, "retried": nixl_source.STATS["nixl_retried_as_frames"]})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    report: dict = machine()
    tmp = tempfile.mkdtemp(prefix="stager-bench-nixl-")
    keys = curve_keys(tmp)
    total = sum(t.numel() * 4 for t in full_state(args.size_mib, 1).values())
    report.update(bytes=total, nodes=args.nodes)
    # anchor: raw ZeroMQ PUSH/PULL over CURVE, one sender (what one frames source can reach at best)
    report["raw_zmq_curve_gb_per_s"] = round(_raw_zmq(total, keys) / 1e9, 3)
    flags = ("--memory-limit", f"{4 * args.size_mib}MiB", "--keep", "1", "--transport", "nixl")
    with SimulatedCluster(args.nodes, args=flags, auth_dir=keys) as cluster:
        run_ranks(stage_sharded, args.nodes, args.size_mib, [1], None, nodes=cluster.nodes, timeout=600)
        for name, transport, tls in (
            ("frames_curve", "frames", None),
            ("nixl_ucx_tcp", "nixl", "tcp"),
            ("nixl_ucx_default", "nixl", None),
        ):
            print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
            before = sum(daemon_status(e)["cpu_seconds"] for e in cluster.endpoints)
            queue = ctx.Queue()
            p = ctx.Process(target=_reader, args=(cluster.endpoints[0], transport, tls, queue))
            p.start()
            got = queue.get(timeout=900)
            p.join()
            daemons_cpu = sum(daemon_status(e)["cpu_seconds"] for e in cluster.endpoints) - before
            wall, cpu, n = min(got["runs"])
            report[name] = {
                "gb_per_s": round(n / wall / 1e9, 3),
                "runs_s": [round(r[0], 3) for r in got["runs"]],
                "reader_cpu_s_per_gib": round(cpu / (n / GIB), 3),
                "daemons_cpu_s_per_gib": round(daemons_cpu / (3 * n / GIB), 3),
                "sources": got["sources"],
                "retried_as_frames": got["retried"],
            }
            print(f"  {report[name]}", file=sys.stderr, flush=True)
    write_report(args.json, report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
