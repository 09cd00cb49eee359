"""Checkpoints into the daemon (load-hf, load-dcp) and the conversions built on them: bit-exact
versions, FP8 block dequantization, typed errors naming the file and tensor, nothing half-loaded."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from stager.client import StagingClient, Subscriber
from stager.client.adapters import load_adapter
from stager.client.admin import daemon_status
from stager.formats.hf_checkpoint import CheckpointError
from stager.formats.integrity import verify
from stager.loaders.load_dcp import load_dcp
from stager.loaders.load_hf import load_hf
from stager.protocol import ErrorCode

CONFIG = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "torch_dtype": "float32",
}


def hf_llama(seed=0):
    """A Llama-family state dict in HF names (what transformers saves), deterministic."""
    g = torch.Generator().manual_seed(seed)
    h, i, kv = 32, 48, 16
    sd = {
        "model.embed_tokens.weight": torch.randn(96, h, generator=g),
        "model.norm.weight": torch.rand(h, generator=g),
        "lm_head.weight": torch.randn(96, h, generator=g),
    }
    for n in range(2):
        p = f"model.layers.{n}."
        sd.update(
            {
                p + "self_attn.q_proj.weight": torch.randn(h, h, generator=g),
                p + "self_attn.k_proj.weight": torch.randn(kv, h, generator=g),
                p + "self_attn.v_proj.weight": torch.randn(kv, h, generator=g),
                p + "self_attn.o_proj.weight": torch.randn(h, h, generator=g),
                p + "mlp.gate_proj.weight": torch.randn(i, h, generator=g),
                p + "mlp.up_proj.weight": torch.randn(i, h, generator=g),
                p + "mlp.down_proj.weight": torch.randn(h, i, generator=g),
                p + "input_layernorm.weight": torch.rand(h, generator=g),
                p + "post_attention_layernorm.weight": torch.rand(h, generator=g),
            }
        )
    return sd


def save_sharded(sd, directory, files=3):
    """Sharded safetensors + index + config.json, as save_pretrained writes them."""
    os.makedirs(directory, exist_ok=True)
    names = list(sd)
    weight_map = {}
    for f in range(files):
        part = names[f::files]
        fname = f"model-{f + 1:05d}-of-{files:05d}.safetensors"
        save_file({n: sd[n] for n in part}, os.path.join(directory, fname))
        weight_map.update({n: fname for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(CONFIG, fh)
    return directory


def sealed_steps(endpoint):
    return [v["step"] for v in daemon_status(endpoint)["versions"] if v["state"] == "sealed"]


def test_load_hf_through_the_adapter_then_ranks_restore_from_it(make_daemon, tmp_path):
    d = make_daemon()
    hf = hf_llama()
    src = save_sharded(hf, str(tmp_path / "hf"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stager.cli",
            "load-hf",
            src,
            "--adapter",
            "llama3",
            "--step",
            "5",
            "--endpoint",
            d.endpoint,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["step"] == 5 and report["tensors"] == len(hf) and report["files"] == 3
    native = load_adapter("llama3", CONFIG).from_hf(dict(hf))
    with Subscriber(d.endpoint) as sub, sub.latest() as snap:
        assert snap.model_info["source"]["format"] == "hf" and snap.model_info["adapter"] == "llama3"
        assert sorted(snap) == sorted(native) and all(torch.equal(snap[k], v) for k, v in native.items())
    with Subscriber(d.endpoint, view="hf") as sub, sub.latest() as snap:  # and back to HF names, bit for bit
        assert all(torch.equal(snap[k], v) for k, v in hf.items())
    target = {k: torch.zeros_like(v) for k, v in native.items()}
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as client:
        assert client.restore(target) == 5
    assert all(torch.equal(target[k], v) for k, v in native.items())


def test_load_hf_into_a_new_daemon_takes_the_memory_it_preallocated(make_daemon, tmp_path):
    from helpers import wait_until

    d = make_daemon(preallocate=8 << 20)
    hf = hf_llama(seed=3)
    src = save_sharded(hf, str(tmp_path / "hf"))
    wait_until(lambda: daemon_status(d.endpoint)["memory"]["preallocated"])
    assert load_hf(src, endpoint=d.endpoint)["tensors"] == len(hf)
    assert daemon_status(d.endpoint)["memory"]["preallocated"] == 0
    with Subscriber(d.endpoint) as sub, sub.latest() as snap:
        assert all(torch.equal(snap[k], v) for k, v in hf.items())


@pytest.mark.parametrize("adapter", ["identity", "llama3"])
def test_load_hf_into_a_daemon_on_another_host_sends_frames(make_daemon, tmp_path, monkeypatch, adapter):
    d = make_daemon()
    hf = hf_llama(seed=1)
    src = save_sharded(hf, str(tmp_path / "hf"))
    monkeypatch.setenv("STAGER_HOST_ID", "another-node")  # the loader is not on the daemon's host: no shared memory
    report = load_hf(src, endpoint=d.endpoint, adapter=adapter)
    monkeypatch.delenv("STAGER_HOST_ID")
    assert report["tensors"] == len(hf)
    expected = load_adapter(adapter, CONFIG).from_hf(dict(hf))
    with Subscriber(d.endpoint) as sub, sub.latest() as snap:
        assert sorted(snap) == sorted(expected) and all(torch.equal(snap[k], v) for k, v in expected.items())


def block_quantize(w, block=128):
    """A reference FP8 block quantizer (DeepSeek-V3's checkpoints): per 128x128 block, scale_inv =
    amax / 448, data = w / scale_inv in float8_e4m3fn."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    scale = torch.empty(rows, cols)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for r in range(rows):
        for c in range(cols):
            tile = w[r * block : (r + 1) * block, c * block : (c + 1) * block]
            scale[r, c] = tile.abs().max().clamp(min=1e-12) / 448.0
            q[r * block : (r + 1) * block, c * block : (c + 1) * block] = (tile / scale[r, c]).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_block_quantized_checkpoint_dequantizes_to_the_training_dtype(make_daemon, tmp_path):
    d = make_daemon()
    w = torch.randn(300, 200)  # blocks that do not divide the shape
    q, scale = block_quantize(w)
    src = tmp_path / "fp8"
    src.mkdir()
    save_file(
        {"proj.weight": q, "proj.weight_scale_inv": scale, "norm.weight": torch.ones(7)}, str(src / "model.safetensors")
    )
    report = load_hf(str(src), endpoint=d.endpoint, dtype="float32")
    assert report["quantized"] == 1
    reference = q.float() * scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    with Subscriber(d.endpoint) as sub, sub.latest() as snap:
        assert sorted(snap) == ["norm.weight", "proj.weight"]  # the scale is consumed, not a tensor of the model
        got = snap["proj.weight"]
        assert got.dtype == torch.float32 and torch.equal(got, reference)
        step = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
        assert ((got - w).abs() <= step * 32).all()  # within e4m3's rounding (3 mantissa bits) of each block


@pytest.mark.parametrize(
    "damage,text",
    [
        ("truncate", r"model-00002-of-00003.safetensors: tensor '.*': ends at byte \d+ but the file holds \d+"),
        ("missing file", r"model-00003-of-00003.safetensors: tensor '.*': is missing"),
        ("garbage header", r"model-00001-of-00003.safetensors: has a header that is not JSON"),
        ("unknown name", r"tensor 'model.layers.0.mlp.frobnicator.weight': the llama3 adapter cannot map it"),
    ],
    ids=["truncated file", "index names a missing file", "corrupt header", "name the adapter does not know"],
)
def test_a_damaged_checkpoint_is_a_typed_error_naming_file_and_tensor_and_leaves_no_version(
    make_daemon, tmp_path, damage, text
):
    d = make_daemon()
    hf = hf_llama()
    if damage == "unknown name":
        hf["model.layers.0.mlp.frobnicator.weight"] = torch.zeros(3)
    src = save_sharded(hf, str(tmp_path / "hf"))
    shard = [os.path.join(src, f"model-0000{i}-of-00003.safetensors") for i in (1, 2, 3)]
    if damage == "truncate":
        os.truncate(shard[1], os.path.getsize(shard[1]) - 100)
    elif damage == "missing file":
        os.unlink(shard[2])
    elif damage == "garbage header":
        with open(shard[0], "r+b") as f:
            f.seek(8)
            f.write(b"\x00not json")
    with pytest.raises(CheckpointError, match=text) as info:
        load_hf(src, endpoint=d.endpoint, adapter="llama3")
    assert info.value.code == ErrorCode.BAD_VALUE
    assert sealed_steps(d.endpoint) == []  # nothing half-loaded is visible


def test_load_dcp_of_write_dcp_and_of_plain_dcp_save_with_the_train_state(make_daemon, tmp_path):
    import torch.distributed.checkpoint as dcp

    from stager.writers.write_dcp import write_dcp

    d = make_daemon()
    state = {
        "model": {"w": torch.randn(6, 4), "b": torch.randn(3).bfloat16()},
        "optim": {"w.exp_avg": torch.randn(6, 4)},
        "train": {"step": 12, "data": {"position": 999}},
    }
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
        client.stage(state, step=12).wait(10)
    path = write_dcp(str(tmp_path / "dcp"), endpoint=d.endpoint)[0]
    d2 = make_daemon()
    report = load_dcp(path, endpoint=d2.endpoint)
    assert report["step"] == 12 and report["tensors"] == 3 and report["objects"] == 2 and report["skipped"] == 0
    with Subscriber(d2.endpoint) as sub, sub.latest() as snap:
        assert snap.objects == {"train.step": 12, "train.data.position": 999}
        assert torch.equal(snap["model.w"], state["model"]["w"]) and torch.equal(snap["model.b"], state["model"]["b"])
        assert torch.equal(snap["optim.w.exp_avg"], state["optim"]["w.exp_avg"])
    plain = str(tmp_path / "plain")  # DCP's own save: no manifest, its non-tensor item is a pickle: skipped
    dcp.save({"w": torch.arange(10.0), "note": {"a": 1}}, checkpoint_id=plain, no_dist=True)
    report = load_dcp(plain, endpoint=d2.endpoint, step=13)
    assert report["skipped"] == 1 and report["objects"] == 0
    with Subscriber(d2.endpoint) as sub, sub.latest() as snap:
        assert snap.step == 13 and torch.equal(snap["w"], torch.arange(10.0)) and snap.objects == {}
    os.truncate(os.path.join(path, "__0_0.distcp"), 10)
    d3 = make_daemon()
    with pytest.raises(Exception, match="__0_0.distcp"):
        load_dcp(path, endpoint=d3.endpoint)
    assert sealed_steps(d3.endpoint) == []


def test_convert_hf_to_dcp_to_hf_and_to_one_torch_save_file(tmp_path):
    import torch.distributed.checkpoint as dcp

    hf = hf_llama(3)
    src = save_sharded(hf, str(tmp_path / "hf"))
    native = load_adapter("llama3", CONFIG).from_hf(dict(hf))

    def cli(*args):
        out = subprocess.run(
            [sys.executable, "-m", "stager.cli", "convert", *args, "--json"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["written"]

    ckpt = cli(src, str(tmp_path / "dcp"), "--to", "dcp", "--adapter", "llama3", "--prefix", "model.")
    template = {f"model.{k}": torch.zeros_like(v) for k, v in native.items()}
    dcp.load(template, checkpoint_id=ckpt, no_dist=True)
    assert all(torch.equal(template[f"model.{k}"], v) for k, v in native.items())
    back = cli(ckpt, str(tmp_path / "hf2"), "--to", "hf")  # the adapter, HF config and prefix came along
    exported = {}
    for name in os.listdir(back):
        if name.endswith(".safetensors"):
            exported.update(load_file(os.path.join(back, name)))
    assert sorted(exported) == sorted(hf) and all(torch.equal(exported[k], v) for k, v in hf.items())
    single = cli(ckpt, str(tmp_path / "model.pt"), "--to", "torch", "--model-only")
    loaded = torch.load(single, weights_only=True)
    assert sorted(loaded) == sorted(template) and all(torch.equal(loaded[f"model.{k}"], v) for k, v in native.items())


def test_an_hf_export_with_recipe_state_resumes_model_optimizer_and_train_state(make_daemon, tmp_path):
    from stager.writers.export_hf import export_hf

    native = load_adapter("llama3", CONFIG).from_hf(hf_llama(5))
    optim = {f"state.{k}.exp_avg": torch.randn(v.shape) for k, v in list(native.items())[:4]}
    state = {"model": native, "optim": optim, "train": {"step": 40, "data": {"epoch": 2, "position": 77}}}
    d = make_daemon()
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
        client.stage(state, step=40, model_info={"adapter": "llama3", "hf_config": CONFIG, "prefix": "model."}).wait(10)
    path = export_hf(
        str(tmp_path / "hf"), endpoint=d.endpoint, recipe_state=True, max_shard_size="40KB", progress=False
    )[0]
    files = sorted(os.listdir(path))
    assert (
        "recipe_state.safetensors" in files and "recipe_state.json" in files and "model.safetensors.index.json" in files
    )
    assert sorted(load_file(os.path.join(path, "recipe_state.safetensors"))) == sorted(f"optim.{k}" for k in optim)
    assert verify(path)["ok"]  # the recipe state is in the manifest too
    d2 = make_daemon()
    report = load_hf(path, endpoint=d2.endpoint, adapter="llama3", prefix="model.")
    assert report["step"] == 40
    target = {
        "model": {k: torch.zeros_like(v) for k, v in native.items()},
        "optim": {k: torch.zeros_like(v) for k, v in optim.items()},
        "train": {"step": 0, "data": {}},
    }
    with StagingClient(d2.endpoint, rank=0, local_world_size=1, world_size=1) as client:
        assert client.restore(target) == 40
    assert all(torch.equal(target["model"][k], v) for k, v in native.items())
    assert all(torch.equal(target["optim"][k], v) for k, v in optim.items())
    assert target["train"] == {"step": 40, "data": {"epoch": 2, "position": 77}}


def test_a_load_that_fails_while_reading_aborts_its_step_and_leaves_no_version(make_daemon, tmp_path, monkeypatch):
    import stager.loaders.load_hf as loader

    d = make_daemon()
    src = save_sharded(hf_llama(), str(tmp_path / "hf"))
    real, calls = loader.SegmentFile.copy_from, []

    def truncating(self, src_fd, src_offset, dst):  # the third tensor's file is truncated while the load runs
        calls.append(src_offset)
        if len(calls) == 3:
            os.truncate(os.readlink(f"/proc/self/fd/{src_fd}"), src_offset + dst.nbytes - 100)
        return real(self, src_fd, src_offset, dst)

    monkeypatch.setattr(loader.SegmentFile, "copy_from", truncating)
    with pytest.raises(CheckpointError, match="ends 100 bytes short"):
        load_hf(src, endpoint=d.endpoint, threads=1)
    status = daemon_status(d.endpoint)
    assert sealed_steps(d.endpoint) == [] and [v["state"] for v in status["versions"]] == ["failed"]
    assert "aborted" in status["versions"][0]["reason"] and "ends 100 bytes short" in status["versions"][0]["reason"]


_STALLING_LOADER = """
import os, sys, threading
import stager.loaders.load_hf as loader
real, calls = loader.SegmentFile.copy_from, []

def stalling(self, src_fd, src_offset, dst):  # half-way through: say so, then wait to be killed
    calls.append(1)
    if len(calls) == 3:
        open(sys.argv[3], "w").close()
        threading.Event().wait()
    return real(self, src_fd, src_offset, dst)

loader.SegmentFile.copy_from = stalling
loader.load_hf(sys.argv[1], endpoint=sys.argv[2], threads=1)
"""


def test_a_loader_killed_mid_load_leaves_no_version_and_the_next_load_succeeds(make_daemon, tmp_path):
    import signal

    from helpers import wait_until

    d = make_daemon()
    hf = hf_llama(seed=2)
    src = save_sharded(hf, str(tmp_path / "hf"))
    marker = tmp_path / "half-way"
    proc = subprocess.Popen([sys.executable, "-c", _STALLING_LOADER, src, d.endpoint, str(marker)])
    try:
        wait_until(lambda: marker.exists() or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, "the loader ended before it was half-way"
        assert [v["state"] for v in daemon_status(d.endpoint)["versions"]] == ["staging"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    failed = wait_until(lambda: [v for v in daemon_status(d.endpoint)["versions"] if v["state"] == "failed"], 30)
    assert sealed_steps(d.endpoint) == [] and len(failed) == 1 and "left during step 0" in failed[0]["reason"]
    report = load_hf(src, endpoint=d.endpoint, step=1)  # the daemon takes the next loader at once
    assert report["step"] == 1 and sealed_steps(d.endpoint) == [1]
    with Subscriber(d.endpoint) as sub, sub.latest() as snap:
        assert all(torch.equal(snap[k], v) for k, v in hf.items())


@pytest.fixture
def segment_file():
    """A segment file of this user, as a daemon would create it, with a SegmentFile onto it."""
    from stager.loaders.ingest import SegmentFile
    from stager.protocol.shm import segment_name, segment_path

    name = segment_name(os.getpid(), "segfile", 7)
    with open(segment_path(name), "wb") as f:
        f.truncate(1 << 20)
    seg = SegmentFile(name, 1 << 20)
    yield seg
    seg.close()
    os.unlink(segment_path(name))


def test_segment_file_copies_and_falls_back_to_a_buffer_where_the_source_cannot_splice(
    segment_file, tmp_path, monkeypatch
):
    import errno

    from stager.loaders.ingest import SegmentRange

    data = torch.arange(1000, dtype=torch.float32)
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100 + data.numpy().tobytes())
    fd = os.open(src, os.O_RDONLY)
    try:
        first, second = SegmentRange(64, 4000, torch.float32, (1000,)), SegmentRange(8192, 4000, torch.float32, (1000,))
        assert segment_file.copy_from(fd, 100, first) == 4000

        def no_splice(*args):
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(os, "sendfile", no_splice)
        assert segment_file.copy_from(fd, 100, second) == 4000
        assert segment_file.copy_from(fd, 100 + 2000, second) == 2000  # the source ends first: short
    finally:
        os.close(fd)
    with open(segment_file.path, "rb") as f:
        raw = f.read()
    assert raw[64:4064] == data.numpy().tobytes() and raw[8192:10192] == data.numpy().tobytes()[2000:]


def test_segment_file_never_writes_a_file_put_under_the_segments_name_since(segment_file):
    import threading

    from stager.loaders.ingest import SegmentRange
    from stager.protocol import StagerError

    os.unlink(segment_file.path)  # the daemon failed the step; then someone creates a file of that name
    with open(segment_file.path, "wb") as f:
        f.truncate(1 << 20)
    errors = []

    def another_writer():  # a thread of its own opens its own descriptor
        try:
            segment_file.write(torch.ones(4), SegmentRange(0, 16, torch.float32, (4,)))
        except StagerError as exc:
            errors.append(exc)

    t = threading.Thread(target=another_writer)
    t.start()
    t.join()
    assert len(errors) == 1 and "another file than the step's segment" in errors[0].message
    with open(segment_file.path, "rb") as f:
        assert f.read(16) == bytes(16)


def test_convert_to_torch_writes_each_byte_once_and_loaded_tensors_carry_nothing_of_stager(make_daemon, tmp_path):
    from stager.writers.write_dcp import write_dcp

    g = torch.Generator().manual_seed(3)
    model = {f"layers.{i}.w": torch.randn(64, 64, generator=g) for i in range(8)}
    optim = {f"layers.{i}.w.exp_avg": torch.randn(64, 64, generator=g) for i in range(8)}
    d = make_daemon()
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
        client.stage({"model": model, "optim": optim, "train": {"step": 5}}, step=5).wait(10)
    ckpt = write_dcp(str(tmp_path / "dcp"), endpoint=d.endpoint)[0]
    out = subprocess.run(
        [sys.executable, "-m", "stager.cli", "convert", ckpt, str(tmp_path / "all.pt"), "--to", "torch", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    path = json.loads(out.stdout)["written"]
    tensor_bytes = sum(t.numel() * t.element_size() for t in [*model.values(), *optim.values()])
    # torch.save's zip entries and pickle: well under 1 KiB per tensor
    assert os.path.getsize(path) <= 1.05 * tensor_bytes + 1024 * (len(model) + len(optim)), (
        f"{os.path.getsize(path)} bytes for {tensor_bytes} bytes of tensors"
    )
    loaded = torch.load(path, weights_only=True)
    assert loaded["train.step"] == 5
    expected = {**{f"model.{k}": v for k, v in model.items()}, **{f"optim.{k}": v for k, v in optim.items()}}
    assert sorted(n for n in loaded if n != "train.step") == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(loaded[name], t) and loaded[name].__dict__ == {}, name
        assert loaded[name].untyped_storage().nbytes() == t.numel() * t.element_size(), name
