#!/usr/bin/env python
"""Soak: a sharded gloo job staging continuously for minutes, with subscribers and both followers.

    python stress/soak.py [--minutes 10] [--ranks 8] [--subscribers 4] [--interval 0.25] [--quick]

What runs, all on this host:

- a ``stager serve`` daemon (private ipc endpoint);
- a ``--ranks``-rank gloo job (spawned like :func:`stager.dev.launch.run_ranks`, CPU) whose state is
  a few MiB of DTensors sharded over the ranks: ``Shard(0)`` with uneven rows, ``Shard(1)``, a
  ``Replicate`` replica, several dtypes, plus train state. Every ``--interval`` seconds each rank
  fills its shards with the known contents of the step (``_stresslib.pattern_box``) and stages
  (README pattern: ``wait_copied()`` of the previous step before touching the tensors). Rank 0
  decides when the time is up (a broadcast per step), so every rank stages the same steps;
- ``--subscribers`` processes, each a ``Subscriber`` checking every version it sees byte for byte;
- ``stager export-hf --follow --keep 3`` and ``stager write-dcp --follow --keep 2``; their step
  directories are checked every few seconds (``verify`` plus every tensor against its step's known
  contents) and ``stager verify DIR`` is run on the newest of each now and then (exit 0);
- every ``--sample`` seconds: the daemon's RSS (psutil) and its /dev/shm usage (resident bytes).

Definitions (the campaign fails on any of these):

- *failed*: a step whose ``stage()`` handle failed on any rank (nothing disturbs this job).
- *sealed*: a step whose handle sealed on every rank.
- *lost*: a sealed step that no subscriber ever read while no subscriber ever read a newer step
  either. Skipping a step because a newer one was read first is retention (``--keep``) at work
  and fine; a version that was sealed and then was never readable even though nothing newer
  replaced it is lost. Subscribers get a drain period at the end, so in practice: every sealed
  step above the newest step any subscriber read is lost. Also a failure: a subscriber that never
  reaches the final sealed step, and a subscriber that reads a step the ranks never sealed.
- *corrupt*: a subscriber's version, an export or a checkpoint whose bytes differ from the known
  contents of its step, or an export or checkpoint that ``verify`` rejects.
- *RSS growth*: after warm-up (the first 10% of samples are dropped), the median daemon RSS of the
  last third of the samples is more than 10% + 20 MiB above the median of the first third.
- also: a process of the campaign dying, the daemon exiting non-zero on SIGTERM or logging a
  traceback, segments left in /dev/shm, /dev/shm usage above the daemon's memory limit.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _stresslib as lib  # noqa: E402

STEP_DIR = re.compile(r"step-(\d{8,})")

# name -> (global shape, dtype, placement): a few MiB, sharded every way the daemon must assemble
SOAK_SPEC = {
    "model.embed.weight": ((1000, 256), "float32", "shard0"),
    "model.layers.0.w": ((771, 512), "bfloat16", "shard0"),  # uneven rows over 8 ranks
    "model.layers.0.proj": ((256, 1030), "float32", "shard1"),
    "model.norm.weight": ((512,), "float32", "replicate"),
    "model.layers.1.w": ((333, 64), "float16", "shard0"),
    "model.counts": ((1025,), "int64", "shard0"),
}
PLAIN_SPEC = {name: (shape, dtype) for name, (shape, dtype, _) in SOAK_SPEC.items()}
MODEL_INFO = {"adapter": "identity", "hf_config": {"model_type": "stager-soak", "hidden_size": 256}}


# ---------------------------------------------------------------------------------------------- the job


def soak_rank(rank: int, world_size: int, endpoint: str, seconds: float, interval: float) -> dict:
    """One rank: DTensors of known contents per step, staged every ``interval`` for ``seconds``
    (counted by rank 0 from the first step)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from stager.client import StagingClient
    from stager.protocol import StagerError

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size,))
    placements = {"shard0": Shard(0), "shard1": Shard(1), "replicate": Replicate()}
    tensors = {}
    for name, (shape, dtype, kind) in SOAK_SPEC.items():
        place = [placements[kind]]
        local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, place)
        buf = torch.empty(local_shape, dtype=lib.torch_dtype(dtype))
        stride = torch.empty(shape).stride()
        tensors[name] = (
            shape,
            dtype,
            tuple(offset),
            tuple(local_shape),
            buf,
            DTensor.from_local(buf, mesh, place, shape=torch.Size(shape), stride=stride, run_check=False),
        )
    client = StagingClient(endpoint, timeout=30.0, seal_timeout=120.0)
    handles, sealed, failed = [], [], []
    flag = torch.zeros(1, dtype=torch.int64)
    step, last = 0, None

    def settle(block: bool) -> None:
        while handles and (block or handles[0].done()):
            h = handles.pop(0)
            try:
                h.wait(120)
                sealed.append(h.step)
            except StagerError as exc:
                failed.append((h.step, str(exc)[:300]))

    try:
        next_at = time.time()
        end_time = next_at + seconds
        while True:
            flag.fill_(1 if time.time() < end_time else 0)
            dist.broadcast(flag, 0)  # rank 0's clock decides: every rank stages the same steps
            if not int(flag):
                break
            step += 1
            if last is not None:
                last.wait_copied(120)  # the previous copy left the tensors: they may change now
            for name, (shape, dtype, offset, size, buf, _) in tensors.items():
                buf.copy_(lib.pattern_box(name, shape, dtype, step, offset, size))
            sd = {name: t[5] for name, t in tensors.items()}
            sd["train"] = {"step": step}
            last = client.stage(sd, step=step, model_info=MODEL_INFO)
            handles.append(last)
            settle(False)
            next_at += interval
            time.sleep(max(0.0, next_at - time.time()))
        settle(True)
    finally:
        client.close(30)
    return {"rank": rank, "steps": step, "sealed": sealed, "failed": failed}


def subscriber_main(index: int, endpoint: str, stop, final, results) -> None:
    """Checks every version it sees; after ``stop`` keeps reading until it saw step ``final``."""
    import torch

    torch.set_num_threads(1)
    from stager.client import Subscriber
    from stager.protocol import ErrorCode, StagerError

    seen, problems = [], []
    drain_until = None
    try:
        with Subscriber(endpoint, timeout=30.0) as sub:
            last = None
            while True:
                if stop.is_set():
                    drain_until = drain_until or time.monotonic() + 60
                    if (final.value and last is not None and last >= final.value) or time.monotonic() > drain_until:
                        break
                try:
                    snap = sub.wait_for_newer(last, timeout=1.0)
                except StagerError as exc:
                    if exc.code == ErrorCode.TIMEOUT:
                        continue
                    raise
                with snap:
                    bad = lib.check_tensors(snap.items(), snap.step, PLAIN_SPEC)
                    if snap.objects.get("train.step") != snap.step:
                        bad.append(f"step {snap.step}: train state says {snap.objects.get('train.step')}")
                    problems += [f"subscriber {index}: {b}" for b in bad]
                    seen.append(snap.step)
                    last = snap.step
    except Exception as exc:
        problems.append(f"subscriber {index}: {type(exc).__name__}: {exc}")
    results.put({"index": index, "seen": seen, "problems": problems[:20]})


# ---------------------------------------------------------------------------------------------- outputs


class Outputs:
    """Checks a follower's output directory: each complete step directory once."""

    def __init__(self, camp: lib.Campaign, kind: str, out: str):
        self.camp, self.kind, self.out = camp, kind, out
        self.verified: set[str] = set()
        self.corrupt: set[str] = set()
        self.pruned = 0
        self.cli_runs = 0

    def steps(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.out) if STEP_DIR.fullmatch(n))
        except FileNotFoundError:
            return []

    @staticmethod
    def inspect(path: str) -> tuple[dict, list[str]]:
        """``verify``'s report on a step directory and its tensors' problems against their step."""
        from stager.formats.integrity import read_tensors, verify

        try:
            report = verify(path)
            step = int(STEP_DIR.fullmatch(os.path.basename(path)).group(1))
            return report, [] if not report["ok"] else lib.check_tensors(read_tensors(path), step, PLAIN_SPEC)
        except Exception as exc:  # a directory removed while it is read, most likely
            return {"ok": False, "error": repr(exc)}, []

    def check(self) -> None:
        for name in self.steps():
            if name in self.verified or name in self.corrupt:
                continue
            path = os.path.join(self.out, name)
            report, problems = self.inspect(path)
            if not report["ok"] or problems:
                # the follower's --keep may be removing it right now (prune deletes in place): not
                # corrupt if it is gone a moment later; still there and still failing: corrupt
                if lib_wait(lambda: not os.path.isdir(path), 3.0, 0.05):
                    self.pruned += 1
                    continue
                report, problems = self.inspect(path)
            if not os.path.isdir(path):
                self.pruned += 1
                continue
            if not report["ok"] or problems:
                self.camp.fail(f"{self.kind} {name}: verify {report}, contents {problems[:2]}")
                self.corrupt.add(name)
            else:
                self.verified.add(name)

    def cli_verify_start(self) -> tuple | None:
        """``stager verify`` on the newest step directory, started (None when there is none yet)."""
        names = self.steps()
        if not names:
            return None
        path = os.path.join(self.out, names[-1])
        proc = subprocess.Popen(
            [sys.executable, "-m", "stager.cli", "verify", path],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=lib.python_env(),
            cwd=lib.REPO,
        )
        return proc, path

    def cli_verify_end(self, started: tuple | None) -> None:
        if started is None:
            return
        proc, path = started
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        self.cli_runs += 1
        if proc.returncode != 0 and os.path.isdir(path):
            self.camp.fail(
                f"stager verify {self.kind}/{os.path.basename(path)} exited {proc.returncode}: {out.strip()[-400:]}"
            )


def cli_verify(checks: dict) -> None:
    """``stager verify`` on the newest output of each follower, the commands running side by side."""
    started = [(c, c.cli_verify_start()) for c in checks.values()]
    for c, st in started:
        c.cli_verify_end(st)


# ---------------------------------------------------------------------------------------------- controller


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--subscribers", type=int, default=4)
    p.add_argument("--interval", type=float, default=0.25, help="seconds between steps of the job")
    p.add_argument("--sample", type=float, default=2.0, help="seconds between RSS / shm samples")
    p.add_argument("--memory-limit", default="1GiB")
    p.add_argument("--quick", action="store_true", help="20 s, 2 ranks, 1 subscriber: for CI")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.ranks, args.subscribers, args.sample = 20 / 60, 2, 1, 1.0
    with lib.Campaign("soak") as camp:
        try:
            stats = run(camp, args)
        except Exception as exc:
            import traceback

            camp.fail(f"harness error: {exc!r}\n{traceback.format_exc()[-1500:]}")
            stats = None
    if stats is None:
        return camp.finish("soak: aborted")
    return camp.finish(
        f"soak: {args.minutes * 60:.0f} s, {args.ranks} ranks, {stats['sealed']} versions staged "
        f"({stats['failed']} failed, "
        f"{stats['lost']} lost, {stats['corrupt']} corrupt), {stats['read']} reads by {args.subscribers} subscribers, "
        f"{stats['exports']} exports and {stats['checkpoints']} checkpoints verified, daemon RSS "
        f"{lib.mib(stats['rss_start'])} -> {lib.mib(stats['rss_end'])}, shm max {lib.mib(stats['shm_max'])}"
    )


def run(camp: lib.Campaign, args) -> dict:
    from stager.daemon.config import parse_size
    from stager.dev.launch import run_ranks

    endpoint = f"ipc://{camp.tmp}/d.sock"
    daemon = camp.daemon(endpoint, ("--memory-limit", args.memory_limit, "--keep", "3", "--step-timeout", "120"))
    limit = parse_size(args.memory_limit)
    ctx = mp.get_context("spawn")
    stop, final, results = ctx.Event(), ctx.Value("q", 0), ctx.Queue()
    subs = [
        ctx.Process(target=subscriber_main, args=(i, endpoint, stop, final, results), daemon=True)
        for i in range(args.subscribers)
    ]
    for s in subs:
        s.start()
        camp.on_exit(lambda s=s: lib.kill_process(s))
    outs = {kind: os.path.join(camp.tmp, kind) for kind in ("export-hf", "write-dcp")}
    followers = {}
    for kind, extra in (("export-hf", ["--keep", "3", "--no-progress"]), ("write-dcp", ["--keep", "2"])):
        with open(os.path.join(camp.tmp, f"{kind}.log"), "ab") as log:
            followers[kind] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "stager.cli",
                    kind,
                    "--follow",
                    "--out",
                    outs[kind],
                    "--endpoint",
                    endpoint,
                    *extra,
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=lib.python_env(),
                cwd=lib.REPO,
            )
        camp.on_exit(lambda f=followers[kind]: lib.kill_process(f))
    checks = {kind: Outputs(camp, kind, out) for kind, out in outs.items()}

    seconds = args.minutes * 60
    job: dict = {}

    def job_thread() -> None:
        try:
            job["results"] = run_ranks(soak_rank, args.ranks, endpoint, seconds, args.interval, timeout=seconds + 600)
        except BaseException as exc:
            job["error"] = exc

    runner = threading.Thread(target=job_thread, daemon=True)
    runner.start()
    samples: list[tuple[float, int, int]] = []
    started = time.monotonic()
    next_check = time.monotonic()
    next_cli = next_check + min(60.0, seconds / 2)
    while runner.is_alive():
        runner.join(args.sample)
        samples.append((time.monotonic(), lib.rss(daemon.pid), lib.shm_bytes(daemon.pid)))
        if daemon.proc.poll() is not None:
            camp.fail(f"the daemon exited with code {daemon.proc.returncode} during the soak")
            break
        for kind, f in followers.items():
            if f.poll() is not None and kind not in job.get("dead", ()):
                job.setdefault("dead", []).append(kind)
                camp.fail(
                    f"{kind} --follow exited with code {f.returncode}: "
                    f"{lib.tail(os.path.join(camp.tmp, f'{kind}.log'), 5)}"
                )
        for s in subs:
            if not s.is_alive() and s.exitcode not in (None, 0):
                camp.fail(f"subscriber process {s.pid} died with code {s.exitcode}")
        if time.monotonic() >= next_check:
            for c in checks.values():
                c.check()
            next_check = time.monotonic() + max(5.0, seconds / 40)
        if time.monotonic() >= next_cli:
            cli_verify(checks)
            next_cli = time.monotonic() + max(60.0, seconds / 5)
        if time.monotonic() > started + seconds + 600:
            camp.fail("the job ran 10 minutes past its end")
            break
    runner.join(60)
    stats = {
        "sealed": 0,
        "failed": 0,
        "lost": 0,
        "corrupt": 0,
        "read": 0,
        "exports": 0,
        "checkpoints": 0,
        "rss_start": 0,
        "rss_end": 0,
        "shm_max": max((s[2] for s in samples), default=0),
    }
    if "error" in job or "results" not in job:
        camp.fail(f"the job failed: {job.get('error')!r}"[:2000])
        ranks = []
    else:
        ranks = job["results"]
    sealed_sets = [set(r["sealed"]) for r in ranks]
    sealed = sorted(set.intersection(*sealed_sets)) if sealed_sets else []
    for r in ranks:
        for step, error in r["failed"]:
            stats["failed"] += 1
            camp.fail(f"rank {r['rank']}: step {step} failed: {error}")
    if sealed_sets and set.union(*sealed_sets) != set(sealed):
        camp.fail(f"steps sealed on some ranks only: {sorted(set.union(*sealed_sets) - set(sealed))[:5]}")
    stats["sealed"] = len(sealed)

    # the readers drain to the final step, then report
    final.value = sealed[-1] if sealed else 0
    stop.set()
    reports = []
    for _ in subs:
        try:
            reports.append(results.get(timeout=120))
        except Exception:
            camp.fail("a subscriber did not report within 120 s")
    for s in subs:
        s.join(10)
    newest_read = max((max(r["seen"]) for r in reports if r["seen"]), default=None)
    sealed_set = set(sealed)
    for r in reports:
        stats["read"] += len(r["seen"])
        for problem in r["problems"]:
            stats["corrupt"] += "differ" in problem or "want" in problem or "missing" in problem
            camp.fail(problem)
        phantom = sorted(set(r["seen"]) - sealed_set)
        if phantom and sealed:
            camp.fail(f"subscriber {r['index']} read steps the ranks never sealed: {phantom[:5]}")
        if sealed and (not r["seen"] or max(r["seen"]) < sealed[-1]):
            camp.fail(
                f"subscriber {r['index']} stopped at step {max(r['seen'], default=None)}, "
                f"the final sealed step is {sealed[-1]}"
            )
    lost = [s for s in sealed if newest_read is None or s > newest_read]
    stats["lost"] = len(lost)
    if lost:
        camp.fail(f"{len(lost)} sealed steps never readable and never superseded: {lost[:5]}")

    # followers: the newest version gets written; then ^C (they are idle: the job is over)
    if sealed:
        for kind, out in outs.items():
            want = f"step-{sealed[-1]:08d}"
            ok = lib_wait(lambda: os.path.isdir(os.path.join(out, want)), 120)
            if not ok and followers[kind].poll() is None:
                camp.fail(f"{kind} did not write the final step {sealed[-1]} within 120 s")
    for kind, f in followers.items():
        rc = lib.stop_gently(f)
        if rc not in (0, 130) and kind not in job.get("dead", ()):
            camp.fail(f"{kind} exited with code {rc} on SIGINT: {lib.tail(os.path.join(camp.tmp, f'{kind}.log'), 5)}")
    cli_verify(checks)
    for kind, c in checks.items():
        c.check()
        leftovers = [n for n in os.listdir(c.out) if n.startswith(".")] if os.path.isdir(c.out) else []
        if leftovers:
            camp.fail(f"{kind} left temporaries behind: {leftovers[:3]}")
    stats["corrupt"] += sum(len(c.corrupt) for c in checks.values())
    stats["exports"] = len(checks["export-hf"].verified)
    stats["checkpoints"] = len(checks["write-dcp"].verified)
    if sealed and (not stats["exports"] or not stats["checkpoints"]):
        camp.fail(f"nothing written: {stats['exports']} exports, {stats['checkpoints']} checkpoints")

    # memory: RSS flat after warm-up (samples from the first staged version on); shm within the limit
    staging = [s for s in samples if s[2] > 0]
    usable = staging[len(staging) // 10 :]
    if len(usable) >= 3:
        third = max(1, len(usable) // 3)
        start = statistics.median(s[1] for s in usable[:third])
        end = statistics.median(s[1] for s in usable[-third:])
        stats["rss_start"], stats["rss_end"] = start, end
        if end > start * 1.10 + (20 << 20):
            camp.fail(
                f"daemon RSS grew from {lib.mib(start)} to {lib.mib(end)} (median of the first and last "
                "thirds after warm-up)"
            )
    else:
        camp.fail(f"only {len(samples)} RSS samples")
    if stats["shm_max"] > limit:
        camp.fail(f"/dev/shm usage {lib.mib(stats['shm_max'])} passed the memory limit {lib.mib(limit)}")
    camp.stop_daemon_and_check(daemon)
    return stats


def lib_wait(predicate, timeout: float, interval: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(interval)
    return True


if __name__ == "__main__":
    sys.exit(main())
