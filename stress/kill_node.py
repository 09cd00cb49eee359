#!/usr/bin/env python
"""kill -9 of a node's daemon in a multi-node job, --rounds times, while a reader reads whole versions.

    python stress/kill_node.py [--rounds 20] [--seed 0] [--quick] [--assemble-full]

Two simulated nodes on this host (one daemon each, own host id and shared memory), a 4-rank gloo job
(2 ranks per node, not strict) staging back to back: ``rep`` is replicated across the nodes (HSDP:
each node holds it whole) and ``fsdp`` is sharded over all 4 ranks (each node holds half); every
tensor's contents are a function of the step. A reader on neither node reads the newest complete
version over and over and checks every byte. Each round SIGKILLs node-1's daemon at a random
moment (mostly mid-read) and restarts it on the same endpoint. Checks: no read ever returns wrong
bytes; a read that fails does so with a typed error (``node_down``, ``no_version``, ...) within the
reader's timeout, never hangs; after every restart the ranks rejoin the job and a new step becomes
complete on both nodes. One summary line; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter

import torch

ROWS = 512  # rows of each tensor (x 256 fp32: 512 KiB), split evenly over the ranks
READER_TIMEOUT = 5.0


def expected(step: int) -> dict[str, torch.Tensor]:
    base = torch.arange(ROWS * 256, dtype=torch.float32).view(ROWS, 256)
    return {"rep": base + step, "fsdp": base * 2 + step}


def stage_until(rank, world, stop_file):
    """A rank of the job: stage every step until ``stop_file`` exists; failures are tolerated
    (the daemon is killed under it), as in a training loop."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from stager.client import StagingClient
    from stager.protocol import StagerError

    logging.getLogger("stager").setLevel(logging.ERROR)  # each failed stage is expected here: not logged
    mesh2 = init_device_mesh("cpu", (2, world // 2))
    mesh1 = init_device_mesh("cpu", (world,))
    client = StagingClient(timeout=5)
    step, sealed = 0, 0
    while True:
        stop = torch.tensor([os.path.exists(stop_file)], dtype=torch.int32)
        dist.all_reduce(stop)  # every rank stops at the same step
        if stop.item():
            break
        step += 1
        full = expected(step)
        sd = {
            "rep": distribute_tensor(full["rep"], mesh2, [Replicate(), Shard(0)]),
            "fsdp": distribute_tensor(full["fsdp"], mesh1, [Shard(0)]),
        }
        try:
            client.stage(sd, step=step).wait(30)
            sealed += 1
        except StagerError:
            pass
        time.sleep(0.02)  # the train step between stages (workload pacing, not a check)
    client.close()
    return sealed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="3 rounds (CI)")
    p.add_argument(
        "--assemble-full",
        action="store_true",
        help="both daemons pull every complete version whole (serve --assemble-full) while node-1 is killed",
    )
    args = p.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    rng = random.Random(args.seed)
    # SIGTERM (CI's timeout): unwind, so the daemons are stopped and their segments unlinked
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    from stager.client import Subscriber
    from stager.client.admin import job_status
    from stager.dev.launch import DaemonProcess, SimulatedCluster, run_ranks
    from stager.protocol import StagerError

    failures: list[str] = []
    counts: Counter = Counter()
    slowest_error = 0.0
    verified = recovered = 0
    tmp = tempfile.mkdtemp(prefix="stager-kill-node-")
    stop_file = os.path.join(tmp, "stop")
    stop_reading = threading.Event()
    started = time.monotonic()
    try:
        serve = ("--memory-limit", "64MiB", "--keep", "3") + (("--assemble-full",) if args.assemble_full else ())
        with SimulatedCluster(2, args=serve) as cluster:
            job: dict = {}

            def train():
                try:
                    job["sealed"] = run_ranks(stage_until, 4, stop_file, nodes=cluster.nodes, timeout=1800)
                except BaseException as exc:
                    job["error"] = exc

            def read():
                nonlocal verified, slowest_error
                with Subscriber(cluster.endpoints[0], timeout=READER_TIMEOUT) as sub:
                    while not stop_reading.is_set():
                        t0 = time.monotonic()
                        try:
                            with sub.latest() as snap:
                                want = expected(snap.step)
                                for name, t in snap.items():
                                    if not torch.equal(t, want[name]):
                                        failures.append(f"step {snap.step}: {name} differs from what was staged")
                                verified += 1
                        except StagerError as exc:
                            counts[exc.code.value if hasattr(exc.code, "value") else str(exc.code)] += 1
                            slowest_error = max(slowest_error, time.monotonic() - t0)
                            stop_reading.wait(0.05)  # a reader backing off before it tries again (pacing)
                        except Exception:
                            failures.append(f"reader: untyped error {traceback.format_exc(limit=3)}")
                            return

            def newest_complete() -> int:
                try:
                    status = job_status(cluster.endpoints[0], 5)
                except StagerError:
                    return -1
                return max(status["complete"], default=-1) if status else -1

            def wait_complete_after(step: int, timeout: float) -> bool:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if newest_complete() > step or "error" in job:
                        return newest_complete() > step
                    time.sleep(0.05)
                return False

            trainer = threading.Thread(target=train)
            trainer.start()
            if not wait_complete_after(0, 120):
                failures.append(f"the job never completed a step: {job.get('error')}")
            reader = threading.Thread(target=read)
            reader.start()
            for r in range(rounds):
                if failures:
                    break
                time.sleep(rng.uniform(0.0, 0.5))  # a random moment: the reader is mostly mid-read
                before = newest_complete()
                old = cluster.daemons[1]
                old.stop(signal.SIGKILL)
                cluster.daemons[1] = DaemonProcess(old.endpoint, args=old.args, env=old.env).start()
                if wait_complete_after(max(before, 0), 60):
                    recovered += 1
                else:
                    failures.append(f"round {r}: no step completed on both nodes within 60 s of the restart")
            stop_reading.set()
            reader.join(60)
            if reader.is_alive():
                failures.append("the reader hung")
            open(stop_file, "w").close()
            trainer.join(120)
            if "error" in job:
                failures.append(f"the job failed: {str(job['error'])[-300:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if slowest_error > READER_TIMEOUT * 3 + 5:
        failures.append(f"a failing read took {slowest_error:.1f}s (reader timeout {READER_TIMEOUT}s)")
    for line in failures[:5]:
        print(line, file=sys.stderr)
    errors = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    mode = " (assemble-full)" if args.assemble_full else ""
    print(
        f"kill-node{mode}: {rounds} kills of node-1's daemon, {recovered} recovered, {verified} versions read and "
        f"verified, typed read errors: {errors}, slowest failing read {slowest_error:.2f}s, "
        f"{time.monotonic() - started:.0f}s: {'FAIL' if failures else 'PASS'}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
