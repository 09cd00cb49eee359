"""Every built-in adapter against the real upstream models: torchtitan's (installed from PyPI) on the
native side, transformers' on the HF side, so an upstream rename or layout change fails here.

For each of llama3, qwen3 and deepseek_v3: (a) our ``to_hf`` of a torchtitan model's state dict is
bit for bit torchtitan's own StateDictAdapter.to_hf (names and tensors); (b) loaded into transformers'
model of the same config, it gives torchtitan's logits (fp32); (c) ``from_hf`` gives the state dict
back exactly. Plus one end-to-end run: a torchtitan DeepSeek-V3 under FSDP2 on 2 gloo ranks, staged to a
daemon, exported with export_hf and loaded with AutoModelForCausalLM.from_pretrained.

torchtitan 0.3.0 imports triton at model import (its EP kernels) and needs spmd_types and tyro:
``pip install --no-deps torchtitan==0.3.0 triton==3.8.0 spmd_types==0.2.3 tyro==1.0.17 docstring-parser==0.18.0
typeguard==4.6.0`` (its declared requirements also pull datasets, wandb, tensorboard ... that the models
do not use). CPU-only choices here: attention is torchtitan's ScaledDotProductAttention (its flex kernel
needs torch.compile, slow on CPU and unstable on partial blocks); its GroupedExperts run their GEMMs in
bf16, made fp32 for the logits comparison (see ``fp32_experts``).
"""

import contextlib
import dataclasses
import functools
import importlib.util
import re

import pytest
import torch

from helpers import lazy_import, lazy_importorskip

torchtitan = lazy_importorskip("torchtitan")
if importlib.util.find_spec("transformers") is None:  # imported where used: the spawned ranks never need it
    pytest.skip("transformers is not installed", allow_module_level=True)

# imported at first use, in a test (seconds: not while pytest collects); installed, so their imports must work
deepseek_v3, llama3, qwen3 = (lazy_import(f"torchtitan.models.{m}") for m in ("deepseek_v3", "llama3", "qwen3"))
ScaledDotProductAttention = lazy_import("torchtitan.models.common.attention", "ScaledDotProductAttention")
make_gqa_config = lazy_import("torchtitan.models.common.config_utils", "make_gqa_config")

from stager.client.adapters import load_adapter, to_hf_items  # noqa: E402

SEQ = 128  # a full 128-token block, whatever the attention backend


# ---- torchtitan models ---------------------------------------------------------------------------


def titan_config(module, flavor: str = "debugmodel", **kwargs):
    """torchtitan's model config for ``flavor``, with the CPU attention backend on every layer."""
    cfg = module.model_registry(flavor, **kwargs).model
    for layer in [*cfg.layers, *getattr(cfg, "mtp_layers", [])]:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return cfg


def build(cfg, seed: int = 0):
    """The torchtitan model, initialised as torchtitan does, then made less uniform (norms, expert
    biases) so that a swapped or mis-laid tensor changes the logits."""
    torch.manual_seed(seed)
    model = cfg.build()
    model.init_states()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias_E"):
                b.normal_(0, 0.05)
    return model.eval()


def dsv3_sigmoid_config(layers: int = 3, q_lora_rank: int = 0):
    """DeepSeek-V3's debugmodel with DeepSeek-V3's own routing (sigmoid scores, group-limited top-k,
    normalised and scaled weights; the debugmodel routes by softmax, which transformers' DeepseekV3
    has not) on fewer layers, optionally with a q LoRA (as the large flavors)."""
    cfg = titan_config(deepseek_v3)
    cfg.layers = cfg.layers[:layers]
    for layer in cfg.layers:
        if layer.moe is not None:
            r = layer.moe.router
            r.score_func, r.route_norm, r.route_scale = "sigmoid", True, 2.5
            r.num_expert_groups, r.num_limited_groups = 2, 1
        a = layer.attention
        if q_lora_rank:
            rows = a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
            a.wq_a = dataclasses.replace(a.wq, out_features=q_lora_rank)
            a.wq_b = dataclasses.replace(a.wq, in_features=q_lora_rank, out_features=rows)
            a.q_norm = dataclasses.replace(a.kv_norm, normalized_shape=q_lora_rank)
            a.wq, a.q_lora_rank = None, q_lora_rank
    return cfg


def llama3_gqa_config(n_kv_heads: int = 4, layers: int = 3):
    """Llama 3's debugmodel (no GQA: 16 kv heads) with grouped-query attention, as the real flavors
    (k rows are permuted per kv head)."""
    cfg = titan_config(llama3)
    cfg.layers = cfg.layers[:layers]
    for layer in cfg.layers:
        a = layer.attention
        layer.attention = make_gqa_config(
            dim=a.dim,
            n_heads=a.n_heads,
            n_kv_heads=n_kv_heads,
            fuse_qkv=True,
            rope=a.rope,
            wqkv_param_init={"weight": functools.partial(torch.nn.init.trunc_normal_, std=0.02)},
            wo_param_init=a.wo.param_init,
            inner_attention=ScaledDotProductAttention.Config(),
        )
    return cfg


@contextlib.contextmanager
def fp32_experts():
    """torchtitan's GroupedExperts cast activations and weights to bf16 for their grouped GEMMs
    (common/moe.py), transformers' experts run in fp32: for an fp32 comparison, make ``.bfloat16()``
    a no-op during the torchtitan forward (torch._grouped_mm runs fp32 on CPU)."""
    real = torch.Tensor.bfloat16
    torch.Tensor.bfloat16 = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.bfloat16 = real


# ---- the HF configs of the same models -----------------------------------------------------------


def _rope(cfg):
    return cfg.layers[0].attention.rope


def llama3_hf_config(cfg) -> dict:
    import transformers

    attn, rope = cfg.layers[0].attention, _rope(cfg)
    assert rope.scaling == "llama"
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=len(cfg.layers),
        intermediate_size=cfg.layers[0].feed_forward.w1.out_features,
        num_attention_heads=attn.n_heads,
        num_key_value_heads=attn.n_kv_heads or attn.n_heads,
        rms_norm_eps=cfg.norm.eps,
        max_position_embeddings=rope.max_seq_len,
        tie_word_embeddings=cfg.enable_weight_tying,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": rope.theta,
            "factor": rope.scaling_factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        },
    ).to_dict()


def qwen3_hf_config(cfg) -> dict:
    import transformers

    attn, rope = cfg.layers[0].attention, _rope(cfg)
    assert rope.scaling == "none" and attn.qk_norm.eps == cfg.norm.eps
    return transformers.Qwen3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=len(cfg.layers),
        intermediate_size=cfg.layers[0].feed_forward.w1.out_features,
        num_attention_heads=attn.n_heads,
        num_key_value_heads=attn.n_kv_heads,
        head_dim=attn.head_dim,
        rms_norm_eps=cfg.norm.eps,
        max_position_embeddings=rope.max_seq_len,
        tie_word_embeddings=cfg.enable_weight_tying,
        rope_parameters={"rope_type": "default", "rope_theta": rope.theta},
    ).to_dict()


def deepseek_v3_hf_config(cfg, **extra) -> dict:
    import transformers

    layers = cfg.layers
    attn, rope = layers[0].attention, _rope(cfg)
    dense = [i for i, layer in enumerate(layers) if layer.moe is None]
    moe = next(layer.moe for layer in layers if layer.moe is not None)
    router, experts = moe.router, moe.routed_experts.inner_experts
    assert dense == list(range(len(dense))) and rope.scaling == "yarn"
    mscale = attn.mscale  # torchtitan folds it into the softmax scale: transformers' mscale_all_dim
    return transformers.DeepseekV3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=len(layers),
        intermediate_size=layers[0].feed_forward.w1.out_features,
        moe_intermediate_size=experts.hidden_dim,
        num_attention_heads=attn.n_heads,
        num_key_value_heads=attn.n_heads,
        n_shared_experts=moe.shared_experts.w1.out_features // experts.hidden_dim,
        n_routed_experts=moe.num_experts,
        num_experts_per_tok=router.top_k,
        n_group=router.num_expert_groups or 1,
        topk_group=router.num_limited_groups or 1,
        norm_topk_prob=router.route_norm,
        routed_scaling_factor=router.route_scale,
        first_k_dense_replace=len(dense),
        q_lora_rank=attn.q_lora_rank or None,
        kv_lora_rank=attn.kv_lora_rank,
        qk_nope_head_dim=attn.qk_nope_head_dim,
        qk_rope_head_dim=attn.qk_rope_head_dim,
        v_head_dim=attn.v_head_dim,
        rms_norm_eps=cfg.norm.eps,
        max_position_embeddings=int(rope.original_seq_len * rope.rope_factor),  # as DeepSeek-V3's own config
        tie_word_embeddings=cfg.enable_weight_tying,
        num_nextn_predict_layers=len(getattr(cfg, "mtp_layers", [])),
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": rope.theta,
            "factor": rope.rope_factor,
            "beta_fast": rope.beta_fast,
            "beta_slow": rope.beta_slow,
            "mscale": mscale,
            "mscale_all_dim": mscale,
            "original_max_position_embeddings": rope.original_seq_len,
        },
        **extra,
    ).to_dict()


HF_CONFIG = {"llama3": llama3_hf_config, "qwen3": qwen3_hf_config, "deepseek_v3": deepseek_v3_hf_config}
TITAN_ADAPTER = {
    "llama3": lazy_import("torchtitan.models.llama3", "Llama3StateDictAdapter"),
    "qwen3": lazy_import("torchtitan.models.qwen3", "Qwen3StateDictAdapter"),
    "deepseek_v3": lazy_import("torchtitan.models.deepseek_v3", "DeepSeekV3StateDictAdapter"),
}
HF_MODEL = {"llama3": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


# ---- comparisons ---------------------------------------------------------------------------------


def assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    bad = [k for k in want if got[k].shape != want[k].shape or not torch.equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def fuse_experts(hf_sd: dict) -> dict:
    """transformers 5 keeps a layer's experts fused in memory (gate_up_proj [E, 2I, H], down_proj [E, H, I]);
    from_pretrained fuses a checkpoint's per-expert keys, load_state_dict does not."""
    out, per = {}, {}
    for k, v in hf_sd.items():
        m = re.match(r"(.+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$", k)
        if m:
            per.setdefault((m[1], m[3]), {})[int(m[2])] = v
        else:
            out[k] = v
    for prefix in {p for p, _ in per}:

        def stack(proj):
            return torch.stack([per[prefix, proj][e] for e in sorted(per[prefix, proj])])

        out[f"{prefix}.gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], 1)
        out[f"{prefix}.down_proj"] = stack("down_proj")
    return out


def hf_model(name: str, hf_cfg: dict, hf_sd: dict):
    import transformers

    cls = getattr(transformers, HF_MODEL[name])
    model = cls(cls.config_class.from_dict(hf_cfg)).eval()
    missing, unexpected = model.load_state_dict(fuse_experts(hf_sd), strict=False)
    assert not unexpected and not [m for m in missing if m != "lm_head.weight" or not hf_cfg["tie_word_embeddings"]]
    if hf_cfg["tie_word_embeddings"]:
        model.tie_weights()
    return model


def assert_same_logits(hf, titan, vocab: int):
    tokens = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), fp32_experts():
        want = titan(tokens)
    with torch.no_grad():
        got = hf(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---- (a) torchtitan's own to_hf, bit for bit; (c) from_hf back ------------------------------------

# (adapter, torchtitan config) cases: the debugmodel flavors, and custom args of the same classes
CASES = {
    "llama3": ("llama3", lambda: titan_config(llama3)),
    "llama3 gqa": ("llama3", llama3_gqa_config),
    "qwen3": ("qwen3", lambda: titan_config(qwen3)),
    "deepseek_v3": ("deepseek_v3", lambda: titan_config(deepseek_v3)),
    "deepseek_v3 mtp": ("deepseek_v3", lambda: titan_config(deepseek_v3, num_mtp_layers=1)),
    "deepseek_v3 q lora": ("deepseek_v3", lambda: dsv3_sigmoid_config(q_lora_rank=96)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_to_hf_is_torchtitans_own_and_from_hf_round_trips(case):
    name, make_config = CASES[case]
    cfg = make_config()
    sd = build(cfg).state_dict()
    hf_cfg = HF_CONFIG[name](cfg)
    titan_adapter_cls = TITAN_ADAPTER[name]
    adapter = load_adapter(name, hf_cfg)
    ours = dict(to_hf_items(adapter, sd.items()))  # per tensor, as readers and exporters convert
    assert_same_tensors(ours, titan_adapter_cls(cfg, None).to_hf(dict(sd)))
    assert_same_tensors(adapter.from_hf(ours), sd)
    # a fresh adapter (nothing seen) writes torchtitan 0.3.0's names, and so does torchtitan's from_hf
    assert_same_tensors(load_adapter(name, hf_cfg).from_hf(ours), sd)
    assert_same_tensors(titan_adapter_cls(cfg, None).from_hf(dict(ours)), sd)


def test_deepseek_v3_real_names_are_the_ones_the_issue_saw():
    cfg = titan_config(deepseek_v3)
    with torch.device("meta"):
        names = set(cfg.build().state_dict())
    for key in (
        "lm_head.weight",
        "layers.1.moe.expert_bias_E",
        "layers.1.moe.routed_experts.inner_experts.w1_EFD",
        "layers.1.moe.routed_experts.inner_experts.w2_EDF",
        "layers.1.moe.routed_experts.inner_experts.w3_EFD",
    ):
        assert key in names
    adapter = load_adapter("deepseek_v3", deepseek_v3_hf_config(cfg))
    w2 = torch.empty(8, 256, 256, device="meta")
    got = adapter.to_hf_items("layers.1.moe.routed_experts.inner_experts.w2_EDF", w2)
    assert [k for k, _ in got][:2] == [
        "model.layers.1.mlp.experts.0.down_proj.weight",
        "model.layers.1.mlp.experts.1.down_proj.weight",
    ]
    bias = torch.zeros(8)
    got = adapter.to_hf_items("layers.1.moe.expert_bias_E", bias)
    assert got == [("model.layers.1.mlp.gate.e_score_correction_bias", bias)]


@pytest.mark.parametrize("case", ["llama3", "llama3 gqa", "qwen3"])
def test_fused_qkv_parameter_splits_as_torchtitans_state_dict(case):
    """named_parameters() has torchtitan's fused ``qkv_linear.wqkv``; its state dict splits it (a hook):
    both convert to the same HF tensors."""
    name, make_config = CASES[case]
    cfg = make_config()
    model = build(cfg)
    params = dict(model.named_parameters())
    assert "layers.0.attention.qkv_linear.wqkv.weight" in params
    hf_cfg = HF_CONFIG[name](cfg)
    assert_same_tensors(load_adapter(name, hf_cfg).to_hf(params), load_adapter(name, hf_cfg).to_hf(model.state_dict()))


# ---- (b) the same logits in transformers -----------------------------------------------------------


@pytest.mark.parametrize("case", ["llama3", "llama3 gqa", "qwen3"])
def test_dense_models_give_torchtitans_logits_in_transformers(case):
    name, make_config = CASES[case]
    cfg = make_config()
    cfg.layers = cfg.layers[:3]
    titan = build(cfg)
    hf_cfg = HF_CONFIG[name](cfg)
    hf = hf_model(name, hf_cfg, load_adapter(name, hf_cfg).to_hf(titan.state_dict()))
    assert_same_logits(hf, titan, cfg.vocab_size)


@pytest.mark.parametrize(
    "q_lora_rank,rope_interleave",
    [(0, True), (96, True), (96, False)],
    ids=["plain wq", "q lora", "q lora, rotate_half rope"],
)
def test_deepseek_v3_gives_torchtitans_logits_in_transformers(q_lora_rank, rope_interleave):
    cfg = dsv3_sigmoid_config(q_lora_rank=q_lora_rank)
    titan = build(cfg)
    hf_cfg = deepseek_v3_hf_config(cfg, rope_interleave=rope_interleave)
    adapter = load_adapter("deepseek_v3", hf_cfg)
    sd = titan.state_dict()
    hf_sd = dict(to_hf_items(adapter, sd.items()))
    assert ("model.layers.0.self_attn.q_a_proj.weight" in hf_sd) == bool(q_lora_rank)
    assert_same_logits(hf_model("deepseek_v3", hf_cfg, hf_sd), titan, cfg.vocab_size)
    assert_same_tensors(adapter.from_hf(hf_sd), sd)


# ---- end to end: FSDP2 ranks -> daemon -> export_hf -> from_pretrained -----------------------------


def stage_fsdp2_deepseek(rank, world, endpoint, hf_cfg):
    """One rank: the torchtitan DeepSeek-V3 under FSDP2 (each block, then the root, as torchtitan
    shards it), its state dict (DTensors) staged to the node's daemon."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from stager.client import StagingClient

    torch.set_num_threads(1)
    model = build(dsv3_sigmoid_config())  # the same seed on every rank: the same weights
    mesh = init_device_mesh("cpu", (world,))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sd = model.state_dict()
    sharded = sorted(k for k, v in sd.items() if isinstance(v, DTensor))
    with StagingClient(endpoint, strict=True) as client:
        client.stage(sd, step=3, model_info={"adapter": "deepseek_v3", "hf_config": hf_cfg}).wait(60)
    return sharded


def test_fsdp2_deepseek_v3_staged_exports_and_loads_with_from_pretrained(tmp_path):
    import transformers

    from stager.dev.launch import DaemonProcess, run_ranks
    from stager.writers.export_hf import export_hf

    cfg = dsv3_sigmoid_config()
    hf_cfg = deepseek_v3_hf_config(cfg)
    with DaemonProcess(args=("--memory-limit", "256MiB")) as daemon:
        sharded = run_ranks(stage_fsdp2_deepseek, 2, daemon.endpoint, hf_cfg, timeout=120)
        (path,) = export_hf(
            str(tmp_path), endpoint=daemon.endpoint, adapter="deepseek_v3", hf_config=hf_cfg, max_shard_size="20MB"
        )
    assert "layers.1.moe.routed_experts.inner_experts.w1_EFD" in sharded[0]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_same_logits(hf.eval(), build(cfg), cfg.vocab_size)


# ---- the way back in: a transformers checkpoint -> load-hf -> restore into torchtitan ---------------


@pytest.mark.parametrize("case", ["llama3 gqa", "deepseek_v3"])
def test_a_transformers_checkpoint_loads_and_restores_into_torchtitan_with_its_logits(case, tmp_path):
    """save_pretrained (sharded safetensors; DeepSeek-V3's experts fused in memory, per expert on disk)
    -> ``load_hf`` through the adapter's from_hf (experts merged back into grouped tensors) -> a
    torchtitan model of another init restored in place from the daemon: the same logits."""
    import transformers

    from stager.client import StagingClient
    from stager.dev.launch import DaemonProcess
    from stager.loaders.load_hf import load_hf

    name, make_config = {"llama3 gqa": CASES["llama3 gqa"], "deepseek_v3": ("deepseek_v3", dsv3_sigmoid_config)}[case]
    cfg = make_config()
    hf_cfg = HF_CONFIG[name](cfg)
    cls = getattr(transformers, HF_MODEL[name])
    torch.manual_seed(3)
    hf = hf_model(name, hf_cfg, load_adapter(name, hf_cfg).to_hf(build(cfg, seed=3).state_dict()))
    hf.save_pretrained(tmp_path / "hf", max_shard_size="2MB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    titan = build(cfg, seed=11)  # other weights: only the restore makes the logits equal
    sd = titan.state_dict()
    with DaemonProcess(args=("--memory-limit", "256MiB")) as daemon:
        report = load_hf(str(tmp_path / "hf"), endpoint=daemon.endpoint, adapter=name)
        assert report["files"] > 1
        with StagingClient(daemon.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
            assert client.restore(sd) == 0
    titan.load_state_dict(sd)  # torchtitan's fused qkv: its state dict is a split copy, loaded back through its hook
    assert type(cls.from_pretrained(tmp_path / "hf")).__name__ == HF_MODEL[name]
    assert_same_logits(hf, titan, cfg.vocab_size)
