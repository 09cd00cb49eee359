"""An RL-style loop: the trainer stages after every optimizer step and never waits for readers;
a rollout process with a transformers model subscribes to the HF view and loads each new version.

    python examples/rl_loop.py --steps 6

The trainer is a tiny torchtitan-style Llama (``native_llama.py``: torchtitan names, Meta's
interleaved rotary); the rollout is ``transformers.LlamaForCausalLM``. The daemon's ``llama3``
adapter renames and permutes on the way, so the rollout's logits at each version it loads
equal the trainer's at that step. Prints one JSON line per loaded version.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIG = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
PROBE = torch.arange(24).remainder(CONFIG["vocab_size"]).view(2, 12)  # the prompt both sides score


def trainer(endpoint: str, steps: int, out_dir: str, rollout_ready) -> None:
    from native_llama import NativeLlama
    from stager.client import StagingClient

    torch.manual_seed(0)
    model = NativeLlama(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    info = {"adapter": "llama3", "hf_config": CONFIG}
    rollout_ready.wait(120)  # an RL job starts training once its inference engine is up
    with StagingClient(endpoint, strict=True) as client:
        for step in range(1, steps + 1):
            tokens = torch.randint(0, CONFIG["vocab_size"], (4, 16))
            loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # the reference the rollout must reproduce
                torch.save(model(PROBE), os.path.join(out_dir, f"trainer-{step}.pt"))
            handle = client.stage(model.state_dict(), step=step, model_info=info)  # returns at once
            handle.wait_copied()  # before the next optimizer step changes the weights in place
        handle.wait(60)  # the last version is sealed before the trainer exits


def rollout(endpoint: str, steps: int, out_dir: str, ready) -> None:
    import transformers

    from stager.client import Subscriber

    cfg = {k: v for k, v in CONFIG.items() if k != "rope_theta"}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, rope_theta=CONFIG["rope_theta"])).eval()
    params = dict(model.named_parameters())

    def load_weights(items):  # what an inference engine's load_weights(iterable) does
        for name, tensor in items:
            params[name].data.copy_(tensor)

    with Subscriber(endpoint, view="hf") as sub:
        ready.set()
        for snap in sub:
            load_weights(snap.items())
            with torch.no_grad():
                logits = model(PROBE).logits
            torch.save(logits, os.path.join(out_dir, f"rollout-{snap.step}.pt"))
            print(json.dumps({"step": snap.step, "skipped": snap.skipped}), flush=True)
            if snap.step >= steps:
                return


def run(steps: int = 6) -> list[dict]:
    """Run daemon, trainer and rollout; returns per loaded version the max logit difference."""
    from stager.dev.launch import DaemonProcess

    ctx = mp.get_context("spawn")
    with DaemonProcess() as daemon, tempfile.TemporaryDirectory() as out_dir:
        ready = ctx.Event()
        reader = ctx.Process(target=rollout, args=(daemon.endpoint, steps, out_dir, ready))
        reader.start()
        train = ctx.Process(target=trainer, args=(daemon.endpoint, steps, out_dir, ready))
        train.start()
        train.join(300)
        reader.join(300)
        if train.exitcode != 0 or reader.exitcode != 0:
            raise RuntimeError(f"trainer exit {train.exitcode}, rollout exit {reader.exitcode}")
        results = []
        for step in range(1, steps + 1):
            path = os.path.join(out_dir, f"rollout-{step}.pt")
            if os.path.exists(path):
                got, want = torch.load(path), torch.load(os.path.join(out_dir, f"trainer-{step}.pt"))
                results.append({"step": step, "max_abs_diff": float((got - want).abs().max())})
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    for line in run(parser.parse_args().steps):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
