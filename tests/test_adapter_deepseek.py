"""The deepseek_v3 adapter without torchtitan: exact round trips with transformers' DeepseekV3 (the HF
side), per-expert splits, earlier torchtitan names and layouts, MTP layers, errors naming keys, and an
export that from_pretrained loads. That the native side is torchtitan's own (names, layouts, logits)
is checked against the real torchtitan model in test_upstream_models.py."""

import json
import os

import pytest
import torch

from helpers import lazy_importorskip
from stager.client.adapters import load_adapter, to_hf_items
from stager.client.adapters.deepseek import DeepSeekV3Adapter
from stager.protocol import StagerError
from stager.writers.export_hf import export_snapshot

transformers = lazy_importorskip("transformers")

pytestmark = pytest.mark.fast  # the fast tier: no daemon process, no torch.distributed job

# HF config names; 8 experts in 2 groups, 1 group kept, top-2: group-limited routing does mask experts
CONFIG = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 24,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
EXPERT = "moe.routed_experts.inner_experts"  # torchtitan 0.3.0: w1_EFD, w2_EDF, w3_EFD ([E, out, in])
# torchtitan 0.3.0's names of a layer (N) of this config, and the earlier names of the same tensors
DENSE = [
    "attention_norm.weight",
    "ffn_norm.weight",
    "attention.wkv_a.weight",
    "attention.kv_norm.weight",
    "attention.wkv_b.weight",
    "attention.wo.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
]
MOE = [k for k in DENSE if not k.startswith("feed_forward.")] + [
    "moe.router.gate.weight",
    "moe.expert_bias_E",
    f"{EXPERT}.w1_EFD",
    f"{EXPERT}.w2_EDF",
    f"{EXPERT}.w3_EFD",
    "moe.shared_experts.w1.weight",
    "moe.shared_experts.w2.weight",
    "moe.shared_experts.w3.weight",
]
EARLIER = {
    f"{EXPERT}.w1_EFD": "moe.experts.w1",
    f"{EXPERT}.w2_EDF": "moe.experts.w2",
    f"{EXPERT}.w3_EFD": "moe.experts.w3",
    "moe.expert_bias_E": "moe.expert_bias",
    "lm_head.weight": "output.weight",
}


def hf_config(cfg: dict, **extra) -> dict:
    """A full transformers config dict (what config.json holds); HF spells "no q LoRA" None, torchtitan 0."""
    kwargs = {k: v for k, v in cfg.items() if k != "rope_theta"}
    kwargs["q_lora_rank"] = cfg["q_lora_rank"] or None
    return transformers.DeepseekV3Config(**kwargs, rope_theta=cfg["rope_theta"], **extra).to_dict()


def native_names(cfg: dict) -> list[str]:
    q = (
        ["attention.wq_a.weight", "attention.q_norm.weight", "attention.wq_b.weight"]
        if cfg["q_lora_rank"]
        else ["attention.wq.weight"]
    )
    layers = [
        f"layers.{i}.{k}"
        for i in range(cfg["num_hidden_layers"])
        for k in q + (DENSE if i < cfg["first_k_dense_replace"] else MOE)
    ]
    return ["tok_embeddings.weight", "norm.weight", "lm_head.weight", *layers]


def split_experts(hf_sd: dict) -> dict:
    """transformers 5 keeps a layer's experts fused in memory (gate_up_proj [E, 2I, H], down_proj [E, H, I]);
    checkpoints (and the adapter) hold one gate/up/down_proj per expert."""
    out = {}
    for k, v in hf_sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            gate, up = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                out[f"{k[: -len('gate_up_proj')]}{e}.gate_proj.weight"] = gate[e]
                out[f"{k[: -len('gate_up_proj')]}{e}.up_proj.weight"] = up[e]
        elif k.endswith("mlp.experts.down_proj"):
            for e in range(v.shape[0]):
                out[f"{k[: -len('down_proj')]}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


def make_hf(hf_cfg: dict):
    """transformers' DeepseekV3 with random, non-trivial norms and expert biases."""
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config.from_dict(hf_cfg)).eval()
    with torch.no_grad():
        for name, t in hf.state_dict().items():
            if "norm" in name:
                t.uniform_(0.5, 1.5)
            elif name.endswith("e_score_correction_bias"):
                t.normal_(0, 0.3)
    return hf


def assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "q_lora_rank,rope_interleave",
    [(24, True), (0, True), (24, False)],
    ids=["q lora", "plain wq", "q lora, rotate_half rope"],
)
def test_from_hf_gives_torchtitan_names_and_to_hf_gives_the_hf_model_back(q_lora_rank, rope_interleave):
    cfg = dict(CONFIG, q_lora_rank=q_lora_rank)
    hf_cfg = hf_config(cfg, rope_interleave=rope_interleave)
    hf_sd = split_experts(make_hf(hf_cfg).state_dict())
    native = load_adapter("deepseek_v3", hf_cfg).from_hf(hf_sd)  # nothing seen yet: torchtitan 0.3.0's names
    assert sorted(native) == sorted(native_names(cfg))
    assert tuple(native[f"layers.1.{EXPERT}.w2_EDF"].shape) == (8, 32, 16)  # [E, D, F]
    adapter = load_adapter("deepseek_v3", hf_cfg)
    assert_same(dict(to_hf_items(adapter, native.items())), hf_sd)
    assert_same(adapter.from_hf(hf_sd), native)
    if not rope_interleave:  # the rope rows are permuted (torchtitan interleaves, this HF config does not)
        assert not torch.equal(
            native["layers.0.attention.wkv_a.weight"], hf_sd["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
        )


def test_grouped_experts_split_per_tensor_into_linear_weights():
    adapter = load_adapter("deepseek_v3", hf_config(CONFIG))
    w1 = torch.randn(8, 16, 32)  # [experts, moe_intermediate_size, hidden_size]
    for name in (f"layers.2.{EXPERT}.w1_EFD", "layers.2.moe.experts.w1"):
        items = adapter.to_hf_items(name, w1)
        assert [k for k, _ in items] == [f"model.layers.2.mlp.experts.{e}.gate_proj.weight" for e in range(8)]
        assert all(t._base is w1 and torch.equal(t, w1[e]) for e, (_, t) in enumerate(items))  # views, no copy
    down = adapter.to_hf_items(f"layers.2.{EXPERT}.w2_EDF", torch.empty(8, 32, 16, device="meta"))  # plans on meta
    assert len(down) == 8 and down[3][0] == "model.layers.2.mlp.experts.3.down_proj.weight"
    assert tuple(down[3][1].shape) == (32, 16)
    for counts in ("layers.2.moe.tokens_per_expert_E", "layers.2.moe.tokens_per_expert"):  # persisted by some versions
        assert adapter.to_hf_items(counts, torch.zeros(8)) == []


def earlier(native: dict, transpose: bool) -> dict:
    """The same tensors under the earlier torchtitan names; early versions' experts were [E, in, out]."""
    out = {}
    for k, v in native.items():
        for new, old in EARLIER.items():
            if k.endswith(new):
                k = k[: -len(new)] + old
                if transpose and ".moe.experts." in k:
                    v = v.transpose(1, 2).contiguous()
        out[k] = v
    return out


@pytest.mark.parametrize("transpose", [False, True], ids=["out_in", "early in_out"])
def test_earlier_torchtitan_names_and_layout_convert_and_come_back(transpose):
    hf_cfg = hf_config(CONFIG)
    hf_sd = split_experts(make_hf(hf_cfg).state_dict())
    old = earlier(load_adapter("deepseek_v3", hf_cfg).from_hf(hf_sd), transpose)
    adapter = DeepSeekV3Adapter(hf_cfg)
    assert_same(adapter.to_hf(old), hf_sd)
    assert adapter.expert_layout == ("in_out" if transpose else "out_in")
    assert_same(adapter.from_hf(hf_sd), old)  # the names and layout to_hf saw
    if transpose:
        with pytest.raises(StagerError, match=r"experts.w1: .*\(in_out expert layout, but this adapter uses out_in\)"):
            DeepSeekV3Adapter(hf_cfg, expert_layout="out_in").to_hf(old)


def test_mtp_layers_are_the_hub_checkpoints_next_layers():
    adapter = load_adapter("deepseek_v3", hf_config(CONFIG))  # 3 main layers: MTP layer 0 is HF's layer 3
    h = CONFIG["hidden_size"]
    sd = {
        "mtp_layers.0.enorm.weight": torch.randn(h),
        "mtp_layers.0.eh_proj.weight": torch.randn(h, 2 * h),
        "mtp_layers.0.mtp_norm.weight": torch.randn(h),
        "mtp_layers.0.moe.expert_bias_E": torch.randn(8),
        f"mtp_layers.0.{EXPERT}.w3_EFD": torch.randn(8, 16, 32),
    }
    hf_sd = adapter.to_hf(sd)
    assert {
        "model.layers.3.enorm.weight",
        "model.layers.3.eh_proj.weight",
        "model.layers.3.shared_head.norm.weight",
        "model.layers.3.mlp.gate.e_score_correction_bias",
        "model.layers.3.mlp.experts.7.up_proj.weight",
    } <= set(hf_sd)
    assert_same(load_adapter("deepseek_v3", hf_config(CONFIG)).from_hf(hf_sd), sd)


Z = torch.zeros


@pytest.mark.parametrize(
    "sd,text",
    [
        ({"layers.1.moe.mystery": Z(2)}, "layers.1.moe.mystery: the deepseek_v3 adapter does not know this key"),
        ({"frobnicator": Z(2)}, "frobnicator: the deepseek_v3 adapter does not know this key"),
        ({"layers.1.moe.experts.w9": Z(8, 16, 32)}, "layers.1.moe.experts.w9: the deepseek_v3 adapter does not know"),
        ({f"layers.1.{EXPERT}.w4_EFD": Z(8, 16, 32)}, "inner_experts.w4_EFD: the deepseek_v3 adapter does not know"),
        ({f"layers.1.{EXPERT}.w1_EFD": Z(8, 16, 30)}, "w1_EFD: shape [8, 16, 30] contradicts the config"),
        ({f"layers.1.{EXPERT}.w1_EFD": Z(8, 32, 16)}, "w1_EFD: shape [8, 32, 16] contradicts the config"),  # [E, F, D]
        (
            {"layers.1.moe.experts.w1": Z(8, 16, 30)},
            "layers.1.moe.experts.w1: shape [8, 16, 30] contradicts the config",
        ),
        ({f"layers.1.{EXPERT}.w2_EDF": Z(7, 32, 16)}, "w2_EDF: shape [7, 32, 16] contradicts the config"),
        ({"layers.1.moe.expert_bias_E": Z(7)}, "expert_bias_E: shape [7] contradicts the config"),
        (
            {"layers.0.attention.wq.weight": Z(128, 32)},
            "wq.weight: shape [128, 32] contradicts the config (q_lora_rank=24",
        ),
        ({"layers.0.attention.wkv_a.weight": Z(16, 32)}, "wkv_a.weight: shape [16, 32] contradicts the config"),
        ({"layers.0.moe.router.gate.weight": Z(8, 32)}, "layer 0 is dense by the config"),
        ({"layers.1.feed_forward.w1.weight": Z(48, 32)}, "layer 1 is MoE by the config"),
        ({"layers.1.enorm.weight": Z(32)}, "layers.1.enorm.weight: enorm.weight belongs to an MTP layer"),
        ({"layers.3.attention_norm.weight": Z(32)}, "layers.3.attention_norm.weight: layer 3 contradicts the config"),
    ],
    ids=[
        "unknown layer key",
        "unknown top key",
        "unknown expert",
        "unknown 0.3.0 expert",
        "bad expert shape",
        "0.3.0 expert transposed",
        "bad earlier expert shape",
        "bad expert count",
        "bad expert bias",
        "wq with q lora",
        "bad wkv_a",
        "moe in dense layer",
        "dense in moe layer",
        "mtp key in a main layer",
        "layer past the config",
    ],
)
def test_to_hf_errors_name_the_key(sd, text):
    with pytest.raises(StagerError) as info:
        load_adapter("deepseek_v3", hf_config(CONFIG)).to_hf(sd)
    assert text in info.value.message


def test_mtp_layers_need_num_hidden_layers():
    cfg = {k: v for k, v in hf_config(CONFIG).items() if k != "num_hidden_layers"}
    with pytest.raises(StagerError, match=r"mtp_layers.0.enorm.weight: .*pass hf_config with num_hidden_layers"):
        load_adapter("deepseek_v3", cfg).to_hf({"mtp_layers.0.enorm.weight": Z(32)})


def test_from_hf_errors_name_the_key():
    adapter = load_adapter("deepseek_v3", hf_config(CONFIG))
    hf_sd = split_experts(make_hf(hf_config(CONFIG)).state_dict())
    gone = "model.layers.2.mlp.experts.3.up_proj.weight"
    cases = [
        ({k: v for k, v in hf_sd.items() if k != gone}, f"{gone} is missing"),
        (
            {**hf_sd, "model.layers.2.mlp.experts.8.up_proj.weight": Z(16, 32)},
            "experts.8.up_proj.weight: expert 8 contradicts the config",
        ),
        (
            {**hf_sd, "model.layers.1.mlp.experts.0.up_proj.weight": Z(16, 30)},
            "experts.0.up_proj.weight: shape [16, 30] contradicts the config",
        ),
        ({**hf_sd, "model.layers.1.self_attn.mystery": Z(2)}, "self_attn.mystery: the deepseek_v3 adapter does not"),
    ]
    for bad, text in cases:
        with pytest.raises(StagerError) as info:
            adapter.from_hf(bad)
        assert text in info.value.message


def test_missing_config_keys_are_named():
    with pytest.raises(StagerError, match="needs hf_config with kv_lora_rank, first_k_dense_replace"):
        load_adapter(
            "deepseek_v3", {k: v for k, v in CONFIG.items() if k not in ("kv_lora_rank", "first_k_dense_replace")}
        )
    with pytest.raises(StagerError, match="needs hf_config with hidden_size"):
        load_adapter("deepseek_v3")


class Snapshot(dict):  # what export_snapshot reads: name -> tensor, a step and model_info
    step, model_info = 5, {}


def test_sharded_export_loads_with_from_pretrained(tmp_path):
    hf_cfg = hf_config(CONFIG)
    reference = make_hf(hf_cfg)
    native = load_adapter("deepseek_v3", hf_cfg).from_hf(split_experts(reference.state_dict()))
    sd = {**native, "layers.1.moe.tokens_per_expert_E": Z(8)}  # dropped: not a weight
    path = export_snapshot(Snapshot(sd), str(tmp_path), adapter="deepseek_v3", hf_config=hf_cfg, max_shard_size="40KB")
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in index["weight_map"]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(tokens).logits, reference(tokens).logits, rtol=1e-6, atol=1e-6)
    assert not [k for k in index["weight_map"] if "tokens_per_expert" in k]
