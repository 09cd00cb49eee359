"""The way back in, against its anchors in the same run.

    python bench/bench_restore.py [--size-mib 512] [--json PATH] [--parts ab]

(a) restore: 2 gloo ranks, each in a fresh process as after a crash, fill their FSDP shards
    (``Shard(0)`` DTensors, preallocated and faulted in) of a sealed version with
    ``StagingClient.restore``; anchor: ``dcp.load`` of the same state from a local DCP checkpoint the
    same ranks saved (``dcp.save``), with its files in the page cache (warm) and after dropping the
    page cache (read from the disk; needs root). Alternated, 3 each. Goal: restore >= 5x faster than
    dcp.load from local disk.
(b) load-hf: a 4-file sharded safetensors checkpoint into a new daemon (``load_hf``: headers checked,
    each byte copied once into shared memory), then twice more into the same daemon, the last of
    which reuses the first load's segment (checked); then into a new daemon started with
    ``--preallocate``, timed once its memory is allocated (its load must take it: checked);
    anchors, each in a fresh process: ``safetensors.torch.load`` of each file's bytes, ``load_file`` (lazy mmap)
    with every tensor copied out and kept, and DCP's ``HuggingFaceStorageReader`` into preallocated tensors. Page cache
    warm for all; memory settled before each. Goal: load-hf >= 0.8x safetensors' own read speed.
    Runs before (a), whose page cache drops slow this VM's memory for the rest of the run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_multinode import full_state  # noqa: E402
from common import in_child, load_file_kept, machine, settle_memory, write_report  # noqa: E402
from stager.client.admin import daemon_status  # noqa: E402
from stager.dev.launch import DaemonProcess, run_ranks  # noqa: E402

MIB = 1 << 20
ROUNDS = 3


def _sharded(size_mib: int, world: int, fill: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    return {
        k: distribute_tensor(v if fill else torch.zeros_like(v), mesh, [Shard(0)])
        for k, v in full_state(size_mib, 1).items()
    }


def stage_and_save(rank, world, size_mib, ckpt):
    """Stage the state as step 1, and save it with DCP (the anchor's checkpoint)."""
    import torch.distributed.checkpoint as dcp

    from stager.client import StagingClient

    sd = _sharded(size_mib, world, fill=True)
    with StagingClient(strict=True) as client:
        client.stage(sd, step=1).wait(300)
    dcp.save(sd, checkpoint_id=ckpt)


def restore_once(rank, world, size_mib, ckpt, how):
    """One restore (``how``: "restore" from the daemon, or "dcp.load" of the checkpoint) in a fresh
    process, as after a crash, into preallocated shards; checks the bytes."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp  # imported before timing (~1.7 s here)
    import torch.distributed.tensor._utils  # noqa: F401  (what restore imports lazily, also before timing:

    import stager.client.hook.restore  # noqa: F401        after a dropped page cache an import reads the disk)
    from stager.client import StagingClient

    torch.set_num_threads(1)
    sd = _sharded(size_mib, world, fill=False)
    for t in sd.values():
        t._local_tensor.fill_(1.0)  # the destination faulted in: both measure the load itself
    with StagingClient(strict=True) as client:
        dist.barrier()
        t0 = time.perf_counter()
        if how == "restore":
            client.restore(sd)
        else:
            dcp.load(sd, checkpoint_id=ckpt)
        dist.barrier()
        seconds = time.perf_counter() - t0
    expected = _sharded(size_mib, world, fill=True)
    assert all(torch.equal(sd[k]._local_tensor, expected[k]._local_tensor) for k in sd), how
    return seconds


def drop_page_cache() -> bool:
    """Empty the page cache (root only), so that dcp.load reads the disk; False where not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _load_files(files, queue):
    """safetensors' own reads into process memory: ``load`` of each file's bytes (``load_file``
    maps the file lazily: it reads nothing until the tensors are touched)."""
    from safetensors.torch import load

    t0 = time.perf_counter()
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            n += sum(t.numel() * t.element_size() for t in load(fh.read()).values())
    queue.put((time.perf_counter() - t0, n))


def _load_hf_reader(path, queue):
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    template = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    template[k] = torch.empty(sl.get_shape(), dtype=torch.float32)
    t0 = time.perf_counter()
    dcp.load(template, storage_reader=HuggingFaceStorageReader(path, thread_count=2), no_dist=True)
    queue.put((time.perf_counter() - t0, sum(t.numel() * 4 for t in template.values())))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--json")
    parser.add_argument("--parts", default="ab", help="which parts to run: a (restore), b (load-hf), or both")
    args = parser.parse_args()
    report: dict = machine()
    tmp = tempfile.mkdtemp(prefix="stager-bench-restore-")
    state = full_state(args.size_mib, 1)
    total = sum(t.numel() * 4 for t in state.values())
    report["bytes"] = total
    try:
        # load-hf first: once (a) has dropped the page cache, this VM's memory reads stay ~2x slower
        if "b" in args.parts:
            load_hf_part(args, report, tmp, state)
        del state  # (a) builds its shards in the rank processes
        if "a" in args.parts:
            restore_part(args, report, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_report(report, total)
    write_report(args.json, report)
    return 0


def restore_part(args, report: dict, tmp: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] (a) restore vs dcp.load, 2 ranks", file=sys.stderr, flush=True)
    ckpt = os.path.join(tmp, "dcp")
    with DaemonProcess(args=("--memory-limit", f"{3 * args.size_mib}MiB")) as daemon:
        env = {"STAGER_ENDPOINT": daemon.endpoint}
        run_ranks(stage_and_save, 2, args.size_mib, ckpt, env=env, timeout=900)
        for key in ("a_restore_s", "a_dcp_load_warm_s", "a_dcp_load_cold_s"):
            report[key] = []
        # warm first, alternated, each in fresh processes: once the page cache has been dropped, this
        # VM's memory reads stay ~2x slower for the rest of the run (measured: restore 0.08 s before the
        # first drop, 0.2 s after it), which would charge the drop to whichever ran after it
        for _ in range(ROUNDS):
            settle_memory()
            report["a_restore_s"].append(max(run_ranks(restore_once, 2, args.size_mib, ckpt, "restore", env=env)))
            settle_memory()
            report["a_dcp_load_warm_s"].append(max(run_ranks(restore_once, 2, args.size_mib, ckpt, "dcp", env=env)))
        for _ in range(ROUNDS):  # then DCP reading the disk
            if drop_page_cache():
                report["a_dcp_load_cold_s"].append(max(run_ranks(restore_once, 2, args.size_mib, ckpt, "dcp", env=env)))
    shutil.rmtree(ckpt, ignore_errors=True)


def load_hf_part(args, report: dict, tmp: str, state: dict) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')}] (b) load-hf vs load_file vs HuggingFaceStorageReader",
        file=sys.stderr,
        flush=True,
    )
    from safetensors.torch import save_file

    from stager.loaders.load_hf import load_hf

    hf = os.path.join(tmp, "hf")
    os.makedirs(hf)
    names = list(state)
    files, weight_map = [], {}
    for i in range(4):
        fname = f"model-{i + 1:05d}-of-00004.safetensors"
        save_file({n: state[n] for n in names[i::4]}, os.path.join(hf, fname))
        files.append(os.path.join(hf, fname))
        weight_map.update({n: fname for n in names[i::4]})
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    del state
    in_child(_load_files, files)  # the page cache now holds every file
    ours, again, load_file_s, mapped_s, reader_s, prealloc, prealloc_wait = [], [], [], [], [], [], []
    for _ in range(ROUNDS):
        settle_memory()
        with DaemonProcess(args=("--memory-limit", f"{2 * args.size_mib}MiB")) as daemon:
            t0 = time.perf_counter()
            load_hf(hf, endpoint=daemon.endpoint)  # a new daemon: its shared memory is new
            ours.append(time.perf_counter() - t0)
            for step in (1, 2):  # the same daemon again: step 2 reuses step 0's segment, evicted
                settle_memory()
                before = set(glob.glob(f"/dev/shm/stager-{os.getuid()}-{daemon.pid}-*"))
                t0 = time.perf_counter()
                load_hf(hf, endpoint=daemon.endpoint, step=step)
                if step == 2:
                    again.append(time.perf_counter() - t0)
                    after = set(glob.glob(f"/dev/shm/stager-{os.getuid()}-{daemon.pid}-*"))
                    if not after <= before:
                        raise SystemExit(f"step 2 got a new segment ({sorted(after - before)}), not a reused one")
        settle_memory()
        # a new daemon started with --preallocate: the load is timed once the memory is there
        started = time.perf_counter()
        with DaemonProcess(
            args=("--memory-limit", f"{2 * args.size_mib}MiB", "--preallocate", f"{args.size_mib + 64}MiB")
        ) as daemon:
            while not daemon_status(daemon.endpoint)["memory"]["preallocated"]:
                time.sleep(0.005)
            prealloc_wait.append(time.perf_counter() - started)
            t0 = time.perf_counter()
            load_hf(hf, endpoint=daemon.endpoint)
            prealloc.append(time.perf_counter() - t0)
            if daemon_status(daemon.endpoint)["memory"]["preallocated"]:
                raise SystemExit("the load did not take the preallocated memory")
        settle_memory()
        load_file_s.append(in_child(_load_files, files)[0])
        settle_memory()
        mapped_s.append(in_child(load_file_kept, files)[0])
        settle_memory()
        reader_s.append(in_child(_load_hf_reader, hf)[0])
    report["b_load_hf_s"], report["b_load_hf_reused_s"], report["b_safetensors_load_s"] = ours, again, load_file_s
    report["b_load_file_cloned_s"], report["b_hf_storage_reader_s"] = mapped_s, reader_s
    report["b_load_hf_preallocated_s"], report["b_daemon_start_to_preallocated_s"] = prealloc, prealloc_wait


def print_report(report: dict, total: int) -> None:
    def fmt(xs):
        return ", ".join(f"{x:.3f}" for x in xs)

    med = statistics.median
    print(f"{total / MIB:.0f} MiB fp32, 16 tensors")
    if "a_restore_s" in report:
        ours, warm, cold = report["a_restore_s"], report["a_dcp_load_warm_s"], report["a_dcp_load_cold_s"]
        print(f"  (a) restore, 2 ranks FSDP     {fmt(ours)} s")
        print(f"      dcp.load, page cache warm {fmt(warm)} s -> restore {med(warm) / med(ours):.1f}x faster")
        if cold:
            print(f"      dcp.load, from the disk   {fmt(cold)} s -> restore {med(cold) / med(ours):.1f}x faster")
    if "b_load_hf_s" not in report:
        return
    ours, anchor, reader = report["b_load_hf_s"], report["b_safetensors_load_s"], report["b_hf_storage_reader_s"]
    mapped, again = report["b_load_file_cloned_s"], report["b_load_hf_reused_s"]
    print(f"  (b) load-hf, new daemon       {fmt(ours)} s = {total / med(ours) / 1e9:.2f} GB/s")
    print(f"      load-hf, segment reused   {fmt(again)} s = {total / med(again) / 1e9:.2f} GB/s")
    if report.get("b_load_hf_preallocated_s"):
        pre = report["b_load_hf_preallocated_s"]
        print(
            f"      load-hf, new daemon started with --preallocate {fmt(pre)} s = "
            f"{total / med(pre) / 1e9:.2f} GB/s -> {med(mapped) / med(pre):.2f}x load_file + clones kept "
            f"(daemon start to memory ready: {fmt(report['b_daemon_start_to_preallocated_s'])} s)"
        )
    print(
        f"      safetensors load(bytes)   {fmt(anchor)} s = {total / med(anchor) / 1e9:.2f} GB/s -> load-hf "
        f"{med(anchor) / med(ours):.2f}x / {med(anchor) / med(again):.2f}x its speed"
    )
    print(
        f"      load_file + clones kept   {fmt(mapped)} s = {total / med(mapped) / 1e9:.2f} GB/s -> load-hf "
        f"{med(mapped) / med(ours):.2f}x / {med(mapped) / med(again):.2f}x its speed"
    )
    print(f"      DCP HuggingFaceStorageReader {fmt(reader)} s = {total / med(reader) / 1e9:.2f} GB/s")


if __name__ == "__main__":
    sys.exit(main())
