"""FP8 on read and FP8 HF exports: readers and `export-hf --quantize fp8-block` give vLLM's block quantization of
the staged weights, bit for bit; transformers and `stager load-hf` load the export; `stager verify` checks it."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import lazy_importorskip, vllm_per_block_cast_to_fp8
from native_llama import NativeLlama
from stager.client import StagingClient, Subscriber
from stager.client.adapters.fp8_scope import llama_fp8_weight
from stager.formats.hf_checkpoint import read_header
from stager.protocol import ErrorCode, StagerError
from stager.protocol.fp8_block import E4M3, dequantize_block_fp8
from stager.writers.export_hf import export_hf, plan_export, write_files

transformers = lazy_importorskip("transformers")

# a tiny Llama whose quantized weights have partial 128 x 128 edge blocks (q [160, 160], k [80, 160], ...)
PARTIAL = {
    "vocab_size": 96,
    "hidden_size": 160,
    "intermediate_size": 200,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
# one whose quantized dimensions are all multiples of 128 (what transformers can load: see below)
WHOLE = {**PARTIAL, "hidden_size": 256, "intermediate_size": 384}


def hf_config(c: dict) -> dict:
    return transformers.LlamaConfig(
        **{k: v for k, v in c.items() if k != "rope_theta"}, rope_theta=c["rope_theta"]
    ).to_dict()


def stage(endpoint: str, c: dict, info: dict | None = None, step: int = 1) -> NativeLlama:
    torch.manual_seed(0)
    native = NativeLlama(c).eval()
    with StagingClient(endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
        client.stage(
            native.state_dict(), step=step, model_info={"adapter": "llama3", "hf_config": hf_config(c), **(info or {})}
        ).wait(30)
    return native


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def hf_view(endpoint: str) -> dict[str, torch.Tensor]:
    with Subscriber(endpoint, view="hf") as sub, sub.latest() as snap:
        return {k: v.clone() for k, v in snap.items()}


@pytest.mark.parametrize("remote", [False, True], ids=["same host", "frames"])
def test_a_reader_gets_vllms_block_quantization_of_the_weights_fp8_checkpoints_quantize(make_daemon, remote):
    d = make_daemon()
    stage(d.endpoint, PARTIAL)
    plain = hf_view(d.endpoint)
    quantized = [n for n in plain if llama_fp8_weight(n)]
    assert len(quantized) == 14  # 7 projections x 2 layers; embeddings, norms and lm_head stay as they are
    with (
        Subscriber(d.endpoint, view="hf", quantize="fp8-block", dtype=torch.bfloat16, remote=remote) as sub,
        sub.latest() as snap,
    ):
        names = list(snap)
        assert snap.fp8 == {n: n + "_scale_inv" for n in quantized} and snap.fp8_block == (128, 128)
        assert [n for n in names if not n.endswith("_scale_inv")] == list(plain)
        assert all(names[names.index(w) + 1] == s for w, s in snap.fp8.items())  # each scale right after its weight
        got = dict(snap.items())
        for name, w in plain.items():
            if name in snap.fp8:
                data, scale_inv = vllm_per_block_cast_to_fp8(w)  # from the staged fp32, not from a bf16 cast
                assert same(got[name], data) and same(got[snap.fp8[name]], scale_inv), name
                assert snap.meta(name) == (tuple(w.shape), E4M3)
            else:
                assert same(got[name], w.to(torch.bfloat16)), name
        k = "model.layers.1.self_attn.k_proj.weight"
        assert same(snap[k + "_scale_inv"], got[k + "_scale_inv"]) and same(snap[k], got[k])  # one at a time
        assert same(snap.get(k, shard=(0, 1, 2)), got[k][40:])  # a tensor-parallel slice of the e4m3 data
        engine = {n: torch.full(snap.meta(n)[0], 7.0, dtype=got[n].dtype) for n in names}  # its own buffers
        assert snap.load_into(engine) == names
        assert all(same(engine[n], got[n]) for n in names)
        few = {n: engine[n] for n in (k + "_scale_inv", "model.norm.weight")}
        assert snap.load_into(few) == ["model.layers.1.self_attn.k_proj.weight_scale_inv", "model.norm.weight"]
        with pytest.raises(StagerError, match=r"holds shape \[80, 160\] \(FP8 block-quantized\)"):
            snap.load_into({k: torch.empty(160, 80, dtype=E4M3)})
    with Subscriber(d.endpoint, view="hf", quantize="fp8-block", names=[k + "_scale_inv"]) as sub, sub.latest() as snap:
        assert list(snap) == [k + "_scale_inv"] and same(snap[k + "_scale_inv"], got[k + "_scale_inv"])


def test_load_into_refuses_a_destination_of_another_dtype_than_e4m3_weights_and_fp32_scales(make_daemon):
    """copy_ would cast: e4m3 values stored unscaled in a bf16 parameter, scales rounded to bf16. Every quantized
    name's dtype is checked with the shapes, before any tensor (a plain one included) is written."""
    d = make_daemon()
    stage(d.endpoint, PARTIAL)
    k = "model.layers.1.self_attn.k_proj.weight"
    with Subscriber(d.endpoint, view="hf", quantize="fp8-block", dtype=torch.bfloat16) as sub, sub.latest() as snap:
        norm = torch.full(snap.meta("model.norm.weight")[0], 7.0, dtype=torch.bfloat16)
        for name, dtype, wrong in (
            (k, E4M3, torch.bfloat16),
            (k + "_scale_inv", torch.float32, torch.bfloat16),
            (k + "_scale_inv", torch.float32, E4M3),
        ):
            dst = torch.full(snap.meta(name)[0], 7.0, dtype=wrong)
            with pytest.raises(StagerError) as info:
                snap.load_into({"model.norm.weight": norm, name: dst})
            assert info.value.code == ErrorCode.BAD_VALUE
            assert name in info.value.message and f"as {dtype}" in info.value.message
            assert f"load it into is {wrong}" in info.value.message
            assert (dst.float() == 7).all() and (norm == 7).all()  # nothing written
        good = {k: torch.empty((80, 160), dtype=E4M3), k + "_scale_inv": torch.empty((1, 2))}
        assert snap.load_into(good) == [k, k + "_scale_inv"]
        assert same(good[k], snap[k]) and same(good[k + "_scale_inv"], snap[k + "_scale_inv"])


def test_fp8_read_options_are_checked_and_a_version_without_a_known_layout_is_a_typed_error(make_daemon):
    d = make_daemon()
    with pytest.raises(ValueError, match="view='hf'"):
        Subscriber(d.endpoint, quantize="fp8-block")
    with pytest.raises(ValueError, match="quantize must be one of"):
        Subscriber(d.endpoint, view="hf", quantize="int4")
    with pytest.raises(ValueError, match="would cast without scales"):
        Subscriber(d.endpoint, view="hf", dtype=torch.float8_e4m3fn)
    with StagingClient(d.endpoint, strict=True) as client:
        client.stage(
            {"transformer.h.0.mlp.c_fc.weight": torch.ones(4, 4)},
            step=1,
            model_info={"adapter": "identity", "hf_config": {"model_type": "gpt2"}},
        ).wait(30)
    with Subscriber(d.endpoint, view="hf", quantize="fp8-block") as sub:
        with pytest.raises(StagerError) as info:
            sub.latest()
        assert info.value.code == ErrorCode.BAD_VALUE and "model_type is 'gpt2'" in info.value.message
        assert d.status()["leases"] == 0  # the lease went with the refusal
    with Subscriber(d.endpoint, view="hf") as sub, sub.latest() as snap:
        assert list(snap) == ["transformer.h.0.mlp.c_fc.weight"]


def test_fp8_export_loads_in_transformers_with_logits_within_e4m3s_error_of_the_bf16_export(make_daemon, tmp_path):
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it
    d = make_daemon()
    native = stage(d.endpoint, WHOLE)
    plain = hf_view(d.endpoint)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stager.cli",
            "export-hf",
            "--endpoint",
            d.endpoint,
            "--out",
            str(tmp_path / "fp8"),
            "--dtype",
            "bfloat16",
            "--quantize",
            "fp8-block",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    fp8 = json.loads(out.stdout)["exported"]
    (bf16,) = export_hf(str(tmp_path / "bf16"), endpoint=d.endpoint, dtype="bfloat16")
    config = json.load(open(os.path.join(fp8, "config.json")))
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    assert config["torch_dtype"] == "bfloat16"
    written = load_file(os.path.join(fp8, "model.safetensors"))
    with Subscriber(d.endpoint, view="hf", quantize="fp8-block", dtype=torch.bfloat16) as sub, sub.latest() as snap:
        read = dict(snap.items())
    assert sorted(written) == sorted(read) and all(same(written[n], read[n]) for n in read)  # reader = exporter
    for name, w in plain.items():
        if llama_fp8_weight(name):
            data, scale_inv = vllm_per_block_cast_to_fp8(w)
            assert same(written[name], data) and same(written[name + "_scale_inv"], scale_inv), name
    model = transformers.AutoModelForCausalLM.from_pretrained(fp8).eval()  # dequantize=True: forced on CPU
    reference = transformers.AutoModelForCausalLM.from_pretrained(bf16).eval()
    loaded = model.state_dict()
    for name in plain:  # transformers reads our scales as we mean them: its weights are ours dequantized
        want = (
            dequantize_block_fp8(written[name], written[name + "_scale_inv"], dtype=torch.bfloat16)
            if llama_fp8_weight(name)
            else written[name]
        )
        assert same(loaded[name], want), name
    tokens = torch.randint(0, WHOLE["vocab_size"], (2, 16))
    with torch.no_grad():
        got, want, exact = model(tokens).logits.float(), reference(tokens).logits.float(), native(tokens)
    # e4m3 keeps 3 mantissa bits: each weight moves by at most 2^-4 of itself (its unit roundoff). Rounding
    # errors of random sign average out in each dot product, so the logits move by less than that, relative to
    # their norm (measured: ~1.3%, against ~0.5% for the bf16 export's from the fp32 model's own logits)
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < 2.0**-4, error
    assert ((want - exact).norm() / exact.norm()).item() < error


def test_partial_block_fp8_export_loads_back_with_load_hf_and_verifies(make_daemon, tmp_path):
    """transformers (5.23) tells the block from the scale grid: it refuses or misreads [80, 160] in 128-blocks.
    load-hf reads the block from quantization_config, as vLLM does."""
    d, loaded = make_daemon(), make_daemon()
    stage(d.endpoint, PARTIAL)
    plain = hf_view(d.endpoint)
    (path,) = export_hf(str(tmp_path), endpoint=d.endpoint, quantize="fp8-block")
    written = load_file(os.path.join(path, "model.safetensors"))
    assert written["model.layers.0.self_attn.k_proj.weight_scale_inv"].shape == (1, 2)

    def stager(*args):
        return subprocess.run([sys.executable, "-m", "stager.cli", *args], capture_output=True, text=True, timeout=120)

    out = stager("load-hf", path, "--endpoint", loaded.endpoint, "--adapter", "llama3", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    back = hf_view(loaded.endpoint)
    assert list(back) == list(plain)
    for name, w in plain.items():
        if llama_fp8_weight(name):
            assert same(back[name], dequantize_block_fp8(*vllm_per_block_cast_to_fp8(w))), name
        else:
            assert same(back[name], w), name
    assert stager("verify", path).returncode == 0
    scale = read_header(os.path.join(path, "model.safetensors"))["model.layers.1.mlp.down_proj.weight_scale_inv"]
    with open(scale.path, "r+b") as f:  # one flipped bit in one scale
        f.seek(scale.start + 1)
        byte = f.read(1)
        f.seek(scale.start + 1)
        f.write(bytes([byte[0] ^ 1]))
    out = stager("verify", path, "--json")
    assert out.returncode == 1 and json.loads(out.stdout)["mismatched"] == [scale.name]


def test_a_scale_in_another_file_than_its_weight_is_quantized_by_its_own_writer(make_daemon, tmp_path):
    """Per-node exporters write some files each: the writer of a file holding only scales quantizes the weight."""
    d = make_daemon()
    stage(d.endpoint, PARTIAL)
    plain = hf_view(d.endpoint)
    with Subscriber(d.endpoint) as sub, sub.latest() as snap:
        ep = plan_export(snap, quantize="fp8-block", max_shard_size=1)  # one tensor per file
        name = "model.layers.0.mlp.up_proj.weight_scale_inv"
        (f,) = [f for f, indices in enumerate(ep.files) if ep.tensors[indices[0]].name == name]
        assert write_files(snap, ep, [f], str(tmp_path), {}) == {name: ep.names[f]}
    assert same(
        load_file(str(tmp_path / ep.names[f]))[name],
        vllm_per_block_cast_to_fp8(plain["model.layers.0.mlp.up_proj.weight"])[1],
    )


def test_an_export_that_is_not_quantized_drops_a_staged_fp8_quantization_config(make_daemon, tmp_path):
    """A version loaded from an FP8 checkpoint carries its config.json: exported dequantized, its
    quantization_config would make transformers (on GPU) and vLLM read bf16 weights as e4m3."""
    d = make_daemon()
    config = {
        **hf_config(PARTIAL),
        "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    }
    stage(d.endpoint, PARTIAL, {"hf_config": config})
    (path,) = export_hf(str(tmp_path / "plain"), endpoint=d.endpoint, dtype="bfloat16")
    assert "quantization_config" not in json.load(open(os.path.join(path, "config.json")))
    assert all(t.dtype == torch.bfloat16 for t in load_file(os.path.join(path, "model.safetensors")).values())
    (path,) = export_hf(str(tmp_path / "fp8"), endpoint=d.endpoint, quantize="fp8-block")
    assert json.load(open(os.path.join(path, "config.json")))["quantization_config"]["weight_block_size"] == [128, 128]


def test_a_whole_dict_plugin_adapter_is_quantized_by_the_configs_model_type(make_daemon):
    """A plug-in adapter (torchtitan's StateDictAdapter shape) converts whole dicts: its HF names are quantized
    by the rule of the HF config's model_type."""
    d = make_daemon()
    torch.manual_seed(3)
    sd = {"model.layers.0.mlp.up_proj.weight": torch.randn(200, 160), "model.norm.weight": torch.randn(160)}
    with StagingClient(d.endpoint, strict=True) as client:
        client.stage(sd, step=1).wait(30)
    config = {"prefix": "", "model_type": "llama"}  # EagerPlugin prefixes names with hf_config["prefix"]
    with (
        Subscriber(d.endpoint, view="hf", adapter="helpers:EagerPlugin", hf_config=config, quantize="fp8-block") as sub,
        sub.latest() as snap,
    ):
        assert list(snap) == [
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.up_proj.weight_scale_inv",
            "model.norm.weight",
        ]
        data, scale_inv = vllm_per_block_cast_to_fp8(sd["model.layers.0.mlp.up_proj.weight"])
        assert same(snap["model.layers.0.mlp.up_proj.weight"], data)
        assert same(snap["model.layers.0.mlp.up_proj.weight_scale_inv"], scale_inv)
        assert same(snap["model.norm.weight"], sd["model.norm.weight"])
