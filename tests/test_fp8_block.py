"""FP8 block quantization: stager's quantizer against vLLM's (bit for bit), against transformers' (where the two
can agree), and which HF weights each architecture's FP8 checkpoints quantize."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import lazy_import, vllm_per_block_cast_to_fp8
from stager.client.adapters import load_adapter, with_prefix
from stager.client.adapters.fp8_scope import (
    Fp8Scope,
    deepseek_v3_fp8_weight,
    fp8_scope,
    llama_fp8_weight,
    scale_name,
)
from stager.protocol import ErrorCode, HFConfigError, StagerError
from stager.protocol.fp8_block import E4M3, dequantize_block_fp8, quantize_block_fp8
from stager.protocol.quant import QuantSpec, dequantize

pytestmark = pytest.mark.fast  # the fast tier: no daemon process, no torch.distributed job

Fp8Quantize = lazy_import("transformers.integrations.finegrained_fp8", "Fp8Quantize")
FineGrainedFP8Config = lazy_import("transformers.utils.quantization_config", "FineGrainedFP8Config")
should_convert_module = lazy_import("transformers.quantizers.quantizers_utils", "should_convert_module")


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (e4m3 bytes, fp32 bits: -0.0 and NaN payloads included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (576, 7168), (1, 1), (129, 127), (128, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantizer_equals_vllms_bit_for_bit(shape, dtype):
    torch.manual_seed(sum(shape))
    w = (torch.randn(shape) * 0.02).to(dtype)
    data, scale_inv = quantize_block_fp8(w, (128, 128))
    ref_data, ref_scale = vllm_per_block_cast_to_fp8(w)
    assert same(data, ref_data) and same(scale_inv, ref_scale)
    assert data.dtype == E4M3 and scale_inv.dtype == torch.float32
    assert tuple(scale_inv.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 300),
    cols=st.integers(1, 300),
    block=st.sampled_from([(128, 128), (64, 32), (7, 200)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    magnitude=st.integers(-7, 4),
    zero_rows=st.integers(0, 300),
    seed=st.integers(0, 2**31),
)
def test_quantizer_equals_vllms_for_any_shape_block_and_magnitude(rows, cols, block, dtype, magnitude, zero_rows, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 10.0**magnitude
    w[:zero_rows] = 0  # whole zero blocks (scale_inv 1e-4 / 448) and blocks of tiny values beside large ones
    w = w.to(dtype)
    data, scale_inv = quantize_block_fp8(w, block)
    ref_data, ref_scale = vllm_per_block_cast_to_fp8(w, block)
    assert same(data, ref_data) and same(scale_inv, ref_scale)


def test_zero_blocks_empty_weights_and_what_is_refused():
    data, scale_inv = quantize_block_fp8(torch.zeros(130, 10))
    assert same(scale_inv, vllm_per_block_cast_to_fp8(torch.zeros(130, 10))[1])
    assert (scale_inv == torch.tensor(1e-4) / 448).all()  # fp32 1e-4, divided in fp32
    assert not data.float().any()
    data, scale_inv = quantize_block_fp8(torch.zeros(0, 300))
    assert data.shape == (0, 300) and scale_inv.shape == (0, 3)
    for bad in (torch.zeros(4), torch.zeros(2, 2, 2), torch.zeros(4, 4, dtype=torch.int32), torch.zeros(4, 4).to(E4M3)):
        with pytest.raises(StagerError) as info:
            quantize_block_fp8(bad)
        assert info.value.code == ErrorCode.BAD_VALUE and "2-D high-precision weight" in info.value.message
    with pytest.raises(StagerError, match="two positive integers"):
        quantize_block_fp8(torch.zeros(4, 4), (0, 128))


@pytest.mark.parametrize("shape", [(256, 384), (300, 200)])
def test_dequantize_is_the_readers_and_within_half_an_e4m3_step(shape):
    torch.manual_seed(1)
    w = torch.randn(shape)
    data, scale_inv = quantize_block_fp8(w)
    back = dequantize_block_fp8(data, scale_inv)
    assert same(back, dequantize(data, scale_inv, QuantSpec("s", "mul", "f32"), torch.float32, (128, 128)))
    step = scale_inv.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    # e4m3 has 3 mantissa bits: a value rounds by at most 1/16 of its magnitude (normals), 2^-10 scale (subnormals)
    assert ((back - w).abs() <= torch.maximum(w.abs() / 16, step * 2.0**-10) * (1 + 1e-6)).all()
    assert dequantize_block_fp8(data, scale_inv, dtype=torch.bfloat16).dtype == torch.bfloat16


def transformers_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """transformers 5.23's own FP8 block quantizer (what save_pretrained of an FP8 model runs)."""
    from types import SimpleNamespace

    op = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config()))
    out = op.convert({"m.weight": w})  # ConversionOps' entry point, as save_pretrained's reverse mapping calls it
    return None if out["m.weight"] is w else (out["m.weight"], out["m.weight_scale_inv"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_quantizer_agrees_on_whole_blocks_up_to_the_order_of_divisions(dtype):
    """transformers multiplies by 448 / amax and stores 1 / (448 / amax); vLLM divides amax by 448 and multiplies
    by 1 / that. Same formula, other fp32 roundings: scales one or two ulps apart, and the rare value that sits on
    an e4m3 rounding boundary lands one step away. All-zero blocks: transformers stores 1.0."""
    pytest.importorskip("transformers")
    torch.manual_seed(2)
    w = (torch.randn(1024, 1024) * 0.02).to(dtype)
    w[:128, :128] = 0
    data, scale_inv = quantize_block_fp8(w)
    theirs, their_scale = transformers_quantize(w)
    assert their_scale[0, 0] == 1.0 and scale_inv[0, 0] == torch.tensor(1e-4) / 448
    nonzero = torch.ones_like(scale_inv, dtype=torch.bool)
    nonzero[0, 0] = False
    assert torch.allclose(their_scale[nonzero], scale_inv[nonzero], rtol=2.0**-22, atol=0)
    differ = data.view(torch.uint8) != theirs.view(torch.uint8)
    assert differ.float().mean() < 0.005  # measured: ~0.0005% of values from fp32, ~0.1% from bf16
    codes = data.view(torch.uint8)[differ].int(), theirs.view(torch.uint8)[differ].int()
    assert ((codes[0] - codes[1]).abs() == 1).all()  # one e4m3 step apart, same sign


def test_transformers_quantizer_leaves_partial_blocks_unquantized():
    pytest.importorskip("transformers")
    assert transformers_quantize(torch.randn(300, 256)) is None  # stager (and vLLM) pad with zeros instead
    data, scale_inv = quantize_block_fp8(torch.randn(300, 256))
    assert scale_inv.shape == (3, 2)


LLAMA_NAMES = [
    ("model.layers.0.self_attn.q_proj.weight", True),
    ("model.layers.11.self_attn.k_proj.weight", True),
    ("model.layers.0.self_attn.v_proj.weight", True),
    ("model.layers.0.self_attn.o_proj.weight", True),
    ("model.layers.3.mlp.gate_proj.weight", True),
    ("model.layers.3.mlp.up_proj.weight", True),
    ("model.layers.3.mlp.down_proj.weight", True),
    ("model.embed_tokens.weight", False),
    ("lm_head.weight", False),
    ("model.norm.weight", False),
    ("model.layers.0.input_layernorm.weight", False),
    ("model.layers.0.post_attention_layernorm.weight", False),
    ("model.layers.0.self_attn.q_norm.weight", False),
    ("model.layers.0.self_attn.k_norm.weight", False),
    ("model.layers.0.self_attn.q_proj.bias", False),
    ("model.layers.0.mlp.gate_proj.weight_scale_inv", False),
]
DEEPSEEK_NAMES = [
    ("model.layers.0.self_attn.q_proj.weight", True),
    ("model.layers.0.self_attn.q_a_proj.weight", True),
    ("model.layers.0.self_attn.q_b_proj.weight", True),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", True),
    ("model.layers.0.self_attn.kv_b_proj.weight", True),
    ("model.layers.0.self_attn.o_proj.weight", True),
    ("model.layers.0.mlp.gate_proj.weight", True),
    ("model.layers.0.mlp.down_proj.weight", True),
    ("model.layers.3.mlp.experts.255.up_proj.weight", True),
    ("model.layers.3.mlp.experts.0.down_proj.weight", True),
    ("model.layers.3.mlp.shared_experts.gate_proj.weight", True),
    ("model.layers.3.mlp.gate.weight", False),
    ("model.layers.3.mlp.gate.e_score_correction_bias", False),
    ("model.layers.0.self_attn.q_a_layernorm.weight", False),
    ("model.layers.0.self_attn.kv_a_layernorm.weight", False),
    ("model.layers.61.eh_proj.weight", False),
    ("model.layers.61.enorm.weight", False),
    ("model.layers.61.hnorm.weight", False),
    ("model.layers.61.shared_head.norm.weight", False),
    ("model.layers.61.self_attn.kv_b_proj.weight", True),
    ("model.layers.61.mlp.experts.7.gate_proj.weight", True),
    ("model.embed_tokens.weight", False),
    ("lm_head.weight", False),
    ("model.norm.weight", False),
]


@pytest.mark.parametrize("name,quantized", LLAMA_NAMES)
def test_llama_and_qwen3_fp8_checkpoints_quantize_the_attention_and_mlp_projections(name, quantized):
    assert llama_fp8_weight(name) is quantized


@pytest.mark.parametrize("name,quantized", DEEPSEEK_NAMES)
def test_deepseek_v3_fp8_checkpoint_quantizes_what_its_hub_checkpoint_does(name, quantized):
    """As deepseek-ai/DeepSeek-V3's model.safetensors.index.json: e4m3 with weight_scale_inv, or bf16."""
    assert deepseek_v3_fp8_weight(name) is quantized


LLAMA_CONFIG = {"hidden_size": 8, "num_attention_heads": 2}
DEEPSEEK_CONFIG = {
    "hidden_size": 8,
    "num_attention_heads": 2,
    "n_routed_experts": 2,
    "moe_intermediate_size": 4,
    "kv_lora_rank": 4,
    "qk_nope_head_dim": 2,
    "qk_rope_head_dim": 2,
    "v_head_dim": 2,
    "first_k_dense_replace": 1,
}


@pytest.mark.parametrize(
    "adapter,config,architecture",
    [
        ("llama3", LLAMA_CONFIG, "llama3"),
        ("qwen3", {**LLAMA_CONFIG, "head_dim": 4}, "qwen3"),
        ("deepseek_v3", DEEPSEEK_CONFIG, "deepseek_v3"),
        ("identity", {"model_type": "llama"}, "llama3"),
        ("identity", {"model_type": "qwen3"}, "qwen3"),
        ("identity", {"model_type": "deepseek_v3"}, "deepseek_v3"),
    ],
)
def test_the_scope_follows_the_adapter_or_for_hf_named_models_the_model_type(adapter, config, architecture):
    a = with_prefix(load_adapter(adapter, config), "model.")
    assert fp8_scope(a, config) == Fp8Scope(architecture)


def test_an_existing_fp8_quantization_config_gives_block_and_skips():
    quant = {
        "quant_method": "fp8",
        "weight_block_size": [64, 32],
        "modules_to_not_convert": ["model.layers.1", "mlp.down_proj", "v_proj"],
    }
    scope = fp8_scope(None, {"model_type": "llama", "quantization_config": quant})
    assert scope.block == (64, 32)
    assert [n for n, _ in LLAMA_NAMES if scope.quantizes(n)] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.11.self_attn.k_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.3.mlp.gate_proj.weight",
        "model.layers.3.mlp.up_proj.weight",
    ]
    assert scope.quantizes("model.layers.11.mlp.gate_proj.weight")  # "model.layers.1" stops at a module boundary
    assert not scope.quantizes("model.layers.1.mlp.gate_proj.weight")
    assert scope.quantization_config() == {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [64, 32],
        "modules_to_not_convert": [*quant["modules_to_not_convert"], "lm_head"],
    }
    other = fp8_scope(None, {"model_type": "llama", "quantization_config": {"quant_method": "awq", "bits": 4}})
    assert other == Fp8Scope("llama3")  # another method's fields are not FP8's
    assert scale_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight_scale_inv"


@pytest.mark.parametrize(
    "quant,field,text",
    [
        ({"weight_block_size": [128]}, "quantization_config.weight_block_size", "two integers"),
        ({"weight_block_size": [128, 0]}, "quantization_config.weight_block_size", "integers from 1"),
        ({"modules_to_not_convert": "lm_head"}, "quantization_config.modules_to_not_convert", "a list of module names"),
        (
            {"modules_to_not_convert": ["model.layers.(0"]},
            "quantization_config.modules_to_not_convert",
            "not as regexes",
        ),
        # a catastrophic-backtracking regex: compiled and matched, it ran for minutes on one module name
        ({"modules_to_not_convert": ["(.*.*)*x"]}, "quantization_config.modules_to_not_convert", "not as regexes"),
        (
            {"modules_to_not_convert": [r"model\.layers\.\d+\.mlp"]},
            "quantization_config.modules_to_not_convert",
            "literal module names",
        ),
        (
            {"modules_to_not_convert": ["model.layers.2."]},
            "quantization_config.modules_to_not_convert",
            "no dot at either end",
        ),
        ({"modules_to_not_convert": ["lm_head"] * 4097}, "quantization_config.modules_to_not_convert", "at most 4096,"),
        ({"modules_to_not_convert": ["m" * 257]}, "quantization_config.modules_to_not_convert", "1 to 256 characters"),
        ({"modules_to_not_convert": [""]}, "quantization_config.modules_to_not_convert", "1 to 256 characters"),
    ],
)
def test_a_wrong_quantization_config_field_is_named(quant, field, text):
    with pytest.raises(HFConfigError) as info:
        fp8_scope(None, {"model_type": "llama", "quantization_config": {"quant_method": "fp8", **quant}})
    assert info.value.field == field and text in info.value.message and info.value.code == ErrorCode.BAD_VALUE


SKIP_MODULES = [
    "model.layers.1",
    "model.layers.2",
    "lm_head",
    "v_proj",
    "proj",
    "mlp.gate",
    "up_proj",
    "model.layers.3.self_attn.q_proj",
    "layers.4",
    "model",
    "model.layers.5.mlp.gate_proj",
    "s.6.mlp",
]
MODULES = [
    f"model.layers.{i}.{m}"
    for i in (1, 2, 3, 4, 5, 6, 11, 21, 40)
    for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate", "mlp.gate_proj", "mlp.up_proj", "mlp")
]
MODULES += ["lm_head", "model.embed_tokens", "model.layers.1", "model.layers.11", "model", "x.model"]


@pytest.mark.parametrize("skip", [[s] for s in SKIP_MODULES] + [SKIP_MODULES[:3], SKIP_MODULES[4:9]])
def test_skipped_modules_are_matched_as_transformers_matches_plain_names(skip):
    """Literal prefixes up to a module boundary, and suffixes: as transformers' should_convert_module (which
    compiles each entry as a regex; for names without regex characters but '.', the same sets)."""
    scope = Fp8Scope("llama3", skip=tuple(skip))
    assert [m for m in MODULES if scope.skipped(m)] == [m for m in MODULES if not should_convert_module(m, skip)]


def test_a_long_skip_list_is_matched_in_time_linear_in_the_name():
    """A bounded list of 4096 names: set look-ups of the name's prefixes and suffixes, not a scan of the list
    (the check is that it completes; no wall-clock assertion)."""
    skip = [f"model.layers.{i}.mlp.experts.{j}" for i in range(64) for j in range(64)]
    scope = fp8_scope(
        None,
        {"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8", "modules_to_not_convert": skip}},
    )
    names = [f"model.layers.{i}.mlp.experts.{j}.up_proj.weight" for i in range(70) for j in range(70)]
    assert sum(scope.quantizes(n) for n in names) == 70 * 70 - 64 * 64


def test_an_architecture_without_a_known_fp8_layout_is_refused_by_name():
    with pytest.raises(StagerError) as info:
        fp8_scope(load_adapter("identity"), {"model_type": "gpt2"})
    assert info.value.code == ErrorCode.BAD_VALUE
    assert "'gpt2'" in info.value.message and "deepseek_v3" in info.value.message


def test_deepseek_v3_adapters_hf_names_quantize_as_the_hub_checkpoint():
    """torchtitan's DeepSeek-V3 names through the deepseek_v3 adapter (experts split, an MTP layer): the
    reader's FP8 view quantizes every projection and expert, and nothing else."""
    from stager.client.adapters import hf_names
    from stager.client.readers.fp8_view import fp8_entries
    from stager.client.readers.views import ViewEntry

    cfg = {
        **DEEPSEEK_CONFIG,
        "hidden_size": 32,
        "n_routed_experts": 2,
        "moe_intermediate_size": 16,
        "q_lora_rank": 24,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 12,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
    }
    attention = {
        "attention_norm.weight": (32,),
        "ffn_norm.weight": (32,),
        "attention.wq_a.weight": (24, 32),
        "attention.q_norm.weight": (24,),
        "attention.wq_b.weight": (64, 24),
        "attention.wkv_a.weight": (24, 32),
        "attention.kv_norm.weight": (16,),
        "attention.wkv_b.weight": (80, 16),
        "attention.wo.weight": (32, 48),
    }
    experts = "moe.routed_experts.inner_experts"
    moe = {
        "moe.router.gate.weight": (2, 32),
        "moe.expert_bias_E": (2,),
        f"{experts}.w1_EFD": (2, 16, 32),
        f"{experts}.w2_EDF": (2, 32, 16),
        f"{experts}.w3_EFD": (2, 16, 32),
        "moe.shared_experts.w1.weight": (16, 32),
        "moe.shared_experts.w2.weight": (32, 16),
        "moe.shared_experts.w3.weight": (16, 32),
    }
    dense = {f"feed_forward.{w}.weight": s for w, s in (("w1", (48, 32)), ("w2", (32, 48)), ("w3", (48, 32)))}
    mtp = {"enorm.weight": (32,), "hnorm.weight": (32,), "eh_proj.weight": (32, 64), "mtp_norm.weight": (32,)}
    layout = {
        "tok_embeddings.weight": (64, 32),
        "norm.weight": (32,),
        "lm_head.weight": (64, 32),
        **{f"layers.0.{k}": s for k, s in {**attention, **dense}.items()},
        **{f"layers.1.{k}": s for k, s in {**attention, **moe}.items()},
        **{f"mtp_layers.0.{k}": s for k, s in {**attention, **moe, **mtp}.items()},
    }
    adapter = load_adapter("deepseek_v3", cfg)
    plan = hf_names(adapter, [(n, torch.float32, s) for n, s in layout.items()])
    entries = {t.name: ViewEntry(t.name, t.source, t.shape, t.dtype, t.strided) for t in plan}
    view, quantized = fp8_entries(entries, fp8_scope(adapter, cfg))
    projections = [
        "self_attn.q_a_proj",
        "self_attn.q_b_proj",
        "self_attn.kv_a_proj_with_mqa",
        "self_attn.kv_b_proj",
        "self_attn.o_proj",
    ]
    ffn = [f"mlp.{e}{p}_proj" for e in ("experts.0.", "experts.1.", "shared_experts.") for p in ("gate", "up", "down")]
    expected = [f"model.layers.0.{m}.weight" for m in projections + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]]
    expected += [f"model.layers.{i}.{m}.weight" for i in (1, 2) for m in projections + ffn]
    assert sorted(quantized) == sorted(expected)
    assert "model.layers.2.eh_proj.weight" in view and view["model.layers.2.eh_proj.weight"].dtype == torch.float32
    names = list(view)
    assert all(
        names[names.index(w) + 1] == s == scale_name(w) and view[s].shape == (1, 1) for w, s in quantized.items()
    )
    assert view["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].dtype == E4M3
