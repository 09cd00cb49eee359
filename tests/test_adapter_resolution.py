"""One adapter contract and one way to pick an adapter: what staged data may name, and what it may not.

Staged model_info is data from the trainer. A consumer (Subscriber's HF view, the HF exporter)
takes only built-in adapter names and a dict config from it: it never imports a module or opens
a file that staged data names. The consumer's own ``adapter=`` / ``--adapter`` and
``hf_config=`` / ``--hf-config`` may.
"""

import json
import subprocess
import sys

import pytest
import torch

from helpers import CONFIG, EagerPlugin
from stager.client import StagingClient, Subscriber
from stager.client.adapters import (
    BUILT_IN,
    Adapter,
    DeepSeekV3Adapter,
    PerTensorAdapter,
    hf_items,
    hf_names,
    is_per_tensor,
    load_adapter,
    resolve_adapter,
    to_hf_items,
)
from stager.protocol import ErrorCode, StagerError
from stager.protocol.dtypes import torch_names
from stager.writers.export_hf import export_hf, export_snapshot

SIDE_EFFECT_MODULE = "stager_test_side_effect_plugin"


@pytest.fixture
def side_effect_plugin(tmp_path, monkeypatch):
    """A plug-in module whose import leaves a mark: proves a refused spec was never imported."""
    mark = tmp_path / "imported"
    (tmp_path / f"{SIDE_EFFECT_MODULE}.py").write_text(
        f"open({str(mark)!r}, 'w').close()\n"
        "class Plugin:\n"
        "    def __init__(self, hf_config): pass\n"
        "    def to_hf(self, sd): return dict(sd)\n"
        "    def from_hf(self, sd): return dict(sd)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield f"{SIDE_EFFECT_MODULE}:Plugin", mark
    sys.modules.pop(SIDE_EFFECT_MODULE, None)


def test_the_protocols_tell_whole_dict_from_per_tensor_adapters():
    plugin = EagerPlugin({"prefix": "x."})
    assert isinstance(plugin, Adapter) and not isinstance(plugin, PerTensorAdapter) and not is_per_tensor(plugin)
    for name in BUILT_IN:
        cfg = {
            **CONFIG,
            "n_routed_experts": 2,
            "moe_intermediate_size": 4,
            "kv_lora_rank": 4,
            "qk_nope_head_dim": 4,
            "qk_rope_head_dim": 4,
            "v_head_dim": 4,
            "first_k_dense_replace": 1,
        }
        assert isinstance(load_adapter(name, cfg), PerTensorAdapter), name
    assert not isinstance(object(), Adapter)


def test_one_function_set_for_both_kinds():
    llama = load_adapter("llama3", CONFIG)
    layout = [("layers.0.attention.wk.weight", torch.float32, (16, 32)), ("norm.weight", torch.bfloat16, (32,))]
    planned = hf_names(llama, layout)
    assert [(t.name, t.source, t.shape, t.dtype) for t in planned] == [
        ("model.layers.0.self_attn.k_proj.weight", "layers.0.attention.wk.weight", (16, 32), torch.float32),
        ("model.norm.weight", "norm.weight", (32,), torch.bfloat16),
    ]
    assert planned[1].strided == ((32,), (1,), 0)  # a rename is a view: boxes of it are boxes of the source
    assert [n for n, _ in hf_items(llama, "norm.weight", torch.ones(32))] == ["model.norm.weight"]

    plugin = EagerPlugin({"prefix": "x."})
    assert [(t.name, t.source, t.shape) for t in hf_names(plugin, layout)] == [
        ("x.layers.0.attention.wk.weight", "", (16, 32)),
        ("x.norm.weight", "", (32,)),
    ]
    assert dict(to_hf_items(plugin, [("a", 1), ("b", 2)])) == {"x.a": 1, "x.b": 2}  # the whole dict, once
    with pytest.raises(StagerError, match="converts whole state dicts only"):
        hf_items(plugin, "a", torch.ones(1))


def test_two_tensors_on_one_hf_name_are_refused():
    layout = [("output.weight", torch.float32, (96, 32)), ("lm_head.weight", torch.float32, (96, 32))]
    with pytest.raises(StagerError, match="same HF name 'lm_head.weight'"):
        hf_names(load_adapter("llama3", CONFIG), layout)


def test_staged_module_attr_is_refused_and_never_imported(side_effect_plugin):
    spec, mark = side_effect_plugin
    with pytest.raises(StagerError) as info:
        resolve_adapter(None, None, {"adapter": spec, "hf_config": {}})
    assert info.value.code == ErrorCode.BAD_VALUE
    assert "--adapter module:attr" in info.value.message and "adapter=" in info.value.message
    with pytest.raises(StagerError, match="--adapter module:attr"):
        load_adapter(spec, {}, origin="staged")
    assert not mark.exists() and SIDE_EFFECT_MODULE not in sys.modules
    # the same spec named by the consumer itself is imported (a staged one is ignored then)
    chosen = resolve_adapter(spec, None, {"adapter": "gpt9"})
    assert type(chosen.adapter).__name__ == "Plugin" and chosen.origin == "consumer" and mark.exists()


def test_staged_built_in_names_and_dict_configs_are_accepted():
    chosen = resolve_adapter(None, None, {"adapter": "llama3", "hf_config": CONFIG})
    assert type(chosen.adapter).__name__ == "Llama3Adapter" and chosen.origin == "staged"
    assert chosen.hf_config == CONFIG
    assert type(resolve_adapter(None, None, None).adapter).__name__ == "IdentityAdapter"
    plugin = EagerPlugin({})
    assert resolve_adapter(plugin, None, {"adapter": "x:y"}).adapter is plugin  # objects: the consumer's
    with pytest.raises(StagerError, match="has no to_hf/from_hf"):
        resolve_adapter(object(), None, None)


def test_staged_hf_config_path_is_never_opened(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    with pytest.raises(StagerError) as info:
        resolve_adapter(None, None, {"adapter": "llama3", "hf_config": str(path)})
    assert info.value.code == ErrorCode.BAD_VALUE and "--hf-config" in info.value.message
    assert str(path) not in opened
    # the consumer's own path is read
    chosen = resolve_adapter(None, str(path), {"adapter": "llama3", "hf_config": "/etc/shadow"})
    assert chosen.hf_config == CONFIG and str(path) in opened and "/etc/shadow" not in opened


def test_no_config_anywhere_says_how_to_give_one():
    with pytest.raises(StagerError, match="--hf-config PATH"):
        resolve_adapter("identity", None, {}, require_config=True)


def stage(endpoint, info, step=3):
    torch.manual_seed(0)
    sd = {"norm.weight": torch.randn(32), "tok_embeddings.weight": torch.randn(96, 32)}
    with StagingClient(endpoint, strict=True) as c:
        c.stage(sd, step=step, model_info=info).wait(10)
    return sd


def test_readers_and_exporters_refuse_staged_plug_ins_and_paths(make_daemon, tmp_path, side_effect_plugin):
    spec, mark = side_effect_plugin
    d = make_daemon()
    stage(d.endpoint, {"adapter": spec, "hf_config": dict(CONFIG)}, step=1)
    with Subscriber(d.endpoint, view="hf") as sub:
        with pytest.raises(StagerError, match="--adapter module:attr"):
            sub.latest()
        assert d.status()["leases"] == 0  # the refused acquire was released
    with pytest.raises(StagerError, match="--adapter module:attr"):
        export_hf(str(tmp_path / "out"), endpoint=d.endpoint)
    assert not mark.exists()

    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    # a path in model_info is refused already when staging (and by the daemon); consumers refuse it too
    with pytest.raises(StagerError, match="never a path"):
        stage(d.endpoint, {"adapter": "llama3", "hf_config": str(config)}, step=2)
    stage(d.endpoint, {"adapter": "llama3"}, step=3)
    # named on the consumer side, both work
    with Subscriber(d.endpoint, view="hf", hf_config=str(config)) as sub, sub.latest() as snap:
        assert "model.norm.weight" in snap
    (path,) = export_hf(str(tmp_path / "out"), endpoint=d.endpoint, hf_config=str(config))
    assert path.endswith("step-00000003")


def test_export_reports_its_own_time_and_bytes(tmp_path):
    class Snap(dict):
        step, model_info = 4, {"adapter": "identity", "hf_config": {"model_type": "llama"}}

    reports = []
    path = export_snapshot(Snap(w=torch.zeros(4, 4)), str(tmp_path), on_export=reports.append, progress=False)
    assert reports == [{"exported": path, "step": 4, "seconds": reports[0]["seconds"], "bytes": 64, "files": 1}]
    assert reports[0]["seconds"] >= 0


def test_export_hf_help_lists_every_choice():
    out = subprocess.run(
        [sys.executable, "-m", "stager.cli", "export-hf", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "400", "PATH": ""},
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "deepseek_v3" in BUILT_IN and DeepSeekV3Adapter is BUILT_IN["deepseek_v3"]
    for name in BUILT_IN:
        assert name in text, name
    assert "{" + ",".join(torch_names(floating=True)) + "}" in text
    assert '"exported"' in text and '"seconds"' in text
