"""A real vLLM engine (vllm-cpu) on the ``stager`` weight-transfer backend.

Runs only where vLLM is installed: `.ci/run` makes a venv of its own for it (vllm-cpu pins its
own transformers); the main suite's venv has no vLLM and skips this module. One engine is started
for the module (in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0) on ``stager export-hf`` of the
trainer's step 0; each test moves it through the backend. The reference is a fresh engine, in a
process of its own, loaded from ``stager export-hf`` of step 3: greedy tokens and their
log-probabilities must be equal, and so must vLLM's weight checksums.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vLLM is imported
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
pytest.importorskip("vllm", reason="vLLM is not installed in this venv (.ci/run tests it in a venv of its own)")

import multiprocessing as mp  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

import rl_vllm  # noqa: E402  (examples/: the tiny model, the trainer, engine arguments)
from helpers import wait_until  # noqa: E402
from stager.client import StagingClient  # noqa: E402
from stager.dev.launch import DaemonProcess  # noqa: E402
from stager.integrations.vllm import (  # noqa: E402
    EngineIncomplete,
    Follower,
    UpdateIncomplete,
    UpdateRefused,
    VerifyFailed,
    WeightMismatch,
    update,
)
from stager.protocol import ErrorCode, StagerError  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
# two whole 128-token KV blocks: what vLLM's prefix cache keeps on CPU (a shorter prompt is never cached)
LONG = [(i * 37 + 5) % rl_vllm.CONFIG["vocab_size"] for i in range(300)]
PROMPTS = rl_vllm.PROMPTS + [LONG]


class World:
    """The module's daemon (the trainer's versions 0..3), exports, reference and engine."""

    def __init__(self, root: str):
        self.root = root
        self.daemon = DaemonProcess(f"ipc://{root}/d.sock", args=("--memory-limit", "256MiB", "--keep", "8")).start()
        self.endpoint = self.daemon.endpoint
        trainer = mp.get_context("spawn").Process(target=rl_vllm.supervised_trainer, args=(self.endpoint, 3))
        trainer.start()
        trainer.join(300)
        assert trainer.exitcode == 0, "the trainer failed"
        self.step0 = rl_vllm.export_step(self.endpoint, f"{root}/hf", 0)
        self.step3 = rl_vllm.export_step(self.endpoint, f"{root}/hf", 3)
        self.ref3 = fresh_engine_reference(self.step3)
        self.llm = rl_vllm.make_engine(self.step0)

    def engine(self):
        """The worker's StagerWeightTransferEngine (the worker runs in this process)."""
        return self.llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.weight_transfer_engine

    def hf_weights(self) -> dict:
        """Step 3's weights under their HF names (a version staged with the identity adapter holds these)."""
        return load_file(os.path.join(self.step3, "model.safetensors"))


def fresh_engine_reference(model_dir: str) -> dict:
    code = f"import json, rl_vllm; print('REF' + json.dumps(rl_vllm.reference({model_dir!r}, {PROMPTS!r})))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": EXAMPLES},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("REF")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][3:])


@pytest.fixture(scope="module")
def world():
    root = tempfile.mkdtemp(prefix="stgv", dir="/tmp")  # ipc paths must stay short
    w = World(root)
    yield w
    w.engine().shutdown()
    w.daemon.stop()
    subprocess.run(["rm", "-rf", root])


def stage_hf(endpoint: str, steps, weights: dict) -> None:
    """Stage ``weights`` (HF names) as ``steps`` with the identity adapter, as a trainer would."""
    with StagingClient(endpoint, strict=True) as client:
        for step in steps:
            client.stage(weights, step=step, model_info={"adapter": "identity"}).wait(60)


def outputs(llm) -> list[dict]:
    return rl_vllm.greedy(llm, PROMPTS)


def assert_at_reference(llm, ref: dict, version: str) -> None:
    got = outputs(llm)
    assert [g["tokens"] for g in got] == [r["tokens"] for r in ref["greedy"]]
    # same weights, same engine code: equal up to the order of float sums (threads, batch shapes);
    # a layer left at other weights moves log-probabilities by far more than this
    worst = max(abs(a - b) for g, r in zip(got, ref["greedy"]) for a, b in zip(g["logprobs"], r["logprobs"]))
    assert worst < 1e-4, worst
    assert all(g["versions"] == [version] for g in got), got


def test_importing_stager_never_imports_vllm():
    code = (
        "import sys, stager, stager.client, stager.integrations.vllm, stager.integrations.vllm.plugin; "
        "print('vllm' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_the_backend_is_registered_by_the_entry_point():
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="vllm.general_plugins") if e.name == "stager"] == [
        "stager.integrations.vllm.plugin:register"
    ]


def test_init_info_auth_dir_serves_the_engine_s_reader_only(world, tmp_path, monkeypatch):
    from stager.cli import main

    keys = str(tmp_path / "keys")
    assert main(["keygen", keys]) == 0
    monkeypatch.delenv("STAGER_AUTH_DIR", raising=False)
    try:  # a peer-sent value: used by the engine's connection, never written to the process environment
        world.llm.init_weight_transfer_engine({"init_info": {"endpoint": "tcp://127.0.0.1:9", "auth_dir": keys}})
        assert "STAGER_AUTH_DIR" not in os.environ
        assert world.engine()._sub._reader.primary.curve  # the CURVE keys of that directory
    finally:
        world.llm.init_weight_transfer_engine({"init_info": {"endpoint": world.endpoint}})


def test_init_info_quantize_makes_the_engine_read_fp8_blocks(world):
    """What that subscriber delivers against an FP8 checkpoint's names: tests/test_vllm_plan.py (vLLM CPU runs
    no FP8 block-scaled engine without AMX)."""
    try:
        world.llm.init_weight_transfer_engine({"init_info": {"endpoint": world.endpoint, "quantize": "fp8-block"}})
        assert world.engine()._sub.quantize == "fp8-block"
        with pytest.raises(StagerError, match="init_info quantize must be 'fp8-block'"):
            world.llm.init_weight_transfer_engine({"init_info": {"quantize": "fp8"}})
    finally:
        world.llm.init_weight_transfer_engine({"init_info": {"endpoint": world.endpoint}})


def test_update_equals_a_fresh_engine_loaded_from_the_export_of_the_step(world):
    before = outputs(world.llm)
    result = update(world.llm, 3, endpoint=world.endpoint, init_info={}, verify=world.ref3["checksums"])
    assert result.ok and result.step == 3
    engine = result.engines[0]
    assert engine.weight_version == "3" == world.llm.get_weight_version()
    assert {"start", "update", "finish", "reset", "total"} <= set(engine.seconds)
    assert_at_reference(world.llm, world.ref3, "3")
    assert outputs(world.llm) != before
    assert world.engine().last_update["tensors"] == len(world.hf_weights())


def test_updates_after_the_first_write_the_serving_tensors_directly(world):
    engine = world.engine()
    update(world.llm, 0, endpoint=world.endpoint, init_info={"endpoint": world.endpoint})
    assert engine._direct is not None, "the direct plan was not proven after a complete layerwise update"
    update(world.llm, 3, endpoint=world.endpoint, verify=world.ref3["checksums"])
    assert engine.last_update["path"] == "direct"
    assert_at_reference(world.llm, world.ref3, "3")  # logprobs of a fresh engine: the packed GEMMs were rebuilt
    import torch

    embed = engine.model.model.embed_tokens  # its GEMM (served only as a tied LM head) is packed at first use
    x = torch.randn(3, embed.weight.shape[1])
    assert torch.allclose(embed.quant_method.apply(embed, x), torch.nn.functional.linear(x, embed.weight), atol=1e-4)
    # a subset that splits a packed layer (q/k/v) cannot rebuild it: vLLM's layerwise reload takes it
    names = [n for n in world.hf_weights() if n != "model.layers.1.self_attn.k_proj.weight"]
    update(world.llm, 0, endpoint=world.endpoint, init_info={"endpoint": world.endpoint, "names": names})
    assert engine.last_update["path"] == "layerwise" and "come in part" in engine.last_update["why_layerwise"]
    update(
        world.llm, 3, endpoint=world.endpoint, init_info={"endpoint": world.endpoint}, verify=world.ref3["checksums"]
    )
    assert engine.last_update["path"] == "direct"
    assert_at_reference(world.llm, world.ref3, "3")


def test_latest_resolves_once_and_the_prefix_cache_is_reset(world):
    update(world.llm, 0, endpoint=world.endpoint, init_info={})
    at0 = outputs(world.llm)  # the long prompt's KV is now cached with step 0's weights
    result = update(world.llm, endpoint=world.endpoint)  # "latest": step 3, pinned for the update
    assert result.step == 3
    assert_at_reference(world.llm, world.ref3, "3")  # the long prompt too: its cached KV was dropped
    assert outputs(world.llm)[-1] != at0[-1]


def test_refused_updates_leave_the_engine_serving_its_version(world, short_dir):
    update(world.llm, 3, endpoint=world.endpoint, init_info={})
    good = world.hf_weights()
    bad_shape = dict(good, **{"model.norm.weight": good["model.norm.weight"][:64].clone()})
    missing = {k: v for k, v in good.items() if k != "lm_head.weight"}
    unknown = dict(good, **{"model.layers.0.mlp.extra.weight": good["model.norm.weight"].clone()})
    with DaemonProcess(f"ipc://{short_dir}/r.sock", args=("--memory-limit", "64MiB", "--keep", "8")) as other:
        with StagingClient(other.endpoint, strict=True) as client:
            for step, sd in ((10, bad_shape), (11, missing), (12, unknown)):
                client.stage(sd, step=step, model_info={"adapter": "identity"}).wait(60)
        cases = [
            (10, "model.norm.weight: the version holds shape [64]"),
            (11, "lacks 'lm_head.weight'"),
            (12, "no tensor 'model.layers.0.mlp.extra.weight'"),
        ]
        for step, said in cases:
            with pytest.raises(UpdateRefused) as info:
                update(world.llm, step, endpoint=other.endpoint, init_info={"endpoint": other.endpoint})
            assert info.value.code == ErrorCode.BAD_VALUE and said in str(info.value), str(info.value)
            assert info.value.previous == 3 and "still serves step 3" in str(info.value)
            assert world.llm.get_weight_version() == "3"
            assert_at_reference(world.llm, world.ref3, "3")
        # through vLLM's own API: the typed error comes out of LLM.update_weights
        world.llm.start_weight_update()
        with pytest.raises(UpdateRefused) as info:
            world.llm.update_weights({"update_info": {"step": 99}})
        assert info.value.code == ErrorCode.NO_VERSION and info.value.previous == 3
        world.llm.start_weight_update()
        with pytest.raises(UpdateRefused, match="give {'step': N}"):
            world.llm.update_weights({"update_info": {"step": "newest"}})
        with pytest.raises(StagerError, match="stager init_info: .*unexpected keyword argument 'endpiont'"):
            world.llm.init_weight_transfer_engine({"init_info": {"endpiont": other.endpoint}})
        with pytest.raises(StagerError, match="adapter must be a built-in adapter"):  # nothing imported on request
            world.llm.init_weight_transfer_engine({"init_info": {"adapter": "os:system"}})
        with pytest.raises(StagerError, match=r"stager init_info: init_info names\[1\] = \['x'\] \(list\)"):
            world.llm.init_weight_transfer_engine({"init_info": {"names": ["model.norm.weight", ["x"]]}})
        assert_at_reference(world.llm, world.ref3, "3")
    update(world.llm, 0, endpoint=world.endpoint, init_info={"endpoint": world.endpoint})
    # a second version in one update is refused, and the first is finished whole, not left half done
    world.llm.start_weight_update()
    world.llm.update_weights({"update_info": {"step": 3}})
    with pytest.raises(UpdateRefused, match="one version per update: this update had loaded step 3"):
        world.llm.update_weights({"update_info": {"step": 0}})
    world.llm.update_weight_version("3")
    assert_at_reference(world.llm, world.ref3, "3")


def test_a_partial_update_is_caught_by_verification_and_the_engine_refuses(world):
    update(world.llm, 0, endpoint=world.endpoint, init_info={"endpoint": world.endpoint})
    names = [n for n in world.hf_weights() if n != "model.norm.weight"]  # a deliberately skipped norm update
    with pytest.raises(WeightMismatch) as info:
        update(
            world.llm,
            3,
            endpoint=world.endpoint,
            init_info={"endpoint": world.endpoint, "names": names},
            verify=world.ref3["checksums"],
        )
    assert any(t.endswith("model.norm.weight") for t in info.value.tensors), info.value.tensors
    with pytest.raises(EngineIncomplete):
        outputs(world.llm)
    update(
        world.llm, 3, endpoint=world.endpoint, init_info={"endpoint": world.endpoint}, verify=world.ref3["checksums"]
    )
    assert_at_reference(world.llm, world.ref3, "3")


def test_verify_names_an_engine_tensor_that_differs_from_the_version(world):
    engine = world.engine()
    update(world.llm, 0, endpoint=world.endpoint, init_info={"endpoint": world.endpoint})
    assert engine._direct is not None

    def bump_norm(model):  # a parameter vLLM keeps as the checkpoint holds it
        model.model.norm.weight.data[3] += 1.0

    def skew_down_proj(model):  # a packed linear (oneDNN on CPU): its GEMM no longer computes the version
        layer = model.model.layers[1].mlp.down_proj
        layer.cpu_linear = lambda x, w, b, f=layer.cpu_linear: f(x, w, b) * 1.001

    for corrupt, name in ((bump_norm, "model.norm.weight"), (skew_down_proj, "model.layers.1.mlp.down_proj.weight")):
        engine.on_loaded = corrupt
        try:
            with pytest.raises(VerifyFailed) as info:
                update(world.llm, 3, endpoint=world.endpoint, verify=True)
        finally:
            engine.on_loaded = None
        assert info.value.tensors == [name] and name in str(info.value), str(info.value)
        assert isinstance(info.value, UpdateIncomplete) and info.value.step == 3
        with pytest.raises(EngineIncomplete):  # not one version: no output from it
            outputs(world.llm)
        assert update(world.llm, 3, endpoint=world.endpoint, verify=True).ok  # a complete, verified update
        assert engine.last_update["verified"] and engine.last_update["path"] == "direct"
        assert_at_reference(world.llm, world.ref3, "3")


def test_daemon_killed_mid_update_on_its_host_the_update_completes(world, short_dir):
    update(world.llm, 0, endpoint=world.endpoint, init_info={"endpoint": world.endpoint})
    victim = DaemonProcess(f"ipc://{short_dir}/k.sock", args=("--memory-limit", "64MiB")).start()
    try:
        stage_hf(victim.endpoint, [7], world.hf_weights())
        seen = []

        def kill_at_first_tensor(name):
            seen.append(name)
            if len(seen) == 1:
                victim.stop(signal.SIGKILL)

        world.engine().on_tensor = kill_at_first_tensor
        # the leased segment stays mapped: a sealed version cannot change, and a dead daemon reuses nothing
        result = update(world.llm, 7, endpoint=victim.endpoint, init_info={"endpoint": victim.endpoint, "timeout": 5})
    finally:
        world.engine().on_tensor = None
        victim.stop(signal.SIGKILL)
    assert victim.proc.returncode == -signal.SIGKILL and len(seen) == len(world.hf_weights())
    assert result.ok
    assert_at_reference(world.llm, world.ref3, "7")


def remote_update_killed_at(world, root: str, name: str, step: int):
    """Update to ``step`` of a daemon of its own, read as frames, killed when ``name`` reaches the loader."""
    victim = DaemonProcess(f"ipc://{root}/v{step}.sock", args=("--memory-limit", "64MiB")).start()
    try:
        stage_hf(victim.endpoint, [step], world.hf_weights())

        def kill(seen):
            if seen == name:
                victim.stop(signal.SIGKILL)

        world.engine().on_tensor = kill
        update(
            world.llm,
            step,
            endpoint=victim.endpoint,
            init_info={"endpoint": victim.endpoint, "remote": True, "timeout": 3},
        )
    finally:
        world.engine().on_tensor = None
        victim.stop(signal.SIGKILL)


def test_remote_daemon_killed_mid_update_the_engine_refuses_until_a_complete_update(world, short_dir):
    update(world.llm, 0, endpoint=world.endpoint, init_info={"endpoint": world.endpoint})
    assert world.engine()._direct is not None  # the updates below write the serving tensors directly
    at0 = outputs(world.llm)
    # killed before any layer took its weights (vLLM processes the padded embedding last): still at step 0
    with pytest.raises(UpdateRefused) as refused:
        remote_update_killed_at(world, short_dir, "model.embed_tokens.weight", 7)
    assert refused.value.previous == 0 and refused.value.code in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT)
    assert outputs(world.llm) == at0 and world.llm.get_weight_version() == "0"
    # killed once layer 0 took step 8's weights: frames of the rest never arrive
    with pytest.raises(UpdateIncomplete) as info:
        remote_update_killed_at(world, short_dir, "model.layers.1.self_attn.q_proj.weight", 8)
    assert info.value.step == 8 and info.value.previous == 0
    assert info.value.code in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT), info.value
    with pytest.raises(EngineIncomplete):  # weights of steps 0 and 8 are loaded: no output of that mix
        outputs(world.llm)
    with DaemonProcess(f"ipc://{short_dir}/w.sock", args=("--memory-limit", "64MiB")) as again:
        stage_hf(again.endpoint, [9], world.hf_weights())
        assert update(world.llm, 9, endpoint=again.endpoint, init_info={"endpoint": again.endpoint, "remote": True}).ok
        assert world.engine().last_update["path"] == "direct"
        assert_at_reference(world.llm, world.ref3, "9")
    update(world.llm, 3, endpoint=world.endpoint, init_info={"endpoint": world.endpoint})


def test_follower_keeps_the_engine_within_k_steps(world, short_dir):
    with DaemonProcess(f"ipc://{short_dir}/f.sock", args=("--memory-limit", "64MiB", "--keep", "8")) as d:
        weights = world.hf_weights()
        stage_hf(d.endpoint, [1], weights)
        with Follower(world.llm, k=1, endpoint=d.endpoint, init_info={"endpoint": d.endpoint}) as follower:
            assert follower.sync().step == 1  # no version of this daemon yet: the newest
            stage_hf(d.endpoint, [2], weights)
            assert follower.sync() is None and follower.lag() == 1  # within k: rollouts go on at step 1
            stage_hf(d.endpoint, [3], weights)
            assert follower.sync().step == 3 and world.llm.get_weight_version() == "3"
            assert follower.sync(min_step=3) is None
            stage_hf(d.endpoint, [4], weights)
            assert follower.sync(min_step=4).step == 4  # the next batch needs step 4 at least
    update(world.llm, 3, endpoint=world.endpoint, init_info={"endpoint": world.endpoint})
    assert_at_reference(world.llm, world.ref3, "3")


def test_the_rl_example_keeps_every_rollout_within_k_steps():
    k, steps = 1, 3
    done = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "rl_vllm.py"), "--steps", str(steps), "--k", str(k)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [line["batch"] for line in lines] == list(range(1, steps + 1))
    for line in lines:  # batch b trains step b: its rollouts came from step b-1-k or newer
        assert line["weight_version"] >= line["batch"] - 1 - k, lines
    assert lines[-1]["weight_version"] > 0  # the engine followed the trainer


def start_server(model_dir: str, log_path: str):
    """``vllm serve`` with the stager backend (vllm-cpu 0.32's ``vllm`` command looks up the version of a
    distribution named vllm and fails: its API server module is started instead, with the same arguments).
    The engine core runs in a process of its own: the entry point registers the backend there."""
    from stager.dev.launch import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env["VLLM_SERVER_DEV_MODE"] = "1"  # vLLM serves its weight-transfer routes only then
    args = [
        "--model",
        model_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--weight-transfer-config",
        json.dumps({"backend": "stager"}),
    ]
    for key, value in rl_vllm.ENGINE_ARGS.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"

    def healthy():
        assert proc.poll() is None, open(log_path).read()[-3000:]
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False

    wait_until(healthy, timeout=600, interval=1.0)
    return proc, base


def get(url: str):
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def test_a_server_is_moved_through_its_http_routes(world, short_dir):
    proc, base = start_server(world.step0, os.path.join(world.root, "server.log"))
    try:
        result = update(
            base, 3, endpoint=world.endpoint, init_info={"endpoint": world.endpoint}, verify=world.ref3["checksums"]
        )  # vLLM's weight_checker digests equal the fresh engine's
        assert result.ok and result.engines[0].weight_version == "3" == get(f"{base}/weight_info")["weight_version"]
        assert {"pause", "start", "update", "finish", "reset", "resume"} <= set(result.engines[0].seconds)
        assert get(f"{base}/is_paused") == {"is_paused": False}
        with DaemonProcess(f"ipc://{short_dir}/s.sock", args=("--memory-limit", "64MiB")) as other:
            weights = world.hf_weights()
            stage_hf(other.endpoint, [10], dict(weights, **{"lm_head.weight": weights["lm_head.weight"][:5].clone()}))
            with pytest.raises(UpdateRefused) as info:  # the worker's error crossed HTTP as text: typed again
                update(base, 10, endpoint=other.endpoint, init_info={"endpoint": other.endpoint})
        assert info.value.previous == 3 and "lm_head.weight" in str(info.value), str(info.value)
        assert get(f"{base}/is_paused") == {"is_paused": False}  # resumed: it serves step 3 as before
        assert get(f"{base}/weight_info")["weight_version"] == "3"
    finally:
        proc.terminate()
        proc.wait(120)
