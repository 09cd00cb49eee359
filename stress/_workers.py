"""Child processes of the stress campaigns, started as ``python stress/_workers.py stage ...``.

``stage``: one training rank staging versions of known contents (``_stresslib.pattern``) as fast as
it can (or every ``--pause`` seconds), printing one JSON line per step to stdout:
``{"rank", "step", "sealed", "error", "copy_s", "dt"}``. It never stops on a failed step (a daemon
that is down): like a training loop, it goes on with the next step. With ``--master-port`` the
ranks form a gloo group and do one all-reduce per step, so they stage the same steps in lockstep
(a rank whose peer died fails in that all-reduce, as a training job would).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _stresslib as lib  # noqa: E402


def rank_spec(spec_name: str, rank: int, lws: int) -> dict:
    """The tensors rank ``rank`` of an ``lws``-rank job stages for spec ``spec_name``."""
    return lib.SPECS[spec_name](rank, lws)


def stage_loop(args) -> int:
    import torch

    torch.set_num_threads(1)
    from stager.client import StagingClient
    from stager.protocol import StagerError

    spec = rank_spec(args.spec, args.rank, args.lws)
    dist = None
    if args.master_port:  # ranks of one job step in lockstep, as collectives keep a training job
        import datetime

        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.master_port))
        dist.init_process_group("gloo", rank=args.rank, world_size=args.lws, timeout=datetime.timedelta(seconds=60))
        tick = torch.zeros(1)
    client = StagingClient(
        args.endpoint,
        rank=args.rank,
        local_world_size=args.lws,
        world_size=args.lws,
        timeout=args.timeout,
        seal_timeout=args.timeout * 3,
    )
    model_info = {"adapter": "identity", "hf_config": {"model_type": "stager-stress", "hidden_size": 8}}
    step, end = args.start, args.start + args.steps
    rng = random.Random(os.getpid())
    try:
        while step < end:
            if dist is not None:
                dist.all_reduce(tick)  # the "training step": every rank stages the same step
            sd = lib.expected_state(step, spec)
            sd["meta"] = {"step": step}
            if args.jitter:  # ranks never finish their compute at the same moment
                time.sleep(rng.uniform(0, args.jitter))
            t0 = time.monotonic()
            handle = client.stage(sd, step=step, model_info=model_info)
            try:
                handle.wait_copied(args.timeout * 3)
                copy_s = time.monotonic() - t0
                handle.wait(args.timeout * 3)
                sealed, error = True, None
            except StagerError as exc:
                copy_s, sealed, error = time.monotonic() - t0, False, f"{exc}"[:300]
            print(
                json.dumps(
                    {
                        "rank": args.rank,
                        "step": step,
                        "sealed": sealed,
                        "error": error,
                        "copy_s": round(copy_s, 4),
                        "dt": round(time.monotonic() - t0, 4),
                    }
                ),
                flush=True,
            )
            step += 1
            if args.pause:
                time.sleep(args.pause)
    except BrokenPipeError:
        pass
    finally:
        client.close(2.0)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage")
    s.add_argument("--endpoint", required=True)
    s.add_argument("--rank", type=int, default=0)
    s.add_argument("--lws", type=int, default=1)
    s.add_argument("--start", type=int, default=1)
    s.add_argument("--steps", type=int, default=10**9)
    s.add_argument("--spec", default="default")
    s.add_argument("--pause", type=float, default=0.0)
    s.add_argument("--jitter", type=float, default=0.0, help="sleep up to this long before each stage")
    s.add_argument("--timeout", type=float, default=10.0)
    s.add_argument("--master-port", type=int, help="join a gloo group of --lws ranks on this loopback port")
    args = p.parse_args(argv)
    return stage_loop(args)


if __name__ == "__main__":
    sys.exit(main())
