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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
