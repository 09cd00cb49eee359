"""Persist benchmark: HF export and DCP write from the daemon vs. the anchors, in one run.

    python bench/bench_persist.py [--size-gib 1.0] [--json PATH]

(a) ``export_snapshot`` (llama3 adapter + bfloat16 cast + 500MB shards + fsync) of a staged
    Llama-shaped fp32 state dict, read zero-copy from the daemon, in a child process whose
    anonymous memory is sampled every 5 ms (peak extra memory; shared snapshot pages excluded);
(b) anchor: ``safetensors.torch.save_file`` of the same dict already converted (names, permutation,
    cast) in memory, plus fsync: the same bytes on disk, none of the conversion;
(b') the same ``save_file`` in a fresh process (an exporter is one: this VM's memory behaviour
    slows the in-process anchor, which ran after the staging);
(c) ``write_snapshot_dcp`` from the daemon vs. (d) ``dcp.save`` from the 2 trainer ranks holding the
    same tensors as FSDP-style ``Shard(0)`` DTensors;
(e) DCP's own HF path: ``dcp.save`` from the 2 ranks with ``HuggingFaceStorageWriter`` (bf16,
    the same 500MB file split, ``save_distributed=True``, ``enable_consolidation=True``).
Targets: (a) <= 1.25 x (b) and (b'); (a) <= 0.5 x (e); peak extra memory <= largest tensor + 10%.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

import torch

from common import in_child, machine, settle_memory, write_report  # noqa: E402
from stager.dev.launch import DaemonProcess, run_ranks

HIDDEN, FFN, VOCAB, HEADS, KV_HEADS = 2048, 5632, 8192, 16, 4


def native_state(size_gib: float) -> dict:
    g = torch.Generator().manual_seed(0)
    sd = {
        "tok_embeddings.weight": torch.randn(VOCAB, HIDDEN, generator=g),
        "norm.weight": torch.ones(HIDDEN),
        "output.weight": torch.randn(VOCAB, HIDDEN, generator=g),
    }
    kv = HIDDEN // HEADS * KV_HEADS
    layer = 0
    while sum(t.numel() * 4 for t in sd.values()) < size_gib * 2**30:
        p = f"layers.{layer}."
        sd.update(
            {
                p + "attention.wq.weight": torch.randn(HIDDEN, HIDDEN, generator=g),
                p + "attention.wk.weight": torch.randn(kv, HIDDEN, generator=g),
                p + "attention.wv.weight": torch.randn(kv, HIDDEN, generator=g),
                p + "attention.wo.weight": torch.randn(HIDDEN, HIDDEN, generator=g),
                p + "feed_forward.w1.weight": torch.randn(FFN, HIDDEN, generator=g),
                p + "feed_forward.w2.weight": torch.randn(HIDDEN, FFN, generator=g),
                p + "feed_forward.w3.weight": torch.randn(FFN, HIDDEN, generator=g),
                p + "attention_norm.weight": torch.ones(HIDDEN),
                p + "ffn_norm.weight": torch.ones(HIDDEN),
            }
        )
        layer += 1
    return sd


HF_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "vocab_size": VOCAB,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _export_child(endpoint: str, out: str, queue) -> None:
    from stager.client import Subscriber
    from stager.writers.export_hf import export_snapshot

    with Subscriber(endpoint) as sub, sub.latest() as snap:
        base, peak, stop = _rss_anon(), [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_anon())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        export_snapshot(snap, out, adapter="llama3", hf_config=HF_CONFIG, dtype="bfloat16", max_shard_size="500MB")
        seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
        queue.put({"seconds": seconds, "peak_extra_bytes": max(peak[0] - base, 0)})


def _save_file_anchor(sd: dict, out: str) -> float:
    from safetensors.torch import save_file

    from stager.client.adapters import load_adapter

    converted = {k: v.to(torch.bfloat16).contiguous() for k, v in load_adapter("llama3", HF_CONFIG).to_hf(sd).items()}
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.safetensors")
    t0 = time.perf_counter()
    save_file(converted, path, metadata={"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def _save_file_child(size_gib: float, out: str, queue) -> None:
    queue.put(_save_file_anchor(native_state(size_gib), out))


def _file_index(sd: dict, max_bytes: int = 500 * 10**6) -> dict[str, int]:
    """The same greedy split export-hf uses, as DCP's fqn_to_index_mapping (files numbered from 1)."""
    from stager.writers.export_hf import plan_shards

    names = list(sd)
    shards = plan_shards([sd[n].numel() * 2 for n in names], max_bytes)
    return {names[i]: number for number, indices in enumerate(shards, 1) for i in indices}


def _hf_writer_ranks(rank, world, size_gib, out):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = native_state(size_gib)
    mapping = _file_index(full)
    sharded = {k: distribute_tensor(v.to(torch.bfloat16), mesh, [Shard(0)]) for k, v in full.items()}
    del full
    times = []
    for i in range(2):
        path = os.path.join(out, f"hf-writer-{i}")
        writer = HuggingFaceStorageWriter(
            path,
            fqn_to_index_mapping=mapping,
            save_distributed=True,
            enable_consolidation=True,
            thread_count_consolidation=2,
        )
        dist.barrier()
        t0 = time.perf_counter()
        dcp.save(sharded, storage_writer=writer)
        dist.barrier()
        times.append(time.perf_counter() - t0)
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
    return times


def _dcp_ranks(rank, world, endpoint, size_gib, out):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from stager.client import StagingClient

    mesh = init_device_mesh("cpu", (world,))
    full = native_state(size_gib)
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
    del full
    with StagingClient(endpoint, strict=True) as client:
        client.stage({"model": sharded}, step=2).wait(300)
    times = []
    for i in range(2):
        path = os.path.join(out, f"trainer-{i}")
        dist.barrier()
        t0 = time.perf_counter()
        dcp.save({"model": sharded}, checkpoint_id=path)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-persist-", dir=os.environ.get("BENCH_DIR", "/tmp"))
    report: dict = machine()
    try:
        sd = native_state(args.size_gib)
        total = sum(t.numel() * 4 for t in sd.values())
        largest = max(t.numel() * 4 for t in sd.values())
        report.update(snapshot_bytes=total, largest_tensor_bytes=largest, tensors=len(sd))
        with DaemonProcess(args=("--memory-limit", f"{int(4 * total)}")) as daemon:
            from stager.client import StagingClient

            with StagingClient(daemon.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as c:
                c.stage(sd, step=1).wait(300)
            # interleaved, each from settled memory (see common.settle_memory): the export (a fresh
            # process, as the exporter is), save_file in this process and save_file in a fresh process
            ours, anchor, fresh = [], [], []
            for i in range(3):
                settle_memory()
                ours.append(in_child(_export_child, daemon.endpoint, os.path.join(work, f"hf-{i}")))
                settle_memory()
                anchor.append(_save_file_anchor(sd, os.path.join(work, f"st-{i}")))
                settle_memory()
                fresh.append(in_child(_save_file_child, args.size_gib, os.path.join(work, f"fresh-{i}")))
                for d in (f"hf-{i}", f"st-{i}", f"fresh-{i}"):
                    shutil.rmtree(os.path.join(work, d), ignore_errors=True)
        del sd
        report["hf_export_s"] = [o["seconds"] for o in ours]
        report["hf_peak_extra_bytes"] = max(o["peak_extra_bytes"] for o in ours)
        report["save_file_s"] = anchor
        report["save_file_fresh_s"] = fresh
        settle_memory()
        hf_writer = run_ranks(_hf_writer_ranks, 2, args.size_gib, work, timeout=900)
        report["dcp_hf_writer_s"] = [max(r[i] for r in hf_writer) for i in range(2)]
        with DaemonProcess(args=("--memory-limit", f"{int(3 * total)}")) as daemon:
            trainer = run_ranks(_dcp_ranks, 2, daemon.endpoint, args.size_gib, work, timeout=900)
            from stager.client import Subscriber
            from stager.writers.write_dcp import write_snapshot_dcp

            daemon_times = []
            with Subscriber(daemon.endpoint) as sub, sub.latest() as snap:
                for i in range(2):
                    t0 = time.perf_counter()
                    write_snapshot_dcp(snap, os.path.join(work, f"daemon-{i}"))
                    daemon_times.append(time.perf_counter() - t0)
        report["dcp_trainers_s"] = [max(r[i] for r in trainer) for i in range(2)]
        report["dcp_daemon_s"] = daemon_times
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    ratio = med(report["hf_export_s"]) / med(report["save_file_s"])
    mem_limit = report["largest_tensor_bytes"] + 0.1 * report["snapshot_bytes"]
    fresh_ratio = med(report["hf_export_s"]) / med(report["save_file_fresh_s"])
    hf_ratio = med(report["hf_export_s"]) / med(report["dcp_hf_writer_s"])
    report["targets"] = {
        "hf_export_vs_save_file": {"ratio": ratio, "limit": 1.25, "met": ratio <= 1.25},
        "hf_export_vs_fresh_save_file": {"ratio": fresh_ratio, "limit": 1.25, "met": fresh_ratio <= 1.25},
        "hf_export_vs_dcp_hf_writer": {"ratio": hf_ratio, "limit": 0.5, "met": hf_ratio <= 0.5},
        "hf_peak_extra_memory": {
            "bytes": report["hf_peak_extra_bytes"],
            "limit": mem_limit,
            "met": report["hf_peak_extra_bytes"] <= mem_limit,
        },
        "dcp_daemon_vs_trainers": {"ratio": med(report["dcp_daemon_s"]) / med(report["dcp_trainers_s"])},
    }
    gib = 2**30
    print(
        f"snapshot {report['snapshot_bytes'] / gib:.2f} GiB fp32 ({report['tensors']} tensors, largest "
        f"{report['largest_tensor_bytes'] / 2**20:.0f} MiB) -> bf16 HF export in 500MB shards"
    )
    print(f"  (a) stager export-hf        {', '.join(f'{t:.2f}' for t in report['hf_export_s'])} s")
    print(
        f"  (b) safetensors save_file   {', '.join(f'{t:.2f}' for t in report['save_file_s'])} s  "
        f"(pre-converted, same bytes)"
    )
    print(f"      ratio (a)/(b) medians   {ratio:.2f}x (target <= 1.25x)")
    print(
        f"  (b') save_file, fresh proc  {', '.join(f'{t:.2f}' for t in report['save_file_fresh_s'])} s  "
        f"-> ratio (a)/(b') {fresh_ratio:.2f}x (target <= 1.25x)"
    )
    print(
        f"  (e) DCP HuggingFaceStorageWriter, 2 ranks + consolidation  "
        f"{', '.join(f'{t:.2f}' for t in report['dcp_hf_writer_s'])} s -> ratio (a)/(e) {hf_ratio:.2f}x "
        "(target <= 0.5x)"
    )
    print(
        f"      exporter peak extra mem {report['hf_peak_extra_bytes'] / 2**20:.0f} MiB (target <= "
        f"{mem_limit / 2**20:.0f} MiB = largest tensor + 10%)"
    )
    print(f"  (c) DCP write from daemon   {', '.join(f'{t:.2f}' for t in report['dcp_daemon_s'])} s")
    print(
        f"  (d) dcp.save from 2 ranks   {', '.join(f'{t:.2f}' for t in report['dcp_trainers_s'])} s  "
        f"(ratio (c)/(d) {report['targets']['dcp_daemon_vs_trainers']['ratio']:.2f}x)"
    )
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
