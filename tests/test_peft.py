"""LoRA weights of a version exported in PEFT's format, loaded by the real peft onto the base model."""

import json
import os

import pytest
import torch

from helpers import lazy_importorskip

peft = lazy_importorskip("peft")
transformers = lazy_importorskip("transformers")

from stager.client import StagingClient, Subscriber  # noqa: E402
from stager.client.adapters import load_adapter  # noqa: E402
from stager.formats.integrity import verify  # noqa: E402
from stager.protocol import StagerError  # noqa: E402
from stager.writers.export_hf import export_hf  # noqa: E402
from stager.writers.export_peft import lora_modules  # noqa: E402

CONFIG = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "torch_dtype": "float32",
    "model_type": "llama",
    "tie_word_embeddings": False,
}
RANK, ALPHA = 4, 8.0
TARGETS = (
    "attention.qkv_linear.wq",
    "attention.qkv_linear.wk",
    "attention.qkv_linear.wv",
    "feed_forward.w2",
)  # q and k: rotary-permuted rows


def llama(seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()


def lora_weights(native):
    g = torch.Generator().manual_seed(7)
    out = {}
    for layer in range(2):
        for target in TARGETS:
            w = native[f"layers.{layer}.{target}.weight"]
            out[f"layers.{layer}.{target}.lora_a.weight"] = torch.randn(RANK, w.shape[1], generator=g) * 0.3
            out[f"layers.{layer}.{target}.lora_b.weight"] = torch.randn(w.shape[0], RANK, generator=g) * 0.3
    return out


def logits(model):
    tokens = torch.arange(24).view(2, 12) % CONFIG["vocab_size"]
    with torch.no_grad():
        return model(tokens).logits


def test_lora_exports_in_peft_format_that_peft_loads_onto_the_base_model(make_daemon, tmp_path):
    adapter = load_adapter("llama3", CONFIG)
    base = llama(0)
    native = adapter.from_hf(dict(base.state_dict()))
    lora = lora_weights(native)
    merged = dict(native)  # the reference: LoRA merged in native names, then to HF
    for module, (a, b) in lora_modules(lora).items():
        merged[f"{module}.weight"] = native[f"{module}.weight"] + (ALPHA / RANK) * lora[b] @ lora[a]
    reference = llama(1)
    reference.load_state_dict(load_adapter("llama3", CONFIG).to_hf(merged))
    d = make_daemon()
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
        client.stage(
            {"model": {**native, **lora}},
            step=3,
            model_info={"adapter": "llama3", "hf_config": CONFIG, "prefix": "model.", "lora": {"alpha": ALPHA}},
        ).wait(10)
    with Subscriber(d.endpoint, view="hf") as sub, sub.latest() as snap:  # LoRA is no tensor of the HF view
        assert sorted(snap) == sorted(base.state_dict())
    full = export_hf(str(tmp_path / "full"), endpoint=d.endpoint, peft=True, progress=False)[0]
    config = json.load(open(os.path.join(full, "adapter", "adapter_config.json")))
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA and config["base_model_name_or_path"] == full
    assert config["target_modules"] == ["down_proj", "k_proj", "q_proj", "v_proj"]
    exported_base = transformers.AutoModelForCausalLM.from_pretrained(full).eval()  # the base model alone
    torch.testing.assert_close(logits(exported_base), logits(base), rtol=0, atol=0)
    model = peft.PeftModel.from_pretrained(exported_base, os.path.join(full, "adapter")).eval()
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(base), logits(reference), atol=1e-3)  # the LoRA does change the model
    only = export_hf(
        str(tmp_path / "adapter"),
        endpoint=d.endpoint,
        peft=True,
        adapter_only=True,
        base_model="my-org/base",
        progress=False,
    )[0]
    assert sorted(f for f in os.listdir(only) if not f.startswith("stager")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert json.load(open(os.path.join(only, "adapter_config.json")))["base_model_name_or_path"] == "my-org/base"
    assert verify(only)["ok"] and verify(full)["ok"]
    model = peft.PeftModel.from_pretrained(llama(0), only).eval()  # onto the base model as the user has it
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)


def test_a_half_pair_or_no_alpha_is_a_typed_error(make_daemon, tmp_path):
    with pytest.raises(StagerError, match="without its lora_b partner"):
        lora_modules(["l.wq.lora_a.weight"])
    adapter = load_adapter("llama3", CONFIG)
    native = adapter.from_hf(dict(llama(0).state_dict()))
    d = make_daemon()
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
        client.stage(
            {"model": {**native, **lora_weights(native)}},
            step=1,
            model_info={"adapter": "llama3", "hf_config": CONFIG, "prefix": "model."},
        ).wait(10)
    with pytest.raises(StagerError, match="LoRA alpha unknown: pass --lora-alpha"):
        export_hf(str(tmp_path / "x"), endpoint=d.endpoint, peft=True, progress=False)
    assert not [f for f in os.listdir(tmp_path / "x") if not f.startswith(".")]  # nothing half-written published
