"""A vLLM engine's weight update through the stager backend, against a memcpy and a reload from disk.

    /path/to/vllm-venv/bin/python bench/bench_vllm.py --layers 8 --json bench/results/vllm.json

One process: a daemon (subprocess), a Llama-shaped model of ``--layers`` decoder layers staged
under its HF names (fp32, ~0.66 GiB at 8 layers), ``stager export-hf`` of it, and a vLLM CPU
engine on the export with the ``stager`` backend (its worker in this process). Each figure is the
median of ``--repeat`` runs:

- ``memcpy``: ``copy_`` of every tensor the engine loads, from the daemon's shared memory into
  preallocated tensors (one thread, as vLLM's CPU worker serves with): the bytes alone.
- ``stager``: ``update(llm, step)`` to a version the engine does not hold (two versions, in turn):
  start + update + finish (the engine's pause: no request runs meanwhile) and the whole call. Its
  direct path (written into the serving tensors; linears repacked by vLLM's own function), and
  ``stager_layerwise``: the same update through vLLM's layerwise reload (``engine.direct = False``).
- ``disk``: vLLM's own in-place reload from the export directory (``reload_weights``), its files
  in the page cache (``warm``) and evicted from it first (``cold``, posix_fadvise DONTNEED).
- ``vllm_floor``: the same reload from tensors already in this process's memory: what vLLM's
  layerwise reload itself costs (materialize each layer, load, repack, copy back), whatever
  brings the bytes.
- ``rss``: the engine process's memory during a stager update, sampled every 2 ms: peak minus
  before for private memory (RssAnon) and for shared memory mapped in (RssShmem: the daemon's
  segment, read in place, not a copy).

vLLM's ``ipc`` backend needs CUDA IPC and ``nccl`` needs NCCL: neither runs on CPU.

``--delta FRAC``: instead, delta updates (the daemon keeps change maps in the engine's dtype): step 2
is step 1 with FRAC of the elements of every tensor but the norms changed (what an RL step does to
bf16 weights: ~2%); the engine at step 1 is moved to step 2 in full and by delta, on the direct path
and through vLLM's layerwise reload, on the daemon's host and as frames, back to back per repetition
(wall and this process's CPU time: the engine's worker runs here); and vLLM's own sparse path
(``load_checkpoint_weight_patches``) against stager's scatter for the parameters it can patch on CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from common import machine, settle_memory, write_report  # noqa: E402


def config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def hf_weights(c: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["hidden_size"] // 16

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    out = {"model.embed_tokens.weight": w(c["vocab_size"], h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out.update(
            {
                p + "self_attn.q_proj.weight": w(h, h),
                p + "self_attn.k_proj.weight": w(kv, h),
                p + "self_attn.v_proj.weight": w(kv, h),
                p + "self_attn.o_proj.weight": w(h, h),
                p + "mlp.gate_proj.weight": w(i, h),
                p + "mlp.up_proj.weight": w(i, h),
                p + "mlp.down_proj.weight": w(h, i),
                p + "input_layernorm.weight": torch.ones(h),
                p + "post_attention_layernorm.weight": torch.ones(h),
            }
        )
    out.update({"model.norm.weight": torch.ones(h), "lm_head.weight": w(c["vocab_size"], h)})
    return out


def proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Peak of /proc/self/status memory figures while it runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.before, self.peak, self._halt = proc_status(), proc_status(), threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.002):
            for k, v in proc_status().items():
                self.peak[k] = max(self.peak[k], v)

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join()
        return {k: self.peak[k] - self.before[k] for k in self.before}


def evict(directory: str) -> None:
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--delta", type=float, default=None, help="measure delta updates at this changed fraction")
    args = parser.parse_args()
    if args.delta is not None:
        return delta_main(args)

    import rl_vllm
    from stager.client import StagingClient, Subscriber
    from stager.dev.launch import DaemonProcess
    from stager.integrations.vllm import update

    c = config(args.layers)
    report: dict = {"machine": machine(), "layers": args.layers}
    with (
        tempfile.TemporaryDirectory(prefix="bvllm", dir="/tmp") as tmp,
        DaemonProcess(f"ipc://{tmp}/d.sock", args=("--memory-limit", "6GiB", "--keep", "4")) as daemon,
    ):
        with StagingClient(daemon.endpoint, strict=True) as client:
            for step in (1, 2):
                info = {"adapter": "identity", "hf_config": c}
                client.stage(hf_weights(c, step), step=step, model_info=info).wait(600)
        export = rl_vllm.export_step(daemon.endpoint, f"{tmp}/hf", 1)
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        llm = LLM(
            export,
            weight_transfer_config=WeightTransferConfig(backend="stager"),
            **dict(rl_vllm.ENGINE_ARGS, max_model_len=256),
        )
        worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
        torch.set_num_threads(1)
        # connected, warm; this first update goes through vLLM's layerwise reload and proves the direct plan
        update(llm, 1, endpoint=daemon.endpoint, init_info={"endpoint": daemon.endpoint})
        engine = worker.weight_transfer_engine
        with Subscriber(daemon.endpoint, view="hf") as sub, sub.at(2) as snap:
            src = dict(snap.items())
            nbytes = sum(t.numel() * t.element_size() for t in src.values())
            dst = {n: torch.empty_like(t) for n, t in src.items()}
            floor_src = [(n, t.clone()) for n, t in src.items()]

            def memcpy() -> None:
                for n in src:
                    dst[n].copy_(src[n])

            memcpy()  # the destinations touched once: a warm copy, as into an engine's weights
            settle_memory()
            # the figures of one repetition are taken back to back, so that the load of a shared
            # machine weighs on each alike; each ratio is the median of the repetitions' ratios
            runs: list[dict] = []
            rss = None
            for r in range(args.repeat):
                run: dict = {}
                t = time.perf_counter()
                memcpy()
                run["memcpy"] = time.perf_counter() - t
                sampler = Sampler()
                sampler.start()
                seconds = update(llm, 2 if r % 2 == 0 else 1, endpoint=daemon.endpoint).engines[0].seconds
                grew = sampler.stop()
                rss = grew if rss is None else {k: max(rss[k], grew[k]) for k in grew}
                run["stager_pause"] = seconds["start"] + seconds["update"] + seconds["finish"]
                run["stager_total"] = seconds["total"]
                assert engine.last_update["path"] == "direct", engine.last_update
                engine.direct = False  # the same update through vLLM's layerwise reload, for comparison
                seconds = update(llm, 1 if r % 2 == 0 else 2, endpoint=daemon.endpoint).engines[0].seconds
                engine.direct = True
                run["stager_layerwise_pause"] = seconds["start"] + seconds["update"] + seconds["finish"]
                update(llm, 2 if r % 2 == 0 else 1, endpoint=daemon.endpoint)  # back: the next repetition changes it
                t = time.perf_counter()
                worker.model_runner.reload_weights(weights_iterator=iter(floor_src))
                run["vllm_floor"] = time.perf_counter() - t
                t = time.perf_counter()
                worker.model_runner.reload_weights(weights_path=export)
                run["disk_warm"] = time.perf_counter() - t
                evict(export)
                t = time.perf_counter()
                worker.model_runner.reload_weights(weights_path=export)
                run["disk_cold"] = time.perf_counter() - t
                runs.append(run)
                print(run, flush=True)
        worker.weight_transfer_engine.shutdown()
    report["bytes"] = nbytes
    report["runs"] = runs
    report["rss_growth_bytes"] = rss
    for key in runs[0]:
        report[f"{key}_s"] = statistics.median(run[key] for run in runs)

    def ratio(a: str, b: str) -> float:
        return round(statistics.median(run[a] / run[b] for run in runs), 2)

    gb = nbytes / 1e9
    report["summary"] = {
        "GB": round(gb, 3),
        "memcpy_GBps": round(gb / report["memcpy_s"], 2),
        "stager_GBps": round(gb / report["stager_pause_s"], 2),
        "stager_vs_memcpy": ratio("memcpy", "stager_pause"),
        "stager_layerwise_vs_memcpy": ratio("memcpy", "stager_layerwise_pause"),
        "direct_vs_layerwise": ratio("stager_layerwise_pause", "stager_pause"),
        "stager_vs_vllm_floor": ratio("vllm_floor", "stager_pause"),
        "stager_vs_disk_warm": ratio("disk_warm", "stager_pause"),
        "stager_vs_disk_cold": ratio("disk_cold", "stager_pause"),
        "rss_anon_growth_MB": round(rss["RssAnon"] / 1e6, 1),
        "rss_shmem_growth_MB": round(rss["RssShmem"] / 1e6, 1),
    }
    print(report["summary"])
    write_report(args.json, report)


def sparse_step(weights: dict[str, torch.Tensor], frac: float, seed: int) -> dict[str, torch.Tensor]:
    """``weights`` with ``frac`` of each tensor's elements moved (norms left alone, as RL steps leave them in bf16)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in weights.items():
        if name.endswith("norm.weight"):
            out[name] = t
            continue
        t = t.clone()
        flat = t.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, int(frac * flat.numel())),), generator=g)
        flat[idx] += 0.01
        out[name] = t
    return out


def delta_main(args) -> None:
    import rl_vllm
    from stager.client import StagingClient
    from stager.client.admin import daemon_status
    from stager.dev.launch import DaemonProcess
    from stager.integrations.vllm import update

    c = config(args.layers)
    report: dict = {"machine": machine(), "layers": args.layers, "frac": args.delta}
    maps = ("--change-maps", "float32")
    with (
        tempfile.TemporaryDirectory(prefix="bvllm", dir="/tmp") as tmp,
        DaemonProcess(f"ipc://{tmp}/d.sock", args=("--memory-limit", "6GiB", "--keep", "4", *maps)) as daemon,
    ):
        w1 = hf_weights(c, 1)
        w2 = sparse_step(w1, args.delta, 2)
        info = {"adapter": "identity", "hf_config": c}
        with StagingClient(daemon.endpoint, strict=True) as client:
            for step, sd in ((1, w1), (2, w2)):
                client.stage(sd, step=step, model_info=info).wait(600)
        export = rl_vllm.export_step(daemon.endpoint, f"{tmp}/hf", 1)
        while not next(v for v in daemon_status(daemon.endpoint)["versions"] if v["step"] == 2).get("changed"):
            time.sleep(0.1)  # the map of step 2 is being made
        report["changed"] = next(v for v in daemon_status(daemon.endpoint)["versions"] if v["step"] == 2)["changed"]
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        llm = LLM(
            export,
            weight_transfer_config=WeightTransferConfig(backend="stager"),
            **dict(rl_vllm.ENGINE_ARGS, max_model_len=256),
        )
        worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
        torch.set_num_threads(1)
        update(llm, 1, endpoint=daemon.endpoint, init_info={"endpoint": daemon.endpoint})  # proves the direct plan
        engine = worker.weight_transfer_engine

        def timed(use_delta: bool, direct: bool = True, remote: bool = False) -> dict:
            update(llm, 1, endpoint=daemon.endpoint, init_info={"endpoint": daemon.endpoint, "remote": remote})
            engine.delta, engine.direct = use_delta, direct
            read0, cpu0 = daemon_status(daemon.endpoint)["counters"]["read_bytes"], time.process_time()
            try:
                seconds = update(llm, 2, endpoint=daemon.endpoint).engines[0].seconds
            finally:
                engine.delta, engine.direct = True, True
            last = engine.last_update
            assert (last["delta"] is not None) == use_delta and last["path"] == ("direct" if direct else "layerwise")
            return {
                "pause_s": seconds["start"] + seconds["update"] + seconds["finish"],
                "cpu_s": time.process_time() - cpu0,
                "engine_bytes": last["bytes"],
                "wire_bytes": daemon_status(daemon.endpoint)["counters"]["read_bytes"] - read0,
                "tensors": last["tensors"],
            }

        cases = {
            "full": (False, True, False),
            "delta": (True, True, False),
            "full_layerwise": (False, False, False),
            "delta_layerwise": (True, False, False),
            "full_remote": (False, True, True),
            "delta_remote": (True, True, True),
        }
        runs = []
        for _ in range(args.repeat):
            run = {name: timed(*how) for name, how in cases.items()}
            run["patch"] = patch_paths(worker.model_runner.model, w1, w2)
            runs.append(run)
            print(run, flush=True)
        engine.shutdown()
    report["runs"] = runs
    med = {k: {m: statistics.median(r[k][m] for r in runs) for m in runs[0][k]} for k in runs[0]}
    report["median"] = med
    report["summary"] = {
        "full_over_delta_pause": round(med["full"]["pause_s"] / med["delta"]["pause_s"], 2),
        "full_over_delta_cpu": round(med["full"]["cpu_s"] / med["delta"]["cpu_s"], 2),
        "layerwise_full_over_delta_pause": round(
            med["full_layerwise"]["pause_s"] / med["delta_layerwise"]["pause_s"], 2
        ),
        "remote_full_over_delta_pause": round(med["full_remote"]["pause_s"] / med["delta_remote"]["pause_s"], 2),
        "remote_wire_bytes_full_delta": [med["full_remote"]["wire_bytes"], med["delta_remote"]["wire_bytes"]],
        "vllm_patches_over_stager_scatter": round(med["patch"]["vllm_s"] / med["patch"]["stager_s"], 2),
    }
    print(report["summary"])
    write_report(args.json, report)


def patch_paths(model, w1: dict, w2: dict) -> dict:
    """vLLM's ``load_checkpoint_weight_patches`` against stager's scatter (:func:`stager.protocol.changes.apply`)
    for the tensors vLLM keeps as the checkpoint holds them (embedding, LM head, norms): the same patches,
    into the same parameters; and whether vLLM's path takes a packed linear on CPU."""
    from vllm.model_executor.model_loader.checkpoint_weight_patch import (
        CheckpointWeightPatch,
        load_checkpoint_weight_patches,
    )

    from stager.protocol.changes import apply, changed_indices

    names = [n for n in w2 if "embed" in n or "lm_head" in n or n.endswith("norm.weight")]
    patches = []
    for n in names:
        idx = changed_indices(w1[n], w2[n], torch.float32)
        patches.append(CheckpointWeightPatch(n, tuple(w2[n].shape), torch.float32, w2[n].view(-1)[idx], idx))
    params = dict(model.named_parameters())
    cpu0, t = time.process_time(), time.perf_counter()
    load_checkpoint_weight_patches(model, patches)
    out = {"vllm_s": time.perf_counter() - t, "vllm_cpu_s": time.process_time() - cpu0}
    for n in names:
        assert torch.equal(params[n].data[: w2[n].shape[0]], w2[n]), n
    cpu0, t = time.process_time(), time.perf_counter()
    with torch.no_grad():
        for n, p in zip(names, patches):
            apply(params[n].data.narrow(0, 0, w2[n].shape[0]), p.indices.to(torch.int32), p.values)
    out.update(stager_s=time.perf_counter() - t, stager_cpu_s=time.process_time() - cpu0)
    n = "model.layers.0.mlp.down_proj.weight"
    idx = changed_indices(w1[n], w2[n], torch.float32)
    try:
        load_checkpoint_weight_patches(
            model, [CheckpointWeightPatch(n, tuple(w2[n].shape), torch.float32, w2[n].view(-1)[idx], idx)]
        )
        out["vllm_packed"] = "applied"
    except Exception as exc:  # recorded: what vLLM's sparse path does with a linear the CPU backend packed
        out["vllm_packed"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


if __name__ == "__main__":
    main()
