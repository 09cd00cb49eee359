"""A tensor-parallel vLLM engine (2 workers) over frames: each rank reads only its slices once learned.

    /path/to/vllm-venv/bin/python examples/vllm_tp.py [--json out.json]

Not in CI: a TP engine takes ~100 s to start on 2 cores. A daemon, the tests' trainer (the tiny
torchtitan Llama of ``rl_vllm.py``, llama3 adapter) staging steps 0..2, and the same weights staged
again under their HF names with the identity adapter as steps 11 and 12 (exports of steps 1 and 2).
The engine (``tensor_parallel_size=2``, ``distributed_executor_backend="mp"``, one core per worker:
``VLLM_CPU_OMP_THREADS_BIND="0|1"``) starts from the export of step 0 with the ``stager`` backend and
``remote=True`` (frames, as from another host), and is updated to steps 1 (whole tensors: each
worker learns its slices from vLLM's loaders), 2, 1, 12 and 11. After each update its greedy
tokens and their log-probabilities are compared with those of a fresh single-worker engine on the
export of the same weights, and the bytes the daemon served (its ``read_bytes``, both workers)
are printed with each worker's ``last_update`` (``bytes``, ``sliced``: tensors read as slices).
Under the llama3 adapter q_proj and k_proj are a permutation of the staged tensor (its rotary
layout), not a strided view: a slice of them is not fetched alone, so they are read whole.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per worker, before vLLM is imported
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rl_vllm  # noqa: E402  (the tiny model, its trainer, engine arguments; sets vLLM's CPU env)

HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCE = 1e-5  # log-probabilities: TP=2 sums the row-parallel products in another order
UPDATES = [(1, 1), (2, 2), (1, 1), (12, 2), (11, 1)]  # (step, the trainer step whose weights it holds)


def reference(model_dir: str) -> dict:
    """A fresh single-worker engine on ``model_dir`` (a process of its own)."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
    code = f"import json, rl_vllm; print('REF' + json.dumps(rl_vllm.reference({model_dir!r})))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=900, env=env, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("REF")]
    if done.returncode or not lines:
        raise RuntimeError(f"the reference engine failed: {done.stderr[-3000:]}")
    return json.loads(lines[-1][3:])


def last_update(worker) -> dict:
    """In each worker process (vLLM's collective_rpc): what its update read."""
    engine = worker.weight_transfer_engine
    learned = engine.slices.learned()
    return {
        **{k: engine.last_update.get(k) for k in ("step", "tensors", "bytes", "sliced", "path")},
        "learned_slices": sum(box is not None for box in learned.values()),
        "learned_whole": sum(box is None for box in learned.values()),
    }


def stage_identity(endpoint: str, step: int, model_dir: str) -> None:
    from safetensors.torch import load_file

    from stager.client import StagingClient

    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    with StagingClient(endpoint, strict=True) as client:
        client.stage(weights, step=step, model_info={"adapter": "identity"}).wait(60)


def run() -> dict:
    from vllm import LLM
    from vllm.config import WeightTransferConfig

    from stager.client.admin import daemon_status
    from stager.dev.launch import DaemonProcess
    from stager.integrations.vllm import update

    root = tempfile.mkdtemp(prefix="stgtp", dir="/tmp")  # ipc paths must stay short
    report: dict = {"updates": []}
    with DaemonProcess(f"ipc://{root}/d.sock", args=("--memory-limit", "256MiB", "--keep", "16")) as daemon:
        endpoint = daemon.endpoint
        trainer = mp.get_context("spawn").Process(target=rl_vllm.supervised_trainer, args=(endpoint, 2))
        trainer.start()
        trainer.join(300)
        if trainer.exitcode != 0:
            raise RuntimeError("the trainer failed")
        exports = {s: rl_vllm.export_step(endpoint, f"{root}/hf", s) for s in (0, 1, 2)}
        for step, of in ((11, 1), (12, 2)):
            stage_identity(endpoint, step, exports[of])
        refs = {s: reference(exports[s]) for s in (1, 2)}
        llm = LLM(
            exports[0],
            **rl_vllm.ENGINE_ARGS,
            tensor_parallel_size=2,
            distributed_executor_backend="mp",
            weight_transfer_config=WeightTransferConfig(backend="stager"),
        )
        try:
            init = {"endpoint": endpoint, "remote": True}
            for i, (step, of) in enumerate(UPDATES):
                before = daemon_status(endpoint)["counters"]["read_bytes"]
                # init_info only once: a re-initialized engine forgets what it learned
                result = update(llm, step, endpoint=endpoint, init_info=init if i == 0 else None)
                served = daemon_status(endpoint)["counters"]["read_bytes"] - before
                got = rl_vllm.greedy(llm)
                ref = refs[of]["greedy"]
                tokens_equal = [g["tokens"] for g in got] == [r["tokens"] for r in ref]
                worst = max(abs(a - b) for g, r in zip(got, ref) for a, b in zip(g["logprobs"], r["logprobs"]))
                line = {
                    "step": step,
                    "weights_of": of,
                    "daemon_read_bytes": served,
                    "workers": llm.collective_rpc(last_update),
                    "tokens_equal": tokens_equal,
                    "worst_logprob_diff": worst,
                    "seconds": result.engines[0].seconds,
                }
                print(json.dumps(line), flush=True)
                report["updates"].append(line)
                if not tokens_equal or worst > TOLERANCE or got[0]["versions"] != [str(step)]:
                    raise RuntimeError(f"step {step}: the engine differs from a fresh one on its export: {line}")
        finally:
            llm.collective_rpc(lambda worker: worker.weight_transfer_engine.shutdown())
            del llm
    subprocess.run(["rm", "-rf", root], check=False)
    whole = report["updates"][0]["daemon_read_bytes"]
    report["sliced_over_whole"] = [u["daemon_read_bytes"] / whole for u in report["updates"]]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    report = run()
    print(json.dumps({"sliced_over_whole": report["sliced_over_whole"]}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
