"""The deepseek_v3 adapter: same logits in transformers, exact round trips, per-expert splits, errors naming keys."""

import json
import os
import re

import pytest
import torch

from native_deepseek import NativeDeepSeekV3
from stager.adapter_deepseek import DeepSeekV3Adapter
from stager.adapters import load_adapter, to_hf_items
from stager.export_hf import export_snapshot
from stager.protocol import StagerError

transformers = pytest.importorskip("transformers")

# HF config names; 8 experts in 2 groups, 1 group kept, top-2: group-limited routing does mask experts
CONFIG = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
          "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
          "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12,
          "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
          "norm_topk_prob": True, "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "max_position_embeddings": 64, "tie_word_embeddings": False}


def hf_config(cfg: dict, **extra) -> dict:
    """A full transformers config dict (what config.json holds); HF spells "no q LoRA" None, torchtitan 0."""
    kwargs = {k: v for k, v in cfg.items() if k != "rope_theta"}
    kwargs["q_lora_rank"] = cfg["q_lora_rank"] or None
    return transformers.DeepseekV3Config(**kwargs, rope_theta=cfg["rope_theta"], **extra).to_dict()


def make_native(cfg: dict) -> NativeDeepSeekV3:
    torch.manual_seed(0)
    native = NativeDeepSeekV3(cfg).eval()
    with torch.no_grad():  # non-trivial norms and expert biases, so a mixed-up name changes the logits
        for name, p in native.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for layer in list(native.layers.values())[cfg["first_k_dense_replace"]:]:
            layer.moe.expert_bias.normal_(0, 0.3)
    return native


def fuse_experts(hf_sd: dict, n: int) -> dict:
    """transformers 5 keeps a layer's experts fused in memory (gate_up_proj [E, 2I, H], down_proj [E, H, I]);
    from_pretrained fuses a checkpoint's per-expert keys (see the export test), load_state_dict does not."""
    out, per = {}, {}
    for k, v in hf_sd.items():
        m = re.match(r"(.+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$", k)
        if m:
            per.setdefault((m[1], m[3]), {})[int(m[2])] = v
        else:
            out[k] = v
    for prefix in {p for p, _ in per}:
        def stack(proj):
            return torch.stack([per[prefix, proj][e] for e in range(n)])
        out[f"{prefix}.gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], 1)
        out[f"{prefix}.down_proj"] = stack("down_proj")
    return out


def assert_same_logits(hf, native):
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, native(tokens), rtol=1e-5, atol=1e-5)


def assert_round_trip(back: dict, sd: dict):
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("q_lora_rank,rope_interleave", [(24, True), (0, True), (24, False)],
                         ids=["q lora", "plain wq", "q lora, rotate_half rope"])
def test_same_logits_in_transformers_and_exact_round_trip(q_lora_rank, rope_interleave):
    cfg = dict(CONFIG, q_lora_rank=q_lora_rank)
    native = make_native(cfg)
    hf_cfg = hf_config(cfg, rope_interleave=rope_interleave)
    adapter = load_adapter("deepseek_v3", hf_cfg)
    sd = native.state_dict()
    hf_sd = dict(to_hf_items(adapter, sd.items()))
    assert ("model.layers.0.self_attn.q_proj.weight" in hf_sd) == (not q_lora_rank)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config.from_dict(hf_cfg)).eval()
    missing, unexpected = hf.load_state_dict(fuse_experts(hf_sd, cfg["n_routed_experts"]), strict=False)
    assert not missing and not unexpected
    assert_same_logits(hf, native)
    assert_round_trip(adapter.from_hf(hf_sd), sd)


def test_grouped_experts_split_per_tensor_into_linear_weights():
    adapter = load_adapter("deepseek_v3", hf_config(CONFIG))
    w1 = torch.randn(8, 16, 32)  # torchtitan: [experts, moe_intermediate_size, hidden_size]
    items = adapter.to_hf_items("layers.2.moe.experts.w1", w1)
    assert [k for k, _ in items] == [f"model.layers.2.mlp.experts.{e}.gate_proj.weight" for e in range(8)]
    assert all(torch.equal(t, w1[e]) for e, (_, t) in enumerate(items))
    down = adapter.to_hf_items("layers.2.moe.experts.w2", torch.empty(8, 32, 16, device="meta"))  # export plans on meta
    assert len(down) == 8 and down[3] == ("model.layers.2.mlp.experts.3.down_proj.weight", down[3][1])
    assert tuple(down[3][1].shape) == (32, 16)
    assert adapter.to_hf_items("layers.2.moe.tokens_per_expert", torch.zeros(8)) == []  # older torchtitan persisted it


def test_early_torchtitan_expert_layout_is_told_by_shape_and_restored():
    sd = make_native(CONFIG).state_dict()
    legacy = {k: v.transpose(1, 2).contiguous() if ".moe.experts." in k else v for k, v in sd.items()}  # [E, in, out]
    adapter = DeepSeekV3Adapter(hf_config(CONFIG))
    hf_sd = adapter.to_hf(legacy)
    assert adapter.expert_layout == "in_out"
    expected = load_adapter("deepseek_v3", hf_config(CONFIG)).to_hf(sd)
    assert hf_sd.keys() == expected.keys() and all(torch.equal(hf_sd[k], expected[k]) for k in hf_sd)
    assert_round_trip(adapter.from_hf(hf_sd), legacy)
    with pytest.raises(StagerError, match=r"experts.w1: .*\(in_out expert layout, but this adapter uses out_in\)"):
        DeepSeekV3Adapter(hf_config(CONFIG), expert_layout="out_in").to_hf(legacy)


Z = torch.zeros


@pytest.mark.parametrize("sd,text", [
    ({"layers.1.moe.mystery": Z(2)}, "layers.1.moe.mystery: the deepseek_v3 adapter does not know this key"),
    ({"frobnicator": Z(2)}, "frobnicator: the deepseek_v3 adapter does not know this key"),
    ({"layers.1.moe.experts.w9": Z(8, 16, 32)}, "layers.1.moe.experts.w9: the deepseek_v3 adapter does not know"),
    ({"layers.1.moe.experts.w1": Z(8, 16, 30)}, "layers.1.moe.experts.w1: shape [8, 16, 30] contradicts the config"),
    ({"layers.1.moe.experts.w2": Z(7, 32, 16)}, "layers.1.moe.experts.w2: shape [7, 32, 16] contradicts the config"),
    ({"layers.0.attention.wq.weight": Z(128, 32)}, "wq.weight: shape [128, 32] contradicts the config (q_lora_rank=24"),
    ({"layers.0.attention.wkv_a.weight": Z(16, 32)}, "wkv_a.weight: shape [16, 32] contradicts the config"),
    ({"layers.0.moe.router.gate.weight": Z(8, 32)}, "layer 0 is dense by the config"),
    ({"layers.1.feed_forward.w1.weight": Z(48, 32)}, "layer 1 is MoE by the config"),
], ids=["unknown layer key", "unknown top key", "unknown expert", "bad expert shape", "bad expert count",
        "wq with q lora", "bad wkv_a", "moe in dense layer", "dense in moe layer"])
def test_to_hf_errors_name_the_key(sd, text):
    with pytest.raises(StagerError) as info:
        load_adapter("deepseek_v3", hf_config(CONFIG)).to_hf(sd)
    assert text in info.value.message


def test_from_hf_errors_name_the_key():
    adapter = load_adapter("deepseek_v3", hf_config(CONFIG))
    hf_sd = adapter.to_hf(make_native(CONFIG).state_dict())
    gone = "model.layers.2.mlp.experts.3.up_proj.weight"
    cases = [
        ({k: v for k, v in hf_sd.items() if k != gone}, f"{gone} is missing"),
        ({**hf_sd, "model.layers.2.mlp.experts.8.up_proj.weight": Z(16, 32)}, "experts.8.up_proj.weight: expert 8 "
                                                                             "contradicts the config"),
        ({**hf_sd, "model.layers.1.mlp.experts.0.up_proj.weight": Z(16, 30)}, "experts.0.up_proj.weight: shape "
                                                                              "[16, 30] contradicts the config"),
        ({**hf_sd, "model.layers.1.self_attn.mystery": Z(2)}, "self_attn.mystery: the deepseek_v3 adapter does not"),
    ]
    for bad, text in cases:
        with pytest.raises(StagerError) as info:
            adapter.from_hf(bad)
        assert text in info.value.message


def test_missing_config_keys_are_named():
    with pytest.raises(StagerError, match="needs hf_config with kv_lora_rank, first_k_dense_replace"):
        load_adapter("deepseek_v3", {k: v for k, v in CONFIG.items()
                                     if k not in ("kv_lora_rank", "first_k_dense_replace")})
    with pytest.raises(StagerError, match="needs hf_config with hidden_size"):
        load_adapter("deepseek_v3")


class Snapshot(dict):  # what export_snapshot reads: name -> tensor, a step and model_info
    step, model_info = 5, {}


def test_sharded_export_loads_with_from_pretrained(tmp_path):
    native = make_native(CONFIG)
    sd = {**native.state_dict(), "layers.1.moe.tokens_per_expert": Z(8)}  # dropped: not a weight
    path = export_snapshot(Snapshot(sd), str(tmp_path), adapter="deepseek_v3", hf_config=hf_config(CONFIG),
                           max_shard_size="40KB")
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in index["weight_map"]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_same_logits(hf.eval(), native)
