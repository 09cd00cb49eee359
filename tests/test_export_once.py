"""An exporter plans from the layout and fetches each staged byte once, also when reading over the socket."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import CONFIG
from stager.client import StagingClient, Subscriber
from stager.client.adapters import load_adapter
from stager.client.admin import daemon_status
from stager.writers.export_hf import export_snapshot

DEEPSEEK = {
    "vocab_size": 64,
    "hidden_size": 32,
    "moe_intermediate_size": 16,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "n_routed_experts": 8,
    "q_lora_rank": 0,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
}


def llama_sd() -> dict:
    g = torch.Generator().manual_seed(0)
    h, kv = (
        CONFIG["hidden_size"],
        CONFIG["hidden_size"] // CONFIG["num_attention_heads"] * CONFIG["num_key_value_heads"],
    )
    shapes = {
        "tok_embeddings.weight": (96, h),
        "layers.0.attention.wq.weight": (h, h),
        "layers.0.attention.wk.weight": (kv, h),
        "layers.0.attention.wv.weight": (kv, h),
        "layers.0.attention.wo.weight": (h, h),
        "layers.0.attention_norm.weight": (h,),
        "layers.0.ffn_norm.weight": (h,),
        "layers.0.feed_forward.w1.weight": (48, h),
        "layers.0.feed_forward.w2.weight": (h, 48),
        "layers.0.feed_forward.w3.weight": (48, h),
        "norm.weight": (h,),
        "output.weight": (96, h),
    }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def deepseek_sd() -> dict:
    """Layer 1's grouped experts split into 8 HF tensors each: with small shards they straddle files."""
    g = torch.Generator().manual_seed(0)
    c = DEEPSEEK
    h, e, m, r = c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"], c["qk_rope_head_dim"]
    q_rows = c["num_attention_heads"] * (c["qk_nope_head_dim"] + r)
    shapes = {"tok_embeddings.weight": (64, h), "norm.weight": (h,), "output.weight": (64, h)}
    for layer in range(2):
        p = f"layers.{layer}."
        shapes.update(
            {
                p + "attention_norm.weight": (h,),
                p + "ffn_norm.weight": (h,),
                p + "attention.wq.weight": (q_rows, h),
                p + "attention.wkv_a.weight": (c["kv_lora_rank"] + r, h),
                p + "attention.kv_norm.weight": (c["kv_lora_rank"],),
                p + "attention.wkv_b.weight": (
                    c["num_attention_heads"] * (c["qk_nope_head_dim"] + c["v_head_dim"]),
                    c["kv_lora_rank"],
                ),
                p + "attention.wo.weight": (h, c["num_attention_heads"] * c["v_head_dim"]),
            }
        )
    shapes.update(
        {
            "layers.0.feed_forward.w1.weight": (48, h),
            "layers.0.feed_forward.w2.weight": (h, 48),
            "layers.0.feed_forward.w3.weight": (48, h),
            "layers.1.moe.router.gate.weight": (e, h),
            "layers.1.moe.expert_bias": (e,),
            "layers.1.moe.experts.w1": (e, m, h),
            "layers.1.moe.experts.w2": (e, h, m),
            "layers.1.moe.experts.w3": (e, m, h),
        }
    )
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def daemon_counters(endpoint: str) -> dict:
    """The daemon's counters, asked over the protocol as ``stager status`` does."""
    return daemon_status(endpoint)["counters"]


CASES = {"llama3": (llama_sd, CONFIG), "deepseek_v3": (deepseek_sd, DEEPSEEK)}


@pytest.mark.parametrize("adapter", sorted(CASES))
@pytest.mark.parametrize("shard", ["5GB", "8KB"], ids=["one file", "sharded"])
def test_remote_export_reads_each_byte_once(make_daemon, tmp_path, adapter, shard):
    make, config = CASES[adapter]
    d = make_daemon()
    sd = make()
    with StagingClient(d.endpoint, strict=True) as c:
        c.stage(sd, step=9, model_info={"adapter": adapter, "hf_config": config}).wait(10)
    staged = sum(t.numel() * t.element_size() for t in sd.values())
    with Subscriber(d.endpoint, remote=True) as sub, sub.latest() as snap:
        layout_bytes = sum(math.prod(shape) * dt.itemsize for _, dt, shape in snap.specs())
        assert layout_bytes == staged
        before = daemon_counters(d.endpoint)["read_bytes"]
        reports = []
        path = export_snapshot(snap, str(tmp_path), max_shard_size=shard, on_export=reports.append, progress=False)
        read = daemon_counters(d.endpoint)["read_bytes"] - before
    assert read == staged, f"read {read} bytes over the socket for {staged} staged"
    assert reports[0]["exported"] == path and reports[0]["bytes"] == staged
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert (len(files) > 1) == (shard == "8KB")
    written = {k: v for f in files for k, v in load_file(os.path.join(path, f)).items()}
    expected = load_adapter(adapter, config).to_hf(sd)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)


def test_cli_json_line_has_the_export_time(make_daemon, tmp_path):
    d = make_daemon()
    with StagingClient(d.endpoint, strict=True) as c:
        c.stage(llama_sd(), step=2, model_info={"adapter": "llama3", "hf_config": CONFIG}).wait(10)
    out = subprocess.run(
        [sys.executable, "-m", "stager.cli", "export-hf", "--endpoint", d.endpoint, "--out", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    record = json.loads(line)
    assert record["exported"].endswith("step-00000002") and record["step"] == 2
    assert record["bytes"] == sum(t.numel() * 4 for t in llama_sd().values()) and record["seconds"] >= 0
    assert "export step" not in out.stderr  # no progress bar when stderr is not a terminal
