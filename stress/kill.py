#!/usr/bin/env python
"""kill -9 campaigns: a staging rank, the daemon, and each follower (export-hf, write-dcp), --rounds times.

    python stress/kill.py [--target rank|daemon|export-hf|write-dcp|all|a,b] [--rounds 20] [--seed 0] [--quick]

``rank``: a 2-rank gloo job (``stress/_workers.py stage``: each rank its own tensors plus one
replica, known contents; one of them, chosen at random per job, lags each step by up to 20 ms)
stages back to back; the lagging rank is SIGKILLed just after a step went in flight, so mostly
mid-step (the summary counts the kills that failed a step in flight), and the rest of the job is
torn down as a launcher would. Then: the daemon dropped both ranks and
holds no step in flight; the newest sealed version (the one before the kill) is readable and holds
exactly its step's bytes; no sealed version went missing; the segments on /dev/shm are exactly the
memory the daemon accounts for. A new job then resumes from that version (its first step is the
next one, as a job restarted from its newest checkpoint would stage) and that stage must seal.

``daemon``: the same job, not strict, keeps training while the daemon is SIGKILLed and restarted
on the same endpoint. Then: the new daemon reclaimed every segment of the dead one, the ranks
never blocked (no stage call took longer than a few seconds), staging resumed (a new version
sealed), and that version is intact. When the campaign stops the daemon, no segment of any of its
daemons is left in /dev/shm.

``export-hf`` / ``write-dcp``: a job stages a few-MiB model continuously while ``stager export-hf
--follow`` / ``write-dcp --follow`` writes it; the follower is SIGKILLed while its temporary
directory exists (mid-write) or, failing that, at a random moment, and restarted. After every kill
the output directory holds only: ``step-NNNNNNNN`` directories that ``verify`` accepts and that
hold exactly their step's tensors, ``latest`` pointing at one of them, and temporaries of killed
followers (``.step-*.partial-<pid>``, ``.latest-<pid>``). A last follower then writes a complete
export and, once the job stopped and it is idle, exits cleanly (0 or 130) on SIGINT leaving no
temporary; ``stager verify`` exits 0 on the newest;
the daemon holds no lease once the followers are gone.

One summary line per target, then one overall; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _stresslib as lib  # noqa: E402

WORKER = os.path.join(lib.HERE, "_workers.py")
TARGETS = ("rank", "daemon", "export-hf", "write-dcp")
STEP_DIR = re.compile(r"step-(\d{8,})")
PARTIAL = re.compile(r"\.step-\d{8,}\.partial-(\d+)")
LATEST_TMP = re.compile(r"\.latest-(\d+)")


class Rank:
    """A ``_workers.py stage`` subprocess; a thread collects its JSON lines."""

    def __init__(
        self,
        camp: lib.Campaign,
        endpoint: str,
        rank: int,
        lws: int,
        start: int,
        spec: str,
        pause: float = 0.0,
        timeout: float = 10.0,
        port: int | None = None,
        jitter: float = 0.0,
    ):
        self.rank = rank
        extra = (["--master-port", str(port)] if port else []) + ["--jitter", str(jitter)]
        with open(os.path.join(camp.tmp, f"rank{rank}.log"), "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    WORKER,
                    "stage",
                    "--endpoint",
                    endpoint,
                    "--rank",
                    str(rank),
                    "--lws",
                    str(lws),
                    "--start",
                    str(start),
                    "--spec",
                    spec,
                    "--pause",
                    str(pause),
                    "--timeout",
                    str(timeout),
                    *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=lib.python_env(),
                cwd=lib.REPO,
            )
        self.records: list[dict] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        camp.on_exit(lambda: lib.kill_process(self.proc))

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.records.append(json.loads(line))
            except ValueError:
                pass

    def sealed(self) -> list[int]:
        return [r["step"] for r in list(self.records) if r["sealed"]]

    def record(self, step: int) -> dict | None:
        return next((r for r in list(self.records) if r["step"] == step), None)

    def kill(self) -> None:
        lib.kill_process(self.proc)


def free_port() -> int:
    from stager.dev.launch import free_port as port

    return port()


def wait_for(predicate, timeout: float, interval: float = 0.02):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(interval)


def status(endpoint: str) -> dict:
    from stager.client.admin import daemon_status

    return daemon_status(endpoint, 10.0)


def check_version(endpoint: str, step: int, spec: dict) -> list[str]:
    """Problems of sealed version ``step`` against its known contents (leased by step)."""
    from stager.client import Subscriber

    try:
        with Subscriber(endpoint, timeout=10.0) as sub, sub.at(step) as snap:
            problems = lib.check_tensors(snap.items(), step, spec)
            if snap.objects.get("meta.step") != step:
                problems.append(f"step {step}: train state says {snap.objects.get('meta.step')}")
            return problems
    except Exception as exc:
        return [f"step {step} is not readable: {type(exc).__name__}: {exc}"]


def segment_accounting(daemon, endpoint: str) -> str | None:
    """None when the daemon's files on /dev/shm are exactly the memory it accounts for."""
    from stager.protocol.shm import SHM_DIR

    st = status(endpoint)
    files = lib.daemon_segments(daemon.pid)
    on_disk = sum(os.path.getsize(os.path.join(SHM_DIR, f)) for f in files)
    if on_disk != st["memory"]["used"]:
        return f"{len(files)} segments of {on_disk} bytes on {SHM_DIR}, the daemon accounts for {st['memory']['used']}"
    return None


def stop_daemon(camp: lib.Campaign, daemon) -> None:
    pid = daemon.pid
    rc = daemon.stop()
    if rc != 0:
        camp.fail(f"the daemon exited with code {rc} on SIGTERM")
    leaked = camp.leaked_segments()
    if leaked:
        camp.fail(f"{len(leaked)} segments left in /dev/shm once the daemons stopped (last pid {pid}): {leaked[:3]}")
    for problem in camp.daemon_log_problems():
        camp.fail(problem)


# ---------------------------------------------------------------------------------------------- rank


def campaign_rank(camp: lib.Campaign, rounds: int, rng: random.Random) -> str:
    endpoint = f"ipc://{camp.tmp}/d.sock"
    daemon = camp.daemon(endpoint, ("--memory-limit", "128MiB", "--keep", "2", "--step-timeout", "20"))
    lws, spec = 2, lib.job_spec("per-rank", 2)
    counts = {"mid": 0, "intact": 0, "resumed": 0}
    old_failures: set = set()

    def start_job(first: int, lagging: int) -> list[Rank]:
        port = free_port()  # the lagging rank begins each step up to 20 ms after the other
        return [
            Rank(camp, endpoint, r, lws, first, "per-rank", port=port, jitter=0.02 if r == lagging else 0.0)
            for r in range(lws)
        ]

    start = 1
    victim = rng.randrange(lws)
    job = start_job(start, victim)
    if not wait_for(lambda: all(start in r.sealed() for r in job), 90):
        camp.fail(f"the first job's first stage did not seal: {[r.record(start) for r in job]}")
        return "rank: the first job never staged"
    for rnd in range(rounds):
        # a few more versions first (the ranks stage back to back)
        goal = max(max(r.sealed(), default=0) for r in job) + rng.randint(1, 4)
        if not wait_for(lambda: all(max(r.sealed(), default=0) >= goal for r in job), 60):
            camp.fail(f"round {rnd}: the job stopped sealing before the kill: {[r.records[-1:] for r in job]}")
        # mid-step: once a step is in flight, kill the rank that lags (it has not committed yet)
        wait_for(lambda: any(v["state"] == "staging" for v in status(endpoint)["versions"]), 5, interval=0.001)
        time.sleep(rng.uniform(0, 0.003))
        job[victim].kill()
        if not wait_for(lambda: str(victim) not in status(endpoint)["ranks"], 15):
            camp.fail(f"round {rnd}: the daemon did not drop the killed rank {victim}")
        for r in job:  # the launcher tears the rest of the job down
            r.kill()
        in_flight = wait_for(
            lambda: (
                not status(endpoint)["ranks"]
                and not [v for v in status(endpoint)["versions"] if v["state"] not in ("sealed", "failed")]
            ),
            15,
        )
        st = status(endpoint)
        if not in_flight:
            camp.fail(
                f"round {rnd}: ranks or steps left after the job died: ranks {st['ranks']}, "
                f"{[v for v in st['versions'] if v['state'] not in ('sealed', 'failed')]}"
            )
        sealed = [v["step"] for v in st["versions"] if v["state"] == "sealed"]
        newest = max(sealed, default=None)
        reported = max((s for r in job for s in r.sealed()), default=None)
        if newest is None or (reported is not None and reported > newest):
            camp.fail(f"round {rnd}: ranks saw step {reported} sealed but the daemon's newest is {newest}")
            newest = reported
        failures = {(v["step"], v.get("reason", "")) for v in st["versions"] if v["state"] == "failed"}
        if any(f"rank {victim}" in reason for _, reason in failures - old_failures):
            counts["mid"] += 1  # the kill failed a step in flight: the victim had not committed it
        old_failures |= failures
        problems = check_version(endpoint, newest, spec)
        if problems:
            camp.fail(f"round {rnd}: the version before the kill (step {newest}): {problems[:3]}")
        else:
            counts["intact"] += 1
        why = segment_accounting(daemon, endpoint)
        if why:
            camp.fail(f"round {rnd}: {why}")
        # the next job resumes from the newest readable version: its first step is newest + 1
        start = newest + 1
        victim = rng.randrange(lws)
        job = start_job(start, victim)
        first = wait_for(lambda: all(r.record(start) for r in job) and [r.record(start) for r in job], 90)
        if not first:
            camp.fail(f"round {rnd}: the restarted job did not stage step {start} within 90s")
        elif not all(rec["sealed"] for rec in first):
            camp.fail(
                f"round {rnd}: the restarted job's first stage (step {start}, failed in the killed job: "
                f"{start in [v['step'] for v in st['versions'] if v['state'] == 'failed']}) did not seal: "
                f"{next(rec['error'] for rec in first if not rec['sealed'])}"
            )
        else:
            counts["resumed"] += 1
        if not wait_for(lambda: all(max(r.sealed(), default=0) > start for r in job), 60):
            camp.fail(f"round {rnd}: the restarted job does not seal: {[r.records[-1:] for r in job]}")
    for r in job:
        r.kill()
    wait_for(lambda: not status(endpoint)["ranks"], 15)
    stop_daemon(camp, daemon)
    return (
        f"kill rank: {rounds} rounds, {counts['mid']} mid-step, version before the kill intact "
        f"{counts['intact']}/{rounds}, restarted job's first stage sealed {counts['resumed']}/{rounds}"
    )


# ---------------------------------------------------------------------------------------------- daemon


def campaign_daemon(camp: lib.Campaign, rounds: int, rng: random.Random, preallocate: str | None = None) -> str:
    endpoint = f"ipc://{camp.tmp}/d.sock"
    args = ("--memory-limit", "128MiB", "--keep", "2", "--step-timeout", "20")
    if preallocate:  # each daemon allocates this at start: a kill may land during it; the next reclaims it
        args += ("--preallocate", preallocate)
    daemon = camp.daemon(endpoint, args)
    lws, spec = 2, lib.job_spec("per-rank", 2)
    port = free_port()
    job = [Rank(camp, endpoint, r, lws, 1, "per-rank", pause=0.01, timeout=2.0, port=port) for r in range(lws)]
    counts = {"reclaimed": 0, "resumed": 0, "intact": 0}
    max_dt = 0.0
    if not wait_for(lambda: all(r.sealed() for r in job), 90):
        camp.fail(f"the job never sealed a step: {[r.records[-1:] for r in job]}")
        return "kill daemon: the job never staged"
    for rnd in range(rounds):
        mark = [len(r.records) for r in job]
        wait_for(lambda: all(len(r.records) >= m + rng.randint(1, 3) for r, m in zip(job, mark)), 30)
        time.sleep(rng.uniform(0, 0.05))
        old_pid = daemon.pid
        had = lib.daemon_segments(old_pid)
        daemon.stop(signal.SIGKILL)
        down = [len(r.records) for r in job]
        time.sleep(rng.uniform(0.3, 1.5))  # the job trains on without a daemon
        daemon = camp.daemon(endpoint, args)
        left = lib.daemon_segments(old_pid)
        if left:
            camp.fail(
                f"round {rnd}: the new daemon left {len(left)} of the killed one's {len(had)} segments: {left[:2]}"
            )
        else:
            counts["reclaimed"] += 1
        dead = [r.rank for r in job if r.proc.poll() is not None]
        if dead:
            camp.fail(f"round {rnd}: ranks {dead} exited while the daemon was down")
            break
        resumed = wait_for(lambda: all(any(x["sealed"] for x in r.records[d:]) for r, d in zip(job, down)), 60)
        if not resumed:
            camp.fail(f"round {rnd}: staging did not resume after the restart: {[r.records[-2:] for r in job]}")
            continue
        counts["resumed"] += 1
        newest = max(v["step"] for v in status(endpoint)["versions"] if v["state"] == "sealed")
        problems = check_version(endpoint, newest, spec)
        if problems and "not readable" in problems[0]:  # the next version may have replaced it: take that one
            newest = max(v["step"] for v in status(endpoint)["versions"] if v["state"] == "sealed")
            problems = check_version(endpoint, newest, spec)
        if problems:
            camp.fail(f"round {rnd}: version {newest} after the restart: {problems[:3]}")
        else:
            counts["intact"] += 1
    for r in job:
        max_dt = max([max_dt, *(x["dt"] for x in r.records)])
        r.kill()
    if max_dt > 8.0:
        camp.fail(f"a stage call blocked the training loop for {max_dt:.1f}s")
    wait_for(lambda: not status(endpoint)["ranks"], 15)
    stop_daemon(camp, daemon)
    name = f"kill daemon (preallocating {preallocate})" if preallocate else "kill daemon"
    return (
        f"{name}: {rounds} rounds, segments reclaimed {counts['reclaimed']}/{rounds}, staging resumed "
        f"{counts['resumed']}/{rounds}, newest version intact {counts['intact']}/{rounds}, longest stage "
        f"call {max_dt:.2f}s, {len(camp.daemon_pids)} daemons"
    )


# ---------------------------------------------------------------------------------------------- followers


def check_out_dir(camp: lib.Campaign, out: str, spec: dict, killed: set[int], verified: set, where: str) -> int:
    """Check every entry of a follower's output directory; returns the number of step directories."""
    from stager.formats.integrity import read_tensors, verify

    steps = 0
    if not os.path.isdir(out):
        return 0
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name == "latest":
            if not os.path.islink(path) or not STEP_DIR.fullmatch(os.readlink(path)) or not os.path.isdir(path):
                camp.fail(
                    f"{where}: latest -> {os.readlink(path) if os.path.islink(path) else '?'} is not a step directory"
                )
            continue
        match = STEP_DIR.fullmatch(name)
        if match:
            steps += 1
            key = (name, os.stat(path).st_mtime_ns)
            if key in verified:
                continue
            report = verify(path)
            if not report["ok"]:
                camp.fail(f"{where}: {name} looks complete but verify says {report}")
                continue
            problems = lib.check_tensors(read_tensors(path), int(match.group(1)), spec)
            if problems:
                camp.fail(f"{where}: {name} does not hold its step's tensors: {problems[:2]}")
                continue
            verified.add(key)
            continue
        tmp = PARTIAL.fullmatch(name) or LATEST_TMP.fullmatch(name)
        if tmp and int(tmp.group(1)) in killed:
            continue  # a killed follower's temporary: it never looks complete
        camp.fail(f"{where}: unexpected entry {name!r} in the output directory")
    return steps


def campaign_follower(camp: lib.Campaign, rounds: int, rng: random.Random, kind: str) -> str:
    endpoint = f"ipc://{camp.tmp}/d.sock"
    daemon = camp.daemon(endpoint, ("--memory-limit", "256MiB", "--keep", "3", "--step-timeout", "20"))
    spec = lib.job_spec("export", 1)
    job = Rank(camp, endpoint, 0, 1, 1, "export", pause=0.02)
    out = os.path.join(camp.tmp, kind)
    cmd = [
        sys.executable,
        "-m",
        "stager.cli",
        kind,
        "--follow",
        "--out",
        out,
        "--endpoint",
        endpoint,
        "--keep",
        "3" if kind == "export-hf" else "2",
    ] + (["--no-progress"] if kind == "export-hf" else [])
    log_path = os.path.join(camp.tmp, "follower.log")
    killed: set[int] = set()
    verified: set = set()
    counts = {"mid": 0, "exports": 0}

    def start() -> subprocess.Popen:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=lib.python_env(), cwd=lib.REPO)
        camp.on_exit(lambda: lib.kill_process(proc))
        return proc

    def own_temporary(pid: int) -> bool:
        try:
            return any(n.endswith(f".partial-{pid}") for n in os.listdir(out))
        except FileNotFoundError:
            return False

    if not wait_for(lambda: job.sealed(), 90):
        camp.fail(f"the job never sealed a step: {job.records[-1:]}")
        return f"kill {kind}: the job never staged"
    for rnd in range(rounds):
        follower = start()
        # kill it while it writes: its temporary directory exists (a few ms per export)
        mid = wait_for(lambda: own_temporary(follower.pid) or follower.poll() is not None, 60, interval=0.001)
        if follower.poll() is not None:
            camp.fail(f"round {rnd}: the follower exited with code {follower.returncode}: {lib.tail(log_path, 5)}")
            continue
        if mid:
            time.sleep(rng.uniform(0, 0.01))
            counts["mid"] += own_temporary(follower.pid)
        follower.send_signal(signal.SIGKILL)
        follower.wait(10)
        killed.add(follower.pid)
        counts["exports"] = check_out_dir(camp, out, spec, killed, verified, f"round {rnd}")
    # a last follower writes a complete export, and leaves nothing behind when interrupted
    seen = set(os.listdir(out)) if os.path.isdir(out) else set()
    follower = start()
    done = wait_for(lambda: any(STEP_DIR.fullmatch(n) and n not in seen for n in os.listdir(out)), 90)
    if not done:
        camp.fail(f"the last follower wrote no export within 90s: {lib.tail(log_path, 5)}")
    job.kill()  # no new versions: the follower finishes what it writes and waits (idle) ...
    wait_for(lambda: not own_temporary(follower.pid), 60)
    time.sleep(0.2)
    rc = lib.stop_gently(follower)  # ... when ^C reaches it
    if rc not in (0, 130):
        camp.fail(f"the last follower exited with code {rc} on SIGINT: {lib.tail(log_path, 5)}")
    if own_temporary(follower.pid):
        camp.fail("the last follower left its temporary directory behind on SIGINT")
    counts["exports"] = check_out_dir(camp, out, spec, killed, verified, "the end")
    newest = max((n for n in os.listdir(out) if STEP_DIR.fullmatch(n)), default=None)
    if newest:
        cli = subprocess.run(
            [sys.executable, "-m", "stager.cli", "verify", os.path.join(out, newest)],
            capture_output=True,
            text=True,
            env=lib.python_env(),
            cwd=lib.REPO,
            timeout=120,
        )
        if cli.returncode != 0:
            camp.fail(
                f"stager verify {newest} exited {cli.returncode}: {cli.stdout.strip()} {cli.stderr.strip()[-300:]}"
            )
    if not wait_for(lambda: status(endpoint)["leases"] == 0, 15):
        camp.fail(f"the daemon still holds {status(endpoint)['leases']} leases of killed followers")
    leftovers = sum(1 for n in os.listdir(out) if PARTIAL.fullmatch(n))
    wait_for(lambda: not status(endpoint)["ranks"], 15)
    stop_daemon(camp, daemon)
    return (
        f"kill {kind}: {rounds} rounds, {counts['mid']} mid-write, {len(verified)} complete exports verified, "
        f"{leftovers} temporaries of killed followers left"
    )


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="all", help=f"one of {', '.join(TARGETS)}, a comma-separated list, or all")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 rounds per target, for CI")
    p.add_argument("--preallocate", help="daemon target: start each daemon with serve --preallocate SIZE")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 2)
    targets = TARGETS if args.target == "all" else tuple(t.strip() for t in args.target.split(","))
    if not targets or set(targets) - set(TARGETS):
        p.error(f"--target: choose from {', '.join(TARGETS)} or all, not {args.target!r}")
    failed = []
    for target in targets:
        rng = random.Random(f"{args.seed}-{target}")
        with lib.Campaign(f"kill-{target}") as camp:
            try:
                if target == "rank":
                    line = campaign_rank(camp, args.rounds, rng)
                elif target == "daemon":
                    line = campaign_daemon(camp, args.rounds, rng, args.preallocate)
                else:
                    line = campaign_follower(camp, args.rounds, rng, target)
            except Exception as exc:
                import traceback

                camp.fail(f"harness error: {exc!r}\n{traceback.format_exc()[-1500:]}")
                line = f"kill {target}: aborted"
        if camp.finish(line):
            failed.append(target)
    print(
        f"kill: {len(targets)} targets x {args.rounds} rounds, {len(failed)} failed"
        f"{' (' + ', '.join(failed) + ')' if failed else ''}: {'FAIL' if failed else 'PASS'}",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
