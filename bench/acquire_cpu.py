"""CPU per acquire of a multi-node version: what a reader's ``latest()`` and ``release()`` cost, load aside.

    python bench/acquire_cpu.py [--nodes 3] [--size-mib 32] [--reps 300]

A SimulatedCluster of ``--nodes`` daemons (tcp, CURVE: every node is remote to the reader, as in
bench_multinode's (c)) holds two FSDP-sharded versions; one Subscriber then leases the newest and
releases it ``--reps`` times. Reported: the reader's CPU per iteration (``time.process_time``), each
daemon's (``/proc/PID/stat``), and the median wall time of ``latest()`` and of ``release()``. CPU
figures are what a loaded machine distorts least: seal-to-complete latency on a busy host grows
with every ms of CPU on its path. Runs against any revision whose ``stager`` is on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_multinode import stage_sharded  # noqa: E402
from common import curve_keys  # noqa: E402
from stager.dev.launch import SimulatedCluster, run_ranks  # noqa: E402


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="stager-acq-")
    keys = curve_keys(tmp)
    limit = ("--memory-limit", f"{4 * args.size_mib}MiB", "--keep", "2")
    try:
        with SimulatedCluster(args.nodes, args=limit, auth_dir=keys) as cluster:
            run_ranks(stage_sharded, args.nodes, args.size_mib, [1, 2], "", nodes=cluster.nodes, timeout=900)
            from stager.client import Subscriber

            pids = [d.pid for d in cluster.daemons]
            with Subscriber(cluster.endpoints[0], timeout=120) as sub:
                for _ in range(5):  # first contact (hellos, transport probes) is not what is measured
                    sub.latest().release()
                acquire, release = [], []
                daemons0, reader0 = [_cpu_s(p) for p in pids], time.process_time()
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    snap = sub.latest()
                    t1 = time.perf_counter()
                    snap.release()
                    acquire.append(t1 - t0)
                    release.append(time.perf_counter() - t1)
                reader = (time.process_time() - reader0) / args.reps
                daemons = [(_cpu_s(p) - c) / args.reps for p, c in zip(pids, daemons0)]
    finally:
        os.environ.pop("STAGER_AUTH_DIR", None)
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"{args.nodes} nodes, {args.reps} x latest()+release(): reader CPU {reader * 1e3:.2f} ms/iter; daemons' CPU "
        f"{', '.join(f'{d * 1e3:.2f}' for d in daemons)} ms/iter; wall median latest() "
        f"{statistics.median(acquire) * 1e3:.2f} ms, release() {statistics.median(release) * 1e3:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
