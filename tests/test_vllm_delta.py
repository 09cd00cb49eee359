"""Delta updates of a real vLLM engine (vllm-cpu) through the ``stager`` backend: an engine at step N is
brought to M by the daemon's change maps, moving only what changed, and ends bit for bit where a full
update to M puts it (its vLLM weight checksums, greedy tokens and log-probabilities).

The engine starts from ``stager export-hf`` of a tiny Llama (examples/rl_vllm.py's); the versions are
its HF weights with a few elements changed in a few tensors (norm, embedding, LM head: parameters vLLM
keeps as the checkpoint holds them; one element of a q_proj and of a down_proj: linears the CPU backend
packs), staged with the identity adapter to a daemon that keeps change maps in the engine's dtype.
"""

import os
import subprocess
import tempfile

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vLLM is imported
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
pytest.importorskip("vllm", reason="vLLM is not installed in this venv (.ci/run tests it in a venv of its own)")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import rl_vllm  # noqa: E402  (examples/: the tiny model, engine arguments)
from helpers import wait_until  # noqa: E402
from stager.client import StagingClient  # noqa: E402
from stager.client.admin import daemon_status  # noqa: E402
from stager.dev.launch import DaemonProcess  # noqa: E402
from stager.dev.tiny_llama import TinyLlama  # noqa: E402
from stager.integrations.vllm import EngineIncomplete, VerifyFailed, update  # noqa: E402
from stager.integrations.vllm.handles import LLMHandle  # noqa: E402

LONG = [(i * 37 + 5) % rl_vllm.CONFIG["vocab_size"] for i in range(300)]
PROMPTS = rl_vllm.PROMPTS + [LONG]
COPIED = ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight")  # patched in place
PACKED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")  # repacked


def changed(weights: dict, seed: int) -> dict:
    """``weights`` with 3 elements of each COPIED tensor and 1 of each PACKED one changed (never element 0)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(weights)
    for name in COPIED + PACKED:
        t = weights[name].clone()
        flat = t.view(-1)
        for i in torch.randint(1, flat.numel(), (3 if name in COPIED else 1,), generator=g).tolist():
            flat[i] += 0.25
        out[name] = t
    return out


class World:
    def __init__(self, root: str):
        self.root = root
        args = ("--memory-limit", "256MiB", "--keep", "8", "--change-maps", "float32")
        self.daemon = DaemonProcess(f"ipc://{root}/d.sock", args=args).start()
        self.endpoint = self.daemon.endpoint
        torch.manual_seed(0)
        with StagingClient(self.endpoint, strict=True) as client:
            client.stage(TinyLlama(rl_vllm.CONFIG).state_dict(), step=0, model_info=rl_vllm.MODEL_INFO).wait(60)
        self.step0 = rl_vllm.export_step(self.endpoint, f"{root}/hf", 0)
        self.weights = {10: load_file(os.path.join(self.step0, "model.safetensors"))}
        for step in (11, 12, 13):
            self.weights[step] = changed(self.weights[step - 1], step)
        stage(self.endpoint, self.weights, maps_after=10)
        self.llm = rl_vllm.make_engine(self.step0)
        self.full: dict[int, tuple] = {}

    def status(self) -> dict:
        return daemon_status(self.endpoint)

    def engine(self):
        return self.llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.weight_transfer_engine

    def reference(self, step: int) -> tuple:
        """Outputs and vLLM weight checksums of this engine after a full update to ``step``."""
        if step not in self.full:
            self.engine().delta = False
            try:
                update(self.llm, step, endpoint=self.endpoint, init_info={})
            finally:
                self.engine().delta = True
            assert self.engine().last_update["delta"] is None
            self.full[step] = (rl_vllm.greedy(self.llm, PROMPTS), LLMHandle(self.llm).checksums())
        return self.full[step]


def stage(endpoint: str, weights: dict, maps_after: int | None = None) -> None:
    """Stage ``weights`` in order; with ``maps_after``, each step above it waits for its change map before the
    next is staged (a map that cannot be made before the next step comes is skipped by design, and a loaded
    machine would skip these)."""
    with StagingClient(endpoint, strict=True) as client:
        for step, sd in weights.items():
            client.stage(sd, step=step, model_info={"adapter": "identity"}).wait(60)
            if maps_after is not None and step > maps_after:
                wait_until(lambda: any(v["step"] == step and v.get("changed") for v in _versions(endpoint)), 60)


def _versions(endpoint: str) -> list:
    return daemon_status(endpoint)["versions"]


@pytest.fixture(scope="module")
def world():
    root = tempfile.mkdtemp(prefix="stgd", dir="/tmp")  # ipc paths must stay short
    w = World(root)
    try:  # a setup that fails (maps not made in time) must not leave its daemon running
        wait_until(lambda: all(v.get("changed") for v in w.status()["versions"] if v["step"] > 10), 60)
        yield w
        w.engine().shutdown()
    finally:
        w.daemon.stop()
        subprocess.run(["rm", "-rf", root])


def read_bytes(world) -> int:
    return world.status()["counters"]["read_bytes"]


def elements(world, a: int, b: int, names) -> int:
    """Elements of ``names`` that differ between steps ``a`` and ``b``."""
    return sum(int((world.weights[a][n] != world.weights[b][n]).sum()) for n in names)


def at_reference(world, step: int) -> None:
    outputs, checksums = world.reference(step)
    assert LLMHandle(world.llm).checksums() == checksums  # every weight, bit for bit
    assert rl_vllm.greedy(world.llm, PROMPTS) == outputs  # tokens, log-probabilities, weight version
    assert world.llm.get_weight_version() == str(step)


@pytest.mark.parametrize("remote", [False, True], ids=["shared memory", "frames"])
def test_a_delta_update_moves_only_what_changed_and_equals_a_full_update(world, remote):
    engine = world.engine()
    world.reference(11)
    update(world.llm, 10, endpoint=world.endpoint, init_info={"remote": remote})
    if engine._direct is None:  # the first update proves the direct plan (vLLM's layerwise reload)
        update(world.llm, 10, endpoint=world.endpoint)
    assert engine._direct is not None
    before = read_bytes(world)
    assert update(world.llm, 11, endpoint=world.endpoint).ok  # (verify=True would read what it wrote again)
    moved = read_bytes(world) - before
    last = engine.last_update
    assert last["path"] == "direct", last
    n = len(world.weights[11])
    n_changed = elements(world, 10, 11, COPIED + PACKED)
    got = {"since": 10, "unchanged": n - 5, "indices": 5, "whole": 0, "elements": n_changed}
    assert last["delta"] == got, last
    # tensors read: the three copied ones (their changed values) and the shards of the two changed packed layers
    shards = [n for n in world.weights[11] if n.startswith("model.layers.0.self_attn.") and "o_proj" not in n]
    shards += ["model.layers.1.mlp.down_proj.weight"]
    n_copied = elements(world, 10, 11, COPIED)
    whole_bytes = sum(world.weights[11][n].numel() * 4 for n in shards)
    assert last["tensors"] == len(COPIED) + len(shards) and last["skipped"] == len(world.weights[11]) - last["tensors"]
    assert last["bytes"] == n_copied * 4 + whole_bytes
    # what crossed the daemon's socket: from another host indices and values, plus the rebuilt layers' shards;
    # on its host the indices only (values and shards are read from its shared memory)
    assert moved == (n_copied * (4 + 4) + whole_bytes if remote else n_copied * 4), moved
    at_reference(world, 11)
    update(world.llm, 10, endpoint=world.endpoint, init_info={})


def test_a_delta_chain_that_skips_versions_equals_a_full_update(world):
    engine = world.engine()
    world.reference(13)
    update(world.llm, 11, endpoint=world.endpoint, init_info={})
    assert update(world.llm, 13, endpoint=world.endpoint, verify=True).ok  # maps 11->12->13, values from 13
    assert engine.last_update["delta"]["since"] == 11 and engine.last_update["path"] == "direct"
    assert engine.last_update["delta"]["elements"] == elements(world, 11, 13, COPIED + PACKED)
    at_reference(world, 13)
    # back to a step before the engine's: no map goes backwards, the version is read in full
    update(world.llm, 11, endpoint=world.endpoint)
    assert engine.last_update["delta"] is None and "no change map from step 13" in engine.last_update["why_full"]
    at_reference(world, 11)


def test_the_layerwise_reload_takes_only_the_layers_that_changed(world):
    engine = world.engine()
    world.reference(12)
    update(world.llm, 11, endpoint=world.endpoint, init_info={})
    engine.direct = False
    try:
        seen = []
        engine.on_tensor = seen.append
        update(world.llm, 12, endpoint=world.endpoint)
    finally:
        engine.direct, engine.on_tensor = True, None
    assert engine.last_update["path"] == "layerwise" and engine.last_update["delta"]["since"] == 11
    qkv = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]  # one vLLM layer: fed all three
    assert sorted(seen) == sorted([*COPIED, *qkv, "model.layers.1.mlp.down_proj.weight"])
    at_reference(world, 12)


def test_verify_after_a_delta_catches_an_engine_that_was_not_at_its_base(world):
    engine = world.engine()
    world.reference(11)
    update(world.llm, 10, endpoint=world.endpoint, init_info={})
    engine.model.model.norm.weight.data[0] += 1.0  # written outside stager: element 0 no delta touches
    with pytest.raises(VerifyFailed) as info:
        update(world.llm, 11, endpoint=world.endpoint, verify=True)
    assert info.value.tensors == ["model.norm.weight"] and info.value.step == 11, str(info.value)
    with pytest.raises(EngineIncomplete):
        rl_vllm.greedy(world.llm, PROMPTS)
    assert update(world.llm, 11, endpoint=world.endpoint, verify=True).ok  # incomplete before: read in full
    assert engine.last_update["delta"] is None and "incomplete" in engine.last_update["why_full"]
    at_reference(world, 11)


def test_a_daemon_without_change_maps_gives_a_full_update(world, short_dir):
    engine = world.engine()
    world.reference(11)
    with DaemonProcess(f"ipc://{short_dir}/n.sock", args=("--memory-limit", "64MiB")) as other:
        stage(other.endpoint, {20: world.weights[10], 21: world.weights[11]})
        update(world.llm, 20, endpoint=other.endpoint, init_info={"endpoint": other.endpoint})
        update(world.llm, 21, endpoint=other.endpoint)
        assert engine.last_update["delta"] is None and engine.last_update["path"] == "direct"
        assert "no change map from step 20" in engine.last_update["why_full"]
        assert engine.last_update["tensors"] == len(world.weights[11])
        _, checksums = world.reference(11)
        update(world.llm, 21, endpoint=other.endpoint)
        assert LLMHandle(world.llm).checksums() == checksums
    update(world.llm, 10, endpoint=world.endpoint, init_info={"endpoint": world.endpoint})


def test_weights_changed_without_the_backend_are_not_a_deltas_base(world):
    engine = world.engine()
    world.reference(11)
    update(world.llm, 10, endpoint=world.endpoint, init_info={})
    rl_vllm.greedy(world.llm, PROMPTS)  # serving leaves the parameters as they are: the next update is a delta
    assert update(world.llm, 11, endpoint=world.endpoint).ok and engine.last_update["delta"]["since"] == 10
    update(world.llm, 10, endpoint=world.endpoint)
    with torch.no_grad():  # another writer (vLLM's reload_weights in kernel format copies so): seen by torch
        engine.model.model.norm.weight.copy_(engine.model.model.norm.weight * 2)
    assert update(world.llm, 11, endpoint=world.endpoint).ok
    assert engine.last_update["delta"] is None and "replaced or written" in engine.last_update["why_full"]
    at_reference(world, 11)
    # memory rewritten under a parameter (vLLM's sleep(level=2) and wake_up, its loaders' .data.copy_) is not
    # seen: forget_base (or update info {"full": true}) says so
    update(world.llm, 10, endpoint=world.endpoint)
    engine.model.model.norm.weight.data.mul_(2)
    engine.forget_base()
    assert update(world.llm, 11, endpoint=world.endpoint).ok and engine.last_update["delta"] is None
    at_reference(world, 11)
    assert engine.parse_update_info({"step": 11, "full": True}).full
    with pytest.raises(Exception, match="full must be true or false"):
        engine.parse_update_info({"step": 11, "full": "yes"})


def test_a_new_init_or_shutdown_forgets_the_base(world):
    engine = world.engine()
    update(world.llm, 10, endpoint=world.endpoint, init_info={})
    assert engine._base is not None and engine._base.step == 10
    # another adapter, prefix or daemon: the step numbers it reads are not the ones the weights hold
    engine.init_transfer_engine(engine.parse_init_info({"endpoint": world.endpoint}))
    assert engine._base is None
    update(world.llm, 11, endpoint=world.endpoint)
    assert engine.last_update["delta"] is None and "not one complete version" in engine.last_update["why_full"]
    engine.shutdown()
    assert engine._base is None
    update(world.llm, 10, endpoint=world.endpoint, init_info={})
