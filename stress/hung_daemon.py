#!/usr/bin/env python
"""A hung daemon (SIGSTOP) under a training job: how long can it hold stage() + wait_copied()?

    python stress/hung_daemon.py [--rounds 20] [--stopped-steps 10] [--ack-timeout 1.0] [--quick]

A 2-rank gloo job started by torchrun (``python -m torch.distributed.run``, the ranks use
``StagingClient()`` with its defaults: torchrun's variables and ``$STAGER_ENDPOINT``) trains in
lockstep (one all_reduce a step) and stages every step, calling ``wait_copied()`` right after
``stage()`` (no overlap: the worst case). Each round SIGSTOPs the node's daemon until both ranks
went through ``--stopped-steps`` steps, then SIGCONTs it, and waits until both ranks sealed steps
again. Reported per rank: the worst stall of ``stage()`` + ``wait_copied()`` before the first stop
(steps 3 on: the first two include the client's warm-up and the first layout), while the daemon was
stopped, and after SIGCONT; how soon staging resumed.

Failures: a rank that dies or a job that stops stepping while the daemon is stopped, a stall while
stopped above ``ack_timeout`` + 1 s, a step that fails outside a stop with any error but
``no_sign_of_life`` (or ``step_failed`` because another rank skipped that step: it aborts it), any
``timeout``, a client whose ``stats["skipped"]`` differs from the steps it saw skipped, a step one rank
skipped that the other rank saw sealed, no seal within 30 s of SIGCONT, the newest version's bytes
not the staged ones, a traceback in the daemon's log or a segment left after it stopped.
One summary line; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _stresslib as lib  # noqa: E402

RANKS = 2
WARM_UP = 2  # steps of client warm-up (importing DTensor, the first layout): not "before" figures
ROWS = 1 << 14  # floats per rank (64 KiB), filled with the step number


def rank_loop(control: str) -> int:
    """One rank, as torchrun starts it: stage every step until ``control/done`` exists; one JSON
    line per step to ``control/rank<r>.jsonl`` once its handle is done (the loop never waits for a
    seal, as a training loop does not), the client's stats to ``rank<r>.stats.json``."""
    import torch
    import torch.distributed as dist

    from stager.client import StagingClient
    from stager.dev.lockstep import lockstep_stages
    from stager.protocol import StagerError

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    client = StagingClient(timeout=30.0, seal_timeout=60.0)  # endpoint and ranks from the environment
    sd = {f"w{rank}": torch.zeros(ROWS)}
    pending: list = []  # (record, handle) copied, seal not known yet

    def settle(out, wait: float = 0.0) -> None:
        for record, handle in list(pending):
            if wait:
                try:
                    handle.wait(wait)
                except StagerError:
                    pass
            if handle.done():
                pending.remove((record, handle))
                error = handle.error
                record.update(
                    t_done=time.monotonic(),
                    sealed=error is None,
                    code=error.code.value if error is not None else None,
                    error=str(error)[:300] if error is not None else None,
                )
                out.write(json.dumps(record) + "\n")
        out.flush()

    with open(os.path.join(control, f"rank{rank}.jsonl"), "a") as out:
        for s in lockstep_stages(client, sd, sd[f"w{rank}"], control):
            if s.error is not None:  # not even skipped within 120 s: recorded, and a failure
                s.handle.error = s.error
            pending.append(({"step": s.step, "t": s.t, "stall": s.stall, "copied": s.copied}, s.handle))
            settle(out)
            time.sleep(0.02)  # the rest of the training step (pacing)
        settle(out, wait=90.0)
    with open(os.path.join(control, f"rank{rank}.stats.json"), "w") as f:
        json.dump(client.stats, f)
    client.close()
    dist.destroy_process_group()
    return 0


def records(control: str, rank: int) -> list[dict]:
    try:
        with open(os.path.join(control, f"rank{rank}.jsonl")) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def wait_for(camp: lib.Campaign, job, what: str, predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if job.poll() is not None:
            camp.fail(f"the job exited with code {job.returncode} while waiting for {what}")
            return False
        time.sleep(0.05)
    camp.fail(f"{what}: not within {timeout:.0f}s")
    return False


def campaign(camp: lib.Campaign, rounds: int, stopped_steps: int, ack: float) -> str:
    from stager.client import Subscriber
    from stager.dev.launch import free_port

    endpoint = f"ipc://{camp.tmp}/d.sock"
    daemon = camp.daemon(endpoint, ("--memory-limit", "64MiB", "--step-timeout", "60"))
    control = os.path.join(camp.tmp, "job")
    os.mkdir(control)
    env = dict(lib.python_env(), STAGER_ENDPOINT=endpoint, STAGER_ACK_TIMEOUT=str(ack))
    with open(os.path.join(camp.tmp, "job.log"), "ab") as log:
        job = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                str(RANKS),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(free_port()),
                os.path.abspath(__file__),
                "rank",
                control,
            ],
            stdout=log,
            stderr=log,
            env=env,
            cwd=lib.REPO,
        )
    camp.on_exit(lambda: lib.kill_process(job, signal.SIGTERM, 30))

    @camp.on_exit
    def _resume_daemon() -> None:  # first on the way out: a stopped daemon would not stop on SIGTERM
        if daemon.proc.poll() is None:
            os.kill(daemon.pid, signal.SIGCONT)

    def both(n: int, predicate) -> bool:
        return all(sum(map(predicate, records(control, r))) >= n for r in range(RANKS))

    windows: list[tuple[float, float]] = []  # (SIGSTOP, SIGCONT) times
    resumed: list[float] = []
    since = 0.0
    for _ in range(rounds):
        if not wait_for(
            camp,
            job,
            "steps sealed before the stop",
            lambda: both(3, lambda x: x["sealed"] and x["t"] > since and x["step"] > WARM_UP),
            180,
        ):
            break
        os.kill(daemon.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        went_on = wait_for(
            camp,
            job,
            f"{stopped_steps} steps of each rank with the daemon stopped",
            lambda: both(stopped_steps, lambda x: x["t"] > stopped),
            stopped_steps * (ack + 5) + 60,
        )
        os.kill(daemon.pid, signal.SIGCONT)
        since = time.monotonic()
        windows.append((stopped, since))
        if not went_on or not wait_for(
            camp, job, "a seal after SIGCONT", lambda: both(1, lambda x: x["sealed"] and x["t"] > since), 30
        ):
            break
        resumed.append(
            max(min(x["t_done"] for x in records(control, r) if x["sealed"] and x["t"] > since) for r in range(RANKS))
            - since
        )
    open(os.path.join(control, "done"), "w").close()
    try:
        rc = job.wait(120)
        if rc != 0:
            camp.fail(f"the job exited with code {rc}; log: {lib.tail(os.path.join(camp.tmp, 'job.log'))}")
    except subprocess.TimeoutExpired:
        camp.fail("the job did not stop within 120 s of the done file")

    def phase(x: dict) -> str:
        if any(x["t"] < cont and x["t"] + x["stall"] > stop for stop, cont in windows):
            return "stopped"
        if not windows or x["t"] + x["stall"] <= windows[0][0]:
            return "before" if x["step"] > WARM_UP else "warm-up"
        return "after"

    worst: dict[str, list[float]] = {p: [] for p in ("warm-up", "before", "stopped", "after")}
    skipped_total, steps_total = [], []
    per_rank = [records(control, r) for r in range(RANKS)]
    skipped_by = {r: {x["step"] for x in mine if x["code"] == "no_sign_of_life"} for r, mine in enumerate(per_rank)}
    for r, mine in enumerate(per_rank):
        by_phase: dict[str, list[float]] = {p: [] for p in worst}
        for x in mine:
            by_phase[phase(x)].append(x["stall"])
        for p in worst:
            worst[p].append(max(by_phase[p], default=float("nan")))
        skipped = [x for x in mine if x["code"] == "no_sign_of_life"]
        skipped_total.append(len(skipped))
        steps_total.append(len(mine))
        for x in mine:
            # a step another rank skipped cannot seal: that rank's abort fails it at once (expected)
            others_skipped = any(x["step"] in skipped_by[o] for o in skipped_by if o != r)
            if x["code"] == "step_failed" and others_skipped and "aborted step" in (x["error"] or ""):
                continue
            # a step copied just before a stop: its seal may be given up on while the daemon is stopped
            cut = any(x["t"] < cont and x["t_done"] > stop for stop, cont in windows)
            if x["code"] not in (None, "no_sign_of_life") and not cut:
                camp.fail(f"rank {r} step {x['step']} ({phase(x)}): {x['error']}")
            if x["code"] == "timeout":
                camp.fail(f"rank {r} step {x['step']}: timeout (stall {x['stall']:.1f}s)")
        if by_phase["stopped"] and max(by_phase["stopped"]) > ack + 1.0:
            camp.fail(
                f"rank {r}: stage()+wait_copied() stalled {max(by_phase['stopped']):.2f}s with the daemon "
                f"stopped (ack timeout {ack}s)"
            )
        try:
            with open(os.path.join(control, f"rank{r}.stats.json")) as f:
                stats = json.load(f)
        except (OSError, ValueError):
            stats = None
        if stats is None or stats.get("skipped") != len(skipped) or stats.get("stages") != len(mine):
            camp.fail(f"rank {r}: client.stats {stats} but {len(mine)} steps, {len(skipped)} skipped")
    skipped_steps = {x["step"] for mine in per_rank for x in mine if x["code"] == "no_sign_of_life"}
    half = sorted(x["step"] for mine in per_rank for x in mine if x["sealed"] and x["step"] in skipped_steps)
    if half:
        camp.fail(f"steps skipped by one rank but sealed: {half[:5]}")
    newest = max((x["step"] for x in per_rank[0] if x["sealed"]), default=None)
    if newest is not None and daemon.proc.poll() is None:
        import torch

        with Subscriber(endpoint) as sub, sub.latest() as snap:
            for r in range(RANKS):
                if not torch.equal(snap[f"w{r}"], torch.full((ROWS,), float(snap.step))):
                    camp.fail(f"step {snap.step}: w{r} does not hold the staged bytes")
    camp.stop_daemon_and_check(daemon)

    def ms(values: list[float]) -> str:
        return "/".join(f"{1000 * v:.0f}" for v in values) + " ms"

    resume = f"{min(resumed):.2f}-{max(resumed):.2f}s" if resumed else "never"
    return (
        f"hung-daemon: {RANKS} ranks, {len(windows)} stops of {stopped_steps}+ steps (ack_timeout {ack:g}s), "
        f"{'/'.join(map(str, steps_total))} steps, skipped {'/'.join(map(str, skipped_total))}; worst "
        f"stage()+wait_copied() per rank: before {ms(worst['before'])}, stopped {ms(worst['stopped'])}, after "
        f"SIGCONT {ms(worst['after'])} (warm-up {ms(worst['warm-up'])}); sealing again {resume} after SIGCONT, "
        f"{time.monotonic() - camp.started:.0f}s"
    )


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["rank"]:
        return rank_loop(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--stopped-steps", type=int, default=10, help="steps each rank goes through per stop")
    p.add_argument("--ack-timeout", type=float, default=1.0, help="the ranks' STAGER_ACK_TIMEOUT")
    p.add_argument("--quick", action="store_true", help="1 round of 4 steps (CI)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.stopped_steps = 1, 4
    with lib.Campaign("hung-daemon") as camp:
        try:
            line = campaign(camp, args.rounds, args.stopped_steps, args.ack_timeout)
        except Exception as exc:
            import traceback

            camp.fail(f"harness error: {exc!r}\n{traceback.format_exc()[-1500:]}")
            line = "hung-daemon: aborted"
        return camp.finish(line)


if __name__ == "__main__":
    sys.exit(main())
