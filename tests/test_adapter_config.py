"""Property: every built-in adapter, fed any JSON value in any field of hf_config it reads, either refuses the
config with HFConfigError naming the field, or accepts it and then maps the names of a layout that fits the
config, both ways, without any exception (issue 22). Pure: meta tensors, no daemon."""

import functools
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stager.client.adapters import BUILT_IN, DeepSeekV3Adapter, IdentityAdapter, Llama3Adapter, Qwen3Adapter, hf_names
from stager.client.adapters.config import MAX_INT
from stager.protocol import ErrorCode, HFConfigError, StagerError

pytestmark = pytest.mark.fast  # the fast tier: no daemon process, no torch.distributed job

# what each adapter reads of hf_config, listed here independently of the adapters' schemas: a field read but
# left out of its schema fails test_each_adapter_reads_exactly_the_fields_it_checks
LLAMA_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
DEEPSEEK_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "n_routed_experts",
    "moe_intermediate_size",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "first_k_dense_replace",
    "q_lora_rank",
    "num_hidden_layers",
    "rope_interleave",
    "tie_word_embeddings",
)
LLAMA_BASE = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "tie_word_embeddings": False,
}
DEEPSEEK_BASE = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "n_routed_experts": 4,
    "moe_intermediate_size": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "first_k_dense_replace": 1,
    "q_lora_rank": 24,
    "num_hidden_layers": 2,
    "rope_interleave": True,
    "tie_word_embeddings": False,
}
ADAPTERS = {  # id -> (factory, fields read, a valid config)
    "llama3": (Llama3Adapter, LLAMA_FIELDS, LLAMA_BASE),
    "llama3 halves": (functools.partial(Llama3Adapter, rope_layout="halves"), LLAMA_FIELDS, LLAMA_BASE),
    "qwen3": (Qwen3Adapter, LLAMA_FIELDS, LLAMA_BASE),
    "qwen3 interleaved": (functools.partial(Qwen3Adapter, rope_layout="interleaved"), LLAMA_FIELDS, LLAMA_BASE),
    "deepseek_v3": (DeepSeekV3Adapter, DEEPSEEK_FIELDS, DEEPSEEK_BASE),
    "identity": (IdentityAdapter, (), {}),
}
VOCAB, FFN = 16, 8
ABSENT = object()

EDGE_INTS = st.sampled_from([0, -1, 1, 2, 3, 4, 6, 8, 16, MAX_INT, MAX_INT + 1, 2**31, 2**63, -(2**63), 10**30])
SCALARS = st.none() | st.booleans() | st.integers() | EDGE_INTS | st.floats() | st.text(max_size=6)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def configs(fields, base):
    """A valid config with up to 3 of the fields read changed: absent, a small int (valid or not) or any JSON
    value; plus fields no adapter reads (never to matter)."""
    value = st.one_of(st.just(ABSENT), st.sampled_from([0, 1, 2, 3, 4, 6, 8, 16]), JSON)
    changed = st.sets(st.sampled_from(fields), max_size=3) if fields else st.just(set())
    changes = changed.flatmap(lambda names: st.fixed_dictionaries({n: value for n in sorted(names)}))
    extra = st.dictionaries(st.text(max_size=6).filter(lambda k: k not in fields), JSON, max_size=2)
    return st.tuples(changes, extra).map(
        lambda t: {**t[1], **{k: v for k, v in {**base, **t[0]}.items() if v is not ABSENT}}
    )


def _llama_layout(c, qwen, fused):
    h, heads = c["hidden_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or h // heads
    p = "layers.0."
    out = {
        "tok_embeddings.weight": (VOCAB, h),
        "norm.weight": (h,),
        "output.weight": (VOCAB, h),
        p + "attention.wo.weight": (h, heads * hd),
        p + "attention_norm.weight": (h,),
        p + "ffn_norm.weight": (h,),
        p + "feed_forward.w1.weight": (FFN, h),
        p + "feed_forward.w2.weight": (h, FFN),
        p + "feed_forward.w3.weight": (FFN, h),
    }
    if fused:
        out[p + "attention.qkv_linear.wqkv.weight"] = ((heads + 2 * kv) * hd, h)
    else:
        out.update(
            {
                p + "attention.wq.weight": (heads * hd, h),
                p + "attention.wk.weight": (kv * hd, h),
                p + "attention.wv.weight": (kv * hd, h),
            }
        )
    if qwen:
        out.update({p + "attention.q_norm.weight": (hd,), p + "attention.k_norm.weight": (hd,)})
    return out


def _deepseek_layout(c):
    h, heads, e, moe = c["hidden_size"], c["num_attention_heads"], c["n_routed_experts"], c["moe_intermediate_size"]
    nope, rope, v, kv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    q_rank, n_layers = c.get("q_lora_rank") or 0, c.get("num_hidden_layers")
    out = {"tok_embeddings.weight": (VOCAB, h), "norm.weight": (h,), "lm_head.weight": (VOCAB, h)}
    for layer in range(min(2, n_layers or 2)):
        p = f"layers.{layer}."
        out.update(
            {
                p + "attention_norm.weight": (h,),
                p + "ffn_norm.weight": (h,),
                p + "attention.wkv_a.weight": (kv + rope, h),
                p + "attention.kv_norm.weight": (kv,),
                p + "attention.wkv_b.weight": (heads * (nope + v), kv),
                p + "attention.wo.weight": (h, heads * v),
            }
        )
        if q_rank:
            out.update(
                {
                    p + "attention.wq_a.weight": (q_rank, h),
                    p + "attention.q_norm.weight": (q_rank,),
                    p + "attention.wq_b.weight": (heads * (nope + rope), q_rank),
                }
            )
        else:
            out[p + "attention.wq.weight"] = (heads * (nope + rope), h)
        if layer < c["first_k_dense_replace"]:
            out.update(
                {
                    p + "feed_forward.w1.weight": (FFN, h),
                    p + "feed_forward.w2.weight": (h, FFN),
                    p + "feed_forward.w3.weight": (FFN, h),
                }
            )
        else:
            x = p + "moe.routed_experts.inner_experts."
            out.update(
                {
                    p + "moe.router.gate.weight": (e, h),
                    p + "moe.expert_bias_E": (e,),
                    x + "w1_EFD": (e, moe, h),
                    x + "w2_EDF": (e, h, moe),
                    x + "w3_EFD": (e, moe, h),
                    p + "moe.shared_experts.w1.weight": (moe, h),
                    p + "moe.shared_experts.w2.weight": (h, moe),
                    p + "moe.shared_experts.w3.weight": (moe, h),
                }
            )
    if n_layers is not None:  # an MTP layer: model.layers.{num_hidden_layers}
        out.update(
            {
                "mtp_layers.0.enorm.weight": (h,),
                "mtp_layers.0.hnorm.weight": (h,),
                "mtp_layers.0.eh_proj.weight": (h, 2 * h),
                "mtp_layers.0.mtp_norm.weight": (h,),
            }
        )
    return out


def layout_for(which, config, fused=False):
    """``[(name, dtype, shape)]`` of a native model that fits ``config`` as HF reads it; None when it would be too
    large to be a layout (sizes near MAX_INT: no daemon could have staged it)."""
    if which == "identity":
        shapes = {"model.embed_tokens.weight": (VOCAB, 4), "lm_head.weight": (VOCAB, 4)}
    elif which == "deepseek_v3":
        if config["n_routed_experts"] > 64:  # one HF tensor per expert
            return None
        shapes = _deepseek_layout(config)
    else:
        shapes = _llama_layout(config, which.startswith("qwen3"), fused)
    if any(s > 4096 for shape in shapes.values() for s in shape):
        return None
    return [(name, torch.float32, shape) for name, shape in shapes.items()]


def check_refusal(exc, fields):
    assert isinstance(exc, HFConfigError) and exc.code == ErrorCode.BAD_VALUE, repr(exc)
    assert exc.field in fields or exc.field == "", exc.message
    assert f"hf_config.{exc.field} = " in exc.message or "needs hf_config with" in exc.message or exc.field == ""
    assert "\n" not in exc.message and "hf-config" in exc.message  # one line, saying how to fix it


def check_config_property(which, config, fused):
    make, fields, base = ADAPTERS[which]
    try:
        adapter = make(config)
    except Exception as exc:  # anything but the typed config error fails the property
        check_refusal(exc, fields)
        return
    layout = layout_for(which.split()[0], config, fused)
    if layout is not None:  # a layout that fits the config maps both ways, whatever the accepted values
        hf = hf_names(adapter, layout)
        back = adapter.from_hf({t.name: torch.empty(t.shape, dtype=t.dtype, device="meta") for t in hf})
        if not fused:  # (a fused wqkv comes back as wq, wk, wv)
            assert {name: tuple(t.shape) for name, t in back.items()} == {n: tuple(s) for n, _, s in layout}
    if fields:  # another model's layout: the same names, or a typed contradiction, never a crash
        try:
            hf_names(make(config), layout_for(which.split()[0], base, fused))
        except StagerError:
            pass


@pytest.mark.parametrize("which", sorted(ADAPTERS))
def test_any_json_in_any_field_read_is_accepted_and_mapped_or_refused_by_name(which):
    _, fields, base = ADAPTERS[which]

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(config=configs(fields, base), fused=st.booleans())
    def prop(config, fused):
        check_config_property(which, config, fused)

    prop()


@pytest.mark.parametrize("which", sorted(ADAPTERS))
@settings(max_examples=30, deadline=None)
@given(config=JSON)
def test_a_config_that_is_no_object_is_refused_by_name(which, config):
    make, fields, _ = ADAPTERS[which]
    try:
        make(config)
    except Exception as exc:
        check_refusal(exc, fields)


class Recording(dict):
    """A config that records which fields are read, however they are read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


@pytest.mark.parametrize("which", sorted(ADAPTERS))
def test_each_adapter_reads_exactly_the_fields_it_checks(which):
    make, fields, base = ADAPTERS[which]
    config = Recording(base)
    adapter = make(config)
    hf = hf_names(adapter, layout_for(which.split()[0], base))
    adapter.from_hf({t.name: torch.empty(t.shape, dtype=t.dtype, device="meta") for t in hf})
    assert config.read == set(fields)
    built_in = BUILT_IN[which.split()[0]]
    assert set(built_in.CONFIG.fields) == set(fields)


def test_the_issue_config_is_refused_naming_the_field():
    bad = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": [1], "head_dim": {"x": None}}
    with pytest.raises(HFConfigError) as info:
        Llama3Adapter(bad)
    assert info.value.field == "num_key_value_heads"
    assert "hf_config.num_key_value_heads = [1] (list)" in info.value.message
    for field, value, expected in [
        ("num_key_value_heads", 3, "a divisor of num_attention_heads (4)"),
        ("head_dim", 7, "an even head dimension"),
        ("tie_word_embeddings", "false", "true or false"),
        ("hidden_size", 10**30, f"an integer from 1 to {MAX_INT}"),
    ]:
        with pytest.raises(HFConfigError, match=re.escape(expected)) as info:
            Qwen3Adapter(dict(LLAMA_BASE, **{field: value}))
        assert info.value.field == field
    with pytest.raises(HFConfigError, match="qk_rope_head_dim = 5 .* an even number") as info:
        DeepSeekV3Adapter(dict(DEEPSEEK_BASE, qk_rope_head_dim=5))
