"""HF adapters: exact round trips, errors naming keys, and the same logits in transformers."""

import pytest
import torch

from helpers import CONFIG
from native_llama import NativeLlama
from stager.client.adapters import (
    Llama3Adapter,
    Qwen3Adapter,
    fill_hf,
    load_adapter,
    permute_for_hf_rotary,
    to_hf_items,
    unpermute_from_hf_rotary,
    with_prefix,
)
from stager.protocol import StagerError

pytestmark = pytest.mark.fast  # the fast tier: no daemon process, no torch.distributed job


def assert_same_logits_and_round_trip(hf, native, adapter, sd, hf_sd):
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, native(tokens), rtol=1e-5, atol=1e-5)
    back = adapter.from_hf(hf_sd)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("heads,rows,cols", [(4, 32, 8), (2, 16, 5), (1, 4, 3)])
def test_rotary_permutation_inverts(heads, rows, cols):
    w = torch.randn(rows, cols)
    assert torch.equal(unpermute_from_hf_rotary(permute_for_hf_rotary(w, heads), heads), w)
    # HF order per head: first all even (real) parts, then all odd ones
    ordered = permute_for_hf_rotary(torch.arange(rows).float().unsqueeze(1), heads).squeeze(1)
    head = rows // heads
    assert ordered[:head].tolist() == list(range(0, head, 2)) + list(range(1, head, 2))


@pytest.mark.parametrize(
    "make,native",
    [
        (lambda: Llama3Adapter(CONFIG), dict(qkv_linear=False)),
        (lambda: Llama3Adapter(CONFIG), dict(qkv_linear=True)),
        (lambda: Llama3Adapter(CONFIG, rope_layout="halves"), dict(qkv_linear=False)),
        (lambda: Qwen3Adapter(CONFIG, rope_layout="interleaved"), dict(qkv_linear=False, qwen=True)),
        (lambda: with_prefix(Llama3Adapter(CONFIG), "model."), dict(qkv_linear=False, prefix="model.")),
    ],
    ids=["llama3", "llama3 qkv_linear", "llama3 halves", "qwen3 interleaved", "prefixed"],
)
def test_filling_existing_tensors_equals_converting(make, native):
    """fill_hf writes what to_hf_items gives, into the caller's tensors (any dtype), and skips the
    names it is not given."""
    prefix = native.pop("prefix", "")
    torch.manual_seed(0)
    sd = {prefix + k: v for k, v in NativeLlama(CONFIG, **native).state_dict().items()}
    if prefix:
        sd["optim.state.x"] = torch.zeros(1)  # not part of the prefixed model: nothing written
    expected = dict(to_hf_items(make(), sd.items()))
    out = {n: torch.empty(t.shape, dtype=torch.float64) for n, t in expected.items()}
    skipped = out.pop(next(iter(out)))
    adapter, written = make(), []
    for name, t in sd.items():
        written += fill_hf(adapter, name, t, out)
    assert sorted(written) == sorted(out) and skipped.shape
    assert all(torch.equal(out[n], expected[n].double()) for n in out)
    with pytest.raises(StagerError, match=r"contiguous \[32, 32\] tensor, not a \[16, 64\] one"):
        permute_for_hf_rotary(torch.zeros(32, 32), 4, out=torch.zeros(16, 64))


@pytest.mark.parametrize("qkv_linear", [False, True], ids=["legacy names", "qkv_linear names"])
def test_llama3_export_gives_the_same_logits_in_transformers(qkv_linear):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    native = NativeLlama(CONFIG, qkv_linear=qkv_linear).eval()
    adapter = load_adapter("llama3", CONFIG) if not qkv_linear else Llama3Adapter(CONFIG, native_form="qkv_linear")
    sd = native.state_dict()
    hf_sd = dict(to_hf_items(adapter, sd.items()))
    cfg = {k: v for k, v in CONFIG.items() if k != "rope_theta"}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, rope_theta=CONFIG["rope_theta"])).eval()
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    assert_same_logits_and_round_trip(hf, native, adapter, sd, hf_sd)


def test_qwen3_interleaved_rope_export_gives_the_same_logits_in_transformers():
    """A Qwen3 port with Meta-style interleaved rotary (NativeLlama's qwen mode, MLP named mlp.*):
    rope_layout="interleaved" permutes q/k rows and norms. torchtitan's own Qwen3 rotates halves:
    tests/test_upstream_models.py checks the default against it."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(CONFIG, head_dim=12, tie_word_embeddings=True)  # head_dim != hidden / heads, as in Qwen3
    torch.manual_seed(0)
    native = NativeLlama(cfg, qwen=True).eval()
    with torch.no_grad():  # tied: the output head is the embedding; non-trivial norm weights
        native.output.weight = native.tok_embeddings.weight
        for layer in native.layers:
            layer.attention.q_norm.weight.uniform_(0.5, 1.5)
            layer.attention.k_norm.weight.uniform_(0.5, 1.5)
    adapter = Qwen3Adapter(cfg, rope_layout="interleaved")
    sd = native.state_dict()
    hf_sd = adapter.to_hf(sd)
    assert "model.layers.0.self_attn.q_norm.weight" in hf_sd and "lm_head.weight" not in hf_sd
    hf_cfg = {k: v for k, v in cfg.items() if k != "rope_theta"}
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf_cfg, rope_theta=cfg["rope_theta"])).eval()
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m and m != "lm_head.weight"]
    hf.tie_weights()
    assert_same_logits_and_round_trip(hf, native, adapter, sd, hf_sd)


def test_tied_embeddings_drop_and_restore_lm_head():
    cfg = dict(CONFIG, tie_word_embeddings=True)
    emb = torch.randn(96, 32)
    sd = {"tok_embeddings.weight": emb, "output.weight": emb, "norm.weight": torch.ones(32)}
    adapter = load_adapter("llama3", cfg)
    hf = adapter.to_hf(sd)
    assert "lm_head.weight" not in hf
    back = adapter.from_hf(hf)
    assert torch.equal(back["output.weight"], emb)


@pytest.mark.parametrize(
    "sd,text",
    [
        ({"layers.0.attention.wq.weight": torch.zeros(30, 32)}, "contradicts the config"),
        ({"layers.0.mystery.weight": torch.zeros(2)}, "layers.0.mystery.weight: the llama3 adapter does not know"),
        ({"frobnicator": torch.zeros(2)}, "frobnicator"),
    ],
)
def test_unknown_keys_and_bad_shapes_name_the_key(sd, text):
    with pytest.raises(StagerError) as info:
        load_adapter("llama3", CONFIG).to_hf(sd)
    assert text in info.value.message


def test_plugins_and_identity():
    plugin = load_adapter("helpers:EagerPlugin", {"prefix": "x."})
    assert dict(to_hf_items(plugin, [("a", 1)])) == {"x.a": 1}
    assert load_adapter("identity").to_hf({"a": 1}) == {"a": 1}
    with pytest.raises(StagerError, match="cannot load adapter"):
        load_adapter("no_such_module:Thing")
    with pytest.raises(StagerError, match="unknown adapter"):
        load_adapter("gpt9")
    with pytest.raises(StagerError, match="needs hf_config"):
        load_adapter("llama3", {})


def test_errors_name_the_adapter():
    cfg = dict(CONFIG, head_dim=8)
    with pytest.raises(StagerError, match="the qwen3 adapter does not know"):
        load_adapter("qwen3", cfg).to_hf({"layers.0.moe.router.gate.weight": torch.zeros(2, 2)})
    with pytest.raises(StagerError, match="contradicts the config"):
        load_adapter("qwen3", cfg).to_hf({"layers.0.attention.q_norm.weight": torch.zeros(6)})


# rows, heads, cols, staged flat indices -> HF flat indices (rotary_rows: per head of hd rows, the pairs
# (2p, 2p + 1) go to rows p and hd / 2 + p)
ROW_MAP_TABLE = [
    (4, 1, 1, [0, 1, 2, 3], [0, 2, 1, 3]),  # one head of 4 rows, one column: rows 1 and 2 swap
    (8, 2, 1, [1, 4, 5, 7], [2, 4, 6, 7]),  # two heads: the second head's rows keep their offset
    (4, 1, 3, [0, 5, 6, 11], [0, 8, 3, 11]),  # columns unchanged: (1, 2) -> (2, 2), (2, 0) -> (1, 0)
    (8, 1, 2, [2, 3, 14, 15], [8, 9, 14, 15]),  # one head of 8: row 1 -> 4 (both columns), 7 -> 7
    (8, 1, 2, [4, 6, 8, 10, 12], [2, 10, 4, 12, 6]),  # rows 2 -> 1, 3 -> 5, 4 -> 2, 5 -> 6, 6 -> 3
    (4, 2, 5, [], []),  # nothing changed
]


@pytest.mark.parametrize("rows,heads,cols,staged,hf", ROW_MAP_TABLE)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_hf_flat_indices_maps_a_staged_row_to_its_hf_row(rows, heads, cols, staged, hf, dtype):
    from stager.client.adapters import hf_flat_indices, rotary_rows

    got = hf_flat_indices(torch.tensor(staged, dtype=dtype), rotary_rows(rows, heads), cols)
    assert got.dtype == dtype and got.tolist() == hf


@pytest.mark.parametrize("suffix,heads", [("attention.wq.weight", 4), ("attention.qkv_linear.wk.weight", 2)])
def test_the_row_order_is_the_adapters_own_permutation(suffix, heads):
    """Every element of q/k: the HF tensor at the mapped index is the staged element (the row order is
    taken from permute_for_hf_rotary itself); a fused wqkv's parts and unpermuted layouts give none."""
    from stager.client.adapters import hf_flat_indices, hf_names, hf_row_orders, load_adapter

    config = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2}
    adapter = load_adapter("llama3", config)
    w = torch.randn(heads * 8, 32)
    ((hf_name, hf),) = adapter.to_hf_items(f"layers.0.{suffix}", w)
    (order,) = hf_row_orders(adapter, f"layers.0.{suffix}", w.to("meta")).values()
    every = torch.arange(w.numel(), dtype=torch.int32)
    assert torch.equal(hf.reshape(-1)[hf_flat_indices(every, order, 32).long()], w.reshape(-1))
    (entry,) = hf_names(adapter, [(f"layers.0.{suffix}", torch.float32, tuple(w.shape))])
    assert entry.name == hf_name and torch.equal(entry.rows, order)
    fused = [("layers.0.attention.qkv_linear.wqkv.weight", torch.float32, (64, 32))]
    assert all(t.rows is None for t in hf_names(adapter, fused))
    halves = load_adapter("qwen3", dict(config, head_dim=8))
    assert hf_row_orders(halves, f"layers.0.{suffix}", w.to("meta")) == {}
