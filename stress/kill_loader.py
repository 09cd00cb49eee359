#!/usr/bin/env python
"""kill -9 of `stager load-hf`, --rounds times, at random moments of the load.

    python stress/kill_loader.py [--rounds 20] [--seed 0] [--quick]

A sharded safetensors checkpoint with known contents (4 files, 48 tensors, ``--size-mib``) is
loaded into one daemon again and again, each time as the next step, by a loader process that is
ready (imports done) before the clock starts. Each round SIGKILLs the loader at a random moment
within the time a whole load took, so mostly mid-copy, sometimes before its begin or after
its seal. Checks after every round: the daemon noticed the dead loader (no step left in flight)
and takes the next one; the round's step is sealed only if the loader got as far as its commit,
and then holds exactly the checkpoint's bytes; the segments on /dev/shm are exactly the memory the
daemon accounts for. Every fifth round, and last, a loader runs to its end, and what it sealed is
checked byte for byte. Once the daemon stops, no segment is left and its log holds no traceback.
One summary line; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _stresslib as lib  # noqa: E402
from kill import segment_accounting, status, stop_daemon, wait_for  # noqa: E402

FILES, PER_FILE = 4, 12
# a loader that imports everything first, says so, and loads when told: the kill times the load,
# not the interpreter's start
LOADER = """
import sys
from stager.loaders.load_hf import load_hf
print("ready", flush=True)
sys.stdin.readline()
load_hf(sys.argv[1], endpoint=sys.argv[2], step=int(sys.argv[3]))
print("sealed", flush=True)
"""


def checkpoint(directory: str, size_mib: int) -> dict:
    """A sharded HF checkpoint (index and all) of known tensors; returns them by name."""
    import json

    import torch
    from safetensors.torch import save_file

    rows = max(1, (size_mib << 20) // (FILES * PER_FILE * 1024 * 4))
    tensors, weight_map = {}, {}
    for f in range(FILES):
        fname = f"model-{f + 1:05d}-of-{FILES:05d}.safetensors"
        part = {
            f"layers.{f}.w{i}": torch.arange(rows * 1024, dtype=torch.float32).view(rows, 1024) * (f + 1) + i
            for i in range(PER_FILE)
        }
        save_file(part, os.path.join(directory, fname))
        tensors.update(part)
        weight_map.update({n: fname for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    return tensors


class Loader:
    def __init__(self, src: str, endpoint: str, step: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LOADER, src, endpoint, str(step)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=lib.python_env(),
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the loader did not start (exit {self.proc.wait(30)})")

    def go(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return time.monotonic()


def check_version_tensors(endpoint: str, step: int, want: dict) -> list[str]:
    """Problems of sealed version ``step`` against the checkpoint's tensors (leased by step)."""
    import torch

    from stager.client import Subscriber

    try:
        with Subscriber(endpoint, timeout=10.0) as sub, sub.at(step) as snap:
            problems = [] if set(snap) == set(want) else [f"holds {len(set(snap))} tensors, the checkpoint {len(want)}"]
            return problems + [
                f"{n} differs from the checkpoint" for n, t in snap.items() if n in want and not torch.equal(t, want[n])
            ]
    except Exception as exc:
        return [f"not readable: {type(exc).__name__}: {exc}"]


def in_flight(endpoint: str) -> list[int]:
    return [v["step"] for v in status(endpoint)["versions"] if v["state"] == "staging"]


def sealed(endpoint: str) -> set[int]:
    return {v["step"] for v in status(endpoint)["versions"] if v["state"] == "sealed"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size-mib", type=int, default=384)
    p.add_argument("--quick", action="store_true", help="4 rounds, for CI")
    args = p.parse_args(argv)
    rounds = 4 if args.quick else args.rounds
    rng = random.Random(args.seed)
    counts = {"killed_before_seal": 0, "sealed_before_kill": 0, "full": 0, "accounted": 0}
    with lib.Campaign("kill-load-hf") as camp:
        src = os.path.join(camp.tmp, "hf")
        os.makedirs(src)
        want = checkpoint(src, args.size_mib)
        endpoint = f"ipc://{camp.tmp}/d.sock"
        daemon = camp.daemon(endpoint, ("--memory-limit", f"{3 * args.size_mib + 16}MiB", "--keep", "1"))
        step = 0

        def full_load() -> float:
            nonlocal step
            step += 1
            loader = Loader(src, endpoint, step)
            t0 = loader.go()
            said = loader.proc.stdout.readline().strip()
            took = time.monotonic() - t0  # to the seal, not to the interpreter's exit
            rc = loader.proc.wait(120)
            if rc != 0 or said != "sealed" or step not in sealed(endpoint):
                camp.fail(f"step {step}: a load left to run exited {rc} and sealed {sorted(sealed(endpoint))}")
            else:
                problems = check_version_tensors(endpoint, step, want)
                camp.failures.extend(f"step {step}: {p}" for p in problems)
                counts["full"] += not problems
            return took

        full_load()
        load_s = full_load()  # the second: into memory the daemon has already, as in every round after
        for rnd in range(rounds):
            if camp.failures:
                break
            step += 1
            loader = Loader(src, endpoint, step)
            t0 = loader.go()
            time.sleep(rng.uniform(0.0, load_s))  # a random moment of the load (the thing varied)
            loader.proc.send_signal(signal.SIGKILL)
            loader.proc.wait(30)
            got_far = "sealed" in loader.proc.stdout.read()
            if not wait_for(lambda: not in_flight(endpoint), 30):
                camp.fail(f"round {rnd}: step {in_flight(endpoint)} still in flight 30 s after its loader died")
                break
            if step in sealed(endpoint):
                counts["sealed_before_kill"] += 1
                problems = check_version_tensors(endpoint, step, want)
                camp.failures.extend(
                    f"round {rnd}, step {step} (killed after {time.monotonic() - t0:.2f}s): {p}" for p in problems
                )
            else:
                counts["killed_before_seal"] += 1
                if got_far:
                    camp.fail(f"round {rnd}: the loader printed 'sealed' but step {step} is not sealed")
            problem = segment_accounting(daemon, endpoint)
            if problem:
                camp.fail(f"round {rnd}: {problem}")
            else:
                counts["accounted"] += 1
            if rnd % 5 == 4:
                full_load()
        full_load()
        stop_daemon(camp, daemon)
        return camp.finish(
            f"kill load-hf: {rounds} kills of a {args.size_mib} MiB load (whole load {load_s:.2f}s): "
            f"{counts['killed_before_seal']} before the seal (no version), {counts['sealed_before_kill']} after it "
            f"(intact), segments accounted {counts['accounted']}/{rounds}, {counts['full']} full loads verified, "
            f"{time.monotonic() - camp.started:.0f}s"
        )


if __name__ == "__main__":
    sys.exit(main())
