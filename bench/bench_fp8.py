"""FP8 on read: what block quantization costs a reader, and how far the published quantizers disagree.

    python bench/bench_fp8.py [--size-mib 100] [--repeat 5] [--json PATH]

(a) ``quantize_block_fp8`` of SIZE MiB of bf16 weights ([4096, N] tensors), and of the same values in fp32,
    with 1 and 2 torch threads, in ms per 100 MiB of bf16; anchors in the same run: vLLM's
    ``per_block_cast_to_fp8`` as published (tests/helpers.py: padded, the whole tensor at once) and a copy
    (``clone``) of the same bytes.
(b) a same-host reader of a staged Llama-shaped model of about SIZE MiB of bf16 (HF names, identity adapter):
    ``Snapshot.load_into`` of every tensor into an engine's own buffers, bf16 (a copy) against
    ``quantize="fp8-block"`` (quantized, then copied into e4m3 buffers and fp32 scales).
(c) whole 128 x 128 blocks of N(0, 0.02) weights: the fraction of e4m3 values and of scales where transformers'
    ``Fp8Quantize`` (5.23 here) and DeepGEMM's first release (``x * (448 / amax)``) differ from stager's (vLLM's).

Medians of ``--repeat`` runs; the machine is shared, so compare figures of one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from common import machine, write_report  # noqa: E402
from helpers import vllm_per_block_cast_to_fp8  # noqa: E402
from stager.protocol.fp8_block import quantize_block_fp8  # noqa: E402

MIB = 1 << 20


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def quantizer_costs(size_mib: int, repeat: int) -> dict:
    cols = size_mib * MIB // 2 // 4096
    bf16 = torch.randn(4096, cols).mul_(0.02).to(torch.bfloat16)
    per_100 = 100 / (bf16.numel() * 2 / MIB)
    out = {"shape": list(bf16.shape), "mib_bf16": bf16.numel() * 2 / MIB}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, w in (("bf16", bf16), ("fp32", bf16.float())):
            out[f"stager_{name}_{threads}t"] = median_ms(lambda w=w: quantize_block_fp8(w), repeat) * per_100
            out[f"vllm_reference_{name}_{threads}t"] = (
                median_ms(lambda w=w: vllm_per_block_cast_to_fp8(w), repeat) * per_100
            )
        out[f"clone_bf16_{threads}t"] = median_ms(bf16.clone, repeat) * per_100
    return out


def reader_costs(size_mib: int, repeat: int) -> dict:
    from stager.client import StagingClient, Subscriber
    from stager.dev.launch import DaemonProcess

    hidden, inter, vocab = 1024, 2816, 4096
    per_layer = (2 * hidden * hidden + 2 * 256 * hidden + 3 * inter * hidden) * 2
    layers = max(1, size_mib * MIB // per_layer)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden).to(torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (hidden, hidden),
            "self_attn.k_proj": (256, hidden),
            "self_attn.v_proj": (256, hidden),
            "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (inter, hidden),
            "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter),
        }
        sd.update({p + k + ".weight": torch.randn(s).mul_(0.02).to(torch.bfloat16) for k, s in shapes.items()})
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    total = sum(t.numel() * 2 for t in sd.values())
    info = {"adapter": "identity", "hf_config": {"model_type": "llama"}}
    out = {"layers": layers, "mib_bf16": total / MIB}
    with (
        tempfile.TemporaryDirectory(prefix="stg", dir="/tmp") as tmp,
        DaemonProcess(endpoint=f"ipc://{tmp}/d.sock", args=("--memory-limit", f"{4 * total // MIB + 64}MiB")) as d,
    ):
        with StagingClient(d.endpoint, strict=True) as client:
            client.stage(sd, step=1, model_info=info).wait(120)
        del sd
        torch.set_num_threads(1)
        for label, options in (("bf16", {}), ("fp8_block", {"quantize": "fp8-block"})):
            with Subscriber(d.endpoint, view="hf", dtype=torch.bfloat16, **options) as sub, sub.latest() as snap:
                engine = {n: torch.empty(snap.meta(n)[0], dtype=t.dtype) for n, t in snap.items()}
                out[f"load_into_{label}_ms"] = median_ms(lambda: snap.load_into(engine), repeat)
    out["per_100_mib"] = {k: v * 100 / out["mib_bf16"] for k, v in out.items() if k.endswith("_ms")}
    return out


def disagreement() -> dict:
    try:
        from types import SimpleNamespace

        import transformers
        from transformers.integrations.finegrained_fp8 import Fp8Quantize
        from transformers.utils.quantization_config import FineGrainedFP8Config
    except ImportError:
        return {"skipped": "transformers is not installed"}
    op = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config()))

    def first_deepgemm(x):  # DeepGEMM's first release (tests/test_core.py): x * (448 / amax), scale amax / 448
        v = x.view(x.shape[0] // 128, 128, x.shape[1] // 128, 128)
        amax = v.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4)
        return (v * (448.0 / amax)).to(torch.float8_e4m3fn).view_as(x), (amax / 448.0).view(v.size(0), v.size(2))

    torch.manual_seed(0)
    out = {"transformers": transformers.__version__}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        values = scales = elements = blocks = 0
        first_values = first_scales = 0
        for i in range(8):
            w = (torch.randn(1024, 1024) * 0.02 * (1 + i)).to(dtype)
            data, scale_inv = quantize_block_fp8(w)
            theirs = op._quantize_one("m.weight", w)
            values += (theirs["m.weight"].view(torch.uint8) != data.view(torch.uint8)).sum().item()
            scales += (theirs["m.weight_scale_inv"] != scale_inv).sum().item()
            fd, fs = first_deepgemm(w)
            first_values += (fd.view(torch.uint8) != data.view(torch.uint8)).sum().item()
            first_scales += (fs != scale_inv).sum().item()
            elements, blocks = elements + w.numel(), blocks + scale_inv.numel()
        out[name] = {
            "transformers_values_pct": 100 * values / elements,
            "transformers_scales_pct": 100 * scales / blocks,
            "deepgemm_first_values_pct": 100 * first_values / elements,
            "deepgemm_first_scales_pct": 100 * first_scales / blocks,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    report = {
        "machine": machine(),
        "quantizer": quantizer_costs(args.size_mib, args.repeat),
        "reader": reader_costs(args.size_mib, args.repeat),
        "disagreement": disagreement(),
    }
    for section, values in report.items():
        print(section, values)
    write_report(args.json, report)


if __name__ == "__main__":
    main()
