"""A real vLLM engine kept at the trainer's step on a real RL-like run: delta against full updates, per step.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 /path/to/vllm-venv/bin/python bench/bench_vllm_rl.py \\
        [--hidden 768] [--layers 12] [--steps 20] [--lr 1e-5] [--remote] [--json PATH]

The run of bench_delta.py (a transformers Llama, fp32 master weights, AdamW at an RL learning rate,
word-level tokens of the Python docs' topics) stages every step under its HF names to a real daemon
(``stager serve``, change maps in bf16). A vLLM CPU engine in bf16 with the ``stager`` backend (its
worker in this process) starts on an ``export-hf`` of step 0 and follows the run. Per step M, once
the daemon has M's change map:

- ``delta``: ``update(llm, M)`` from the engine's step N = M - 1 (only the changed tensors read;
  elements written in place by index, a packed linear repacked when a shard of it changed);
- the engine's greedy tokens and log-probabilities on fixed prompts, and vLLM's weight checksums;
- ``full``: the same step read again in full (``forget_base()``: what update info ``{"full": true}``
  does), then the same outputs and checksums, which must equal the delta's bit for bit.

Each update's pause (start + update + finish: no request runs meanwhile), this process's CPU
seconds (the engine's worker runs here) and the daemon's (/proc), bytes the daemon sent as frames
(``read_bytes``: 0 for a same-host reader, which maps shared memory; ``--remote`` reads frames over
the socket), bytes the engine took, and the delta's tensors skipped / patched by index / sent whole.
The delta runs first and the full update second in every step (a delta needs the engine at M - 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from bench_delta import corpus, cpu_s, read_bytes, status_of, wait_for  # noqa: E402
from common import machine, write_report  # noqa: E402

PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59, 4]]


def hf_config(args) -> dict:
    """The HF config of bench_delta's model (what ``export-hf`` writes and vLLM builds the engine from)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 11 // 4,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 64,
        "num_key_value_heads": args.hidden // 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": args.seq,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--remote", action="store_true", help="the engine reads frames over the socket")
    parser.add_argument("--json")
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    import rl_vllm
    import stager
    from stager.client import StagingClient
    from stager.dev.launch import DaemonProcess
    from stager.integrations.vllm import update, weight_checksums

    c = hf_config(args)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in c.items() if k != "torch_dtype"})).float()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    batches = corpus(args.vocab, args.seq, args.batch, args.steps)
    sd = model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    report: dict = {
        **machine(),
        "stager": os.path.dirname(stager.__file__),
        "model": {"params": sum(t.numel() for t in sd.values()), "fp32_bytes": nbytes, "tensors": len(sd), **c},
        "lr": args.lr,
        "remote": args.remote,
        "steps": [],
    }
    print(f"model: {report['model']['params'] / 1e6:.1f}M params, {nbytes / 2**20:.0f} MiB fp32", file=sys.stderr)
    info = {"adapter": "identity", "hf_config": c}
    flags = ("--memory-limit", str(6 * nbytes), "--keep", "3", "--change-maps", "bfloat16")
    with (
        tempfile.TemporaryDirectory(prefix="bvrl", dir="/tmp") as tmp,
        DaemonProcess(f"ipc://{tmp}/d.sock", args=flags) as daemon,
        StagingClient(daemon.endpoint, strict=True) as client,
    ):
        ep = daemon.endpoint
        client.stage(sd, step=0, model_info=info).wait(300)
        export = rl_vllm.export_step(ep, f"{tmp}/hf", 0)
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        engine_args = dict(rl_vllm.ENGINE_ARGS, dtype="bfloat16", max_model_len=args.seq)
        llm = LLM(export, weight_transfer_config=WeightTransferConfig(backend="stager"), **engine_args)
        worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
        # step 0 through vLLM's layerwise reload: proves the direct plan, and is the first delta's base
        update(llm, 0, endpoint=ep, init_info={"endpoint": ep, "remote": args.remote})
        engine = worker.weight_transfer_engine

        def timed_update(step: int, full: bool) -> dict:
            if full:
                engine.forget_base()
            r0, d0, c0 = read_bytes(ep), cpu_s(daemon.pid), time.process_time()
            seconds = update(llm, step, endpoint=ep).engines[0].seconds
            cpu, daemon_cpu = time.process_time() - c0, cpu_s(daemon.pid) - d0
            last = engine.last_update
            assert last["step"] == step and last["path"] == "direct", last
            assert (last["delta"] is None) == full, last
            outputs = rl_vllm.greedy(llm, PROMPTS)
            return {
                "pause_s": round(seconds["start"] + seconds["update"] + seconds["finish"], 4),
                "total_s": round(seconds["total"], 4),
                "cpu_s": round(cpu, 4),
                "daemon_cpu_s": round(daemon_cpu, 4),
                "wire_bytes": read_bytes(ep) - r0,
                "engine_bytes": last["bytes"],
                "tensors": last["tensors"],
                "delta": last["delta"],  # since, unchanged (skipped), indices (patched), whole, elements
                "why_full": last["why_full"],
                "outputs": [{k: o[k] for k in ("tokens", "logprobs")} for o in outputs],
                "checksums": weight_checksums(llm),
            }

        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            ids = batches[step - 1]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            row: dict = {"step": step, "loss": round(loss.item(), 4), "train_s": round(time.perf_counter() - t0, 3)}
            client.stage(sd, step=step, model_info=info).wait(300)
            changed = wait_for(lambda: (status_of(ep, step) or {}).get("changed"), 300)["bf16"]
            row["changed"] = {k: changed[k] for k in ("elements", "tensors", "whole", "delta_bytes", "full_bytes")}
            row["delta"] = timed_update(step, full=False)
            row["full"] = timed_update(step, full=True)
            row["same_outputs"] = row["delta"].pop("outputs") == row["full"].pop("outputs")
            row["same_checksums"] = row["delta"].pop("checksums") == row["full"].pop("checksums")
            report["steps"].append(row)
            print(row, file=sys.stderr, flush=True)
            if not (row["same_outputs"] and row["same_checksums"]):
                print(f"step {step}: the delta update differs from the full update", file=sys.stderr)
        engine.shutdown()
    summarize(report)
    write_report(args.json, report)
    return 0 if all(r["same_outputs"] and r["same_checksums"] for r in report["steps"]) else 1


def summarize(report: dict) -> None:
    rows = report["steps"]
    med = statistics.median
    out: dict = {
        "elements_changed_median": med(r["changed"]["elements"] for r in rows),
        "full_over_delta_pause": med(r["full"]["pause_s"] / r["delta"]["pause_s"] for r in rows),
        "full_over_delta_cpu": med(
            (r["full"]["cpu_s"] + r["full"]["daemon_cpu_s"])
            / max(1e-9, r["delta"]["cpu_s"] + r["delta"]["daemon_cpu_s"])
            for r in rows
        ),
        "steps_equal": sum(r["same_outputs"] and r["same_checksums"] for r in rows),
        "steps": len(rows),
    }
    for kind in ("delta", "full"):
        out[kind] = {
            m: med(r[kind][m] for r in rows)
            for m in ("pause_s", "cpu_s", "daemon_cpu_s", "wire_bytes", "engine_bytes", "tensors")
        }
    out["delta_tensors"] = {
        k: med(r["delta"]["delta"][k] for r in rows) for k in ("unchanged", "indices", "whole", "elements")
    }
    report["summary"] = out
    print(
        "\nstep | elems % | delta pause s | full pause s | full/delta | delta CPU s (engine+daemon) | full CPU s | "
        "delta MB (engine / wire) | full MB (engine / wire) | skipped/patched/whole | equal"
    )
    for r in rows:
        d, f, t = r["delta"], r["full"], r["delta"]["delta"]
        print(
            f"{r['step']:4d} | {100 * r['changed']['elements']:6.2f} | {d['pause_s']:.3f} | {f['pause_s']:.3f} | "
            f"{f['pause_s'] / d['pause_s']:.2f}x | {d['cpu_s'] + d['daemon_cpu_s']:.3f} | "
            f"{f['cpu_s'] + f['daemon_cpu_s']:.3f} | {d['engine_bytes'] / 1e6:.1f} / {d['wire_bytes'] / 1e6:.1f} | "
            f"{f['engine_bytes'] / 1e6:.1f} / {f['wire_bytes'] / 1e6:.1f} | "
            f"{t['unchanged']}/{t['indices']}/{t['whole']} | {r['same_outputs'] and r['same_checksums']}"
        )
    print(out)


if __name__ == "__main__":
    sys.exit(main())
