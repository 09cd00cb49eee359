"""The HF exporter: transformers loads what it writes and computes the native model's logits."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import CONFIG, lazy_importorskip
from native_llama import NativeLlama
from stager.client import StagingClient
from stager.writers.export_hf import export_hf

transformers = lazy_importorskip("transformers")


def hf_config_dict():
    cfg = {k: v for k, v in CONFIG.items() if k != "rope_theta"}
    return transformers.LlamaConfig(**cfg, rope_theta=CONFIG["rope_theta"]).to_dict()


@pytest.fixture
def staged_llama(make_daemon):
    d = make_daemon()
    torch.manual_seed(0)
    native = NativeLlama(CONFIG).eval()
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
        client.stage(
            {**native.state_dict()}, step=7, model_info={"adapter": "llama3", "hf_config": hf_config_dict()}
        ).wait(30)
    return d, native


@pytest.mark.parametrize("shard", ["5GB", "40KB"], ids=["one file", "sharded"])
def test_export_loads_in_transformers_with_the_same_logits(staged_llama, tmp_path, shard):
    d, native = staged_llama
    (path,) = export_hf(str(tmp_path), endpoint=d.endpoint, max_shard_size=shard)
    assert os.path.basename(path) == "step-00000007" and os.path.realpath(tmp_path / "latest") == path
    files = sorted(os.listdir(path))
    if shard == "5GB":
        assert files == ["config.json", "model.safetensors", "stager-manifest.json"]
    else:
        index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in native.parameters())
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, native(tokens), rtol=1e-5, atol=1e-5)


def test_dtype_assets_keep_and_cli(staged_llama, tmp_path):
    d, native = staged_llama
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "tokenizer.json").write_text("{}")
    (assets / "model.safetensors").write_text("not copied")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stager.cli",
            "export-hf",
            "--endpoint",
            d.endpoint,
            "--out",
            str(tmp_path / "hf"),
            "--dtype",
            "bfloat16",
            "--hf-assets",
            str(assets),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    path = json.loads(out.stdout)["exported"]
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(path, "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert json.load(open(os.path.join(path, "config.json")))["torch_dtype"] == "bfloat16"
    assert open(os.path.join(path, "tokenizer.json")).read() == "{}"


def test_interrupted_export_leaves_nothing_that_looks_complete(staged_llama, tmp_path, monkeypatch):
    d, _ = staged_llama
    import stager.writers.export_hf as mod

    calls = []
    real = mod.write_safetensors

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(mod, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        export_hf(str(tmp_path), endpoint=d.endpoint, max_shard_size="40KB")
    assert os.listdir(tmp_path) == []


def test_nested_training_state_exports_its_model_part(make_daemon, tmp_path):
    """stage({"model": ..., "optim": ..., "train": ...}) as the README's loop does: with the prefix
    "model." in model_info, the HF view and the export hold the model only, under HF names."""
    from stager.client import Subscriber

    d = make_daemon()
    torch.manual_seed(0)
    native = NativeLlama(CONFIG).eval()
    model = native.state_dict()
    optim = {f"state.{k}.exp_avg": torch.randn_like(v) for k, v in list(model.items())[:3]}
    info = {"adapter": "llama3", "hf_config": hf_config_dict(), "prefix": "model."}
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
        client.stage({"model": model, "optim": optim, "train": {"step": 3}}, step=3, model_info=info).wait(30)
    with Subscriber(d.endpoint, view="hf") as sub, sub.latest() as snap:
        names = list(snap)
        assert names and all(n.startswith(("model.", "lm_head.")) for n in names)
        assert not any("exp_avg" in n for n in names) and snap.objects == {"train.step": 3}
    (path,) = export_hf(str(tmp_path), endpoint=d.endpoint)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, native(tokens), rtol=1e-5, atol=1e-5)
    # the consumer may name the prefix itself (a version staged without it)
    with Subscriber(d.endpoint, view="hf", prefix="model.") as sub, sub.latest() as snap:
        assert sorted(snap) == sorted(names)
