"""What copying a checkpoint into shared memory costs on this kernel, against safetensors.

    python bench/bench_shm_copy.py [--size-mib 512] [--huge-dir DIR] [--json PATH]

The floors under ``load-hf``: a 4-file safetensors checkpoint (page cache warm) copied into one
/dev/shm file as a segment is, new (its pages allocated by the copy) and reused (pages already
there), by the ways a loader can: ``sendfile`` from 1 and 2 threads (what load-hf does), and a
mapping faulted in with ``MADV_POPULATE_WRITE`` then read into (what it did before). Also
``posix_fallocate`` of a new file alone (page allocation, no copy), and the anchor:
``safetensors.torch.load_file`` with every tensor copied out and kept, in a fresh process.
``--huge-dir`` repeats the new-file figures in a tmpfs mounted with ``huge=within_size`` (the
operator mounts it: ``mount -t tmpfs -o huge=within_size,size=4g tmpfs DIR``).
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import in_child, load_file_kept, machine, settle_memory, write_report  # noqa: E402

ROUNDS = 3
FILES = 4
MADV_POPULATE_WRITE = 23


def _checkpoint(directory: str, size_mib: int) -> list[str]:
    from safetensors.torch import save_file

    per_file = (size_mib << 20) // FILES // 4  # float32 elements
    paths = []
    for i in range(FILES):
        path = os.path.join(directory, f"model-{i}.safetensors")
        save_file({f"t{i}.{j}": torch.randn(per_file // 4) for j in range(4)}, path)
        paths.append(path)
    return paths


def _stride(paths: list[str]) -> int:
    return max(os.path.getsize(p) for p in paths) + (2 << 20)


def _new_file(directory: str, size: int, fresh: bool) -> str:
    path = os.path.join(directory, f"stager-bench-{os.getpid()}")
    if fresh and os.path.exists(path):
        os.unlink(path)
    with open(path, "ab") as f:
        f.truncate(size)
    return path


def sendfile_copy(paths: list[str], target: str, threads: int) -> float:
    stride = _stride(paths)
    t0 = time.perf_counter()

    def work(indices):
        out = os.open(target, os.O_WRONLY)
        for i in indices:
            src = os.open(paths[i], os.O_RDONLY)
            size, done = os.fstat(src).st_size, 0
            os.lseek(out, i * stride, os.SEEK_SET)
            while done < size:
                done += os.sendfile(out, src, done, size - done)
            os.close(src)
        os.close(out)

    workers = [threading.Thread(target=work, args=(range(k, FILES, threads),)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def mapped_copy(paths: list[str], target: str) -> float:
    stride = _stride(paths)
    fd = os.open(target, os.O_RDWR)
    t0 = time.perf_counter()
    m = mmap.mmap(fd, stride * FILES)
    m.madvise(MADV_POPULATE_WRITE)
    for i, path in enumerate(paths):
        with open(path, "rb") as f:
            f.readinto(memoryview(m)[i * stride : i * stride + os.path.getsize(path)])
    elapsed = time.perf_counter() - t0
    m.close()
    os.close(fd)
    return elapsed


def fallocate_only(directory: str, size: int) -> float:
    path = _new_file(directory, 0, fresh=True)
    fd = os.open(path, os.O_RDWR)
    t0 = time.perf_counter()
    os.posix_fallocate(fd, 0, size)
    elapsed = time.perf_counter() - t0
    os.close(fd)
    os.unlink(path)
    return elapsed


def measure(directory: str, paths: list[str]) -> dict:
    size = _stride(paths) * FILES
    out: dict[str, list[float]] = {
        k: []
        for k in (
            "fallocate_new",
            "sendfile1_new",
            "sendfile2_new",
            "sendfile1_reused",
            "sendfile2_reused",
            "mapped_new",
            "mapped_reused",
        )
    }
    for _ in range(ROUNDS):
        settle_memory()
        out["fallocate_new"].append(fallocate_only(directory, size))
        for threads in (1, 2):
            target = _new_file(directory, size, fresh=True)
            out[f"sendfile{threads}_new"].append(sendfile_copy(paths, target, threads))
            out[f"sendfile{threads}_reused"].append(sendfile_copy(paths, target, threads))
            os.unlink(target)
        target = _new_file(directory, size, fresh=True)
        out["mapped_new"].append(mapped_copy(paths, target))
        out["mapped_reused"].append(mapped_copy(paths, target))
        os.unlink(target)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--huge-dir", help="a tmpfs mounted with huge=within_size, to compare")
    parser.add_argument("--json")
    args = parser.parse_args()
    report: dict = machine()
    tmp = tempfile.mkdtemp(prefix="stager-bench-shm-")
    try:
        paths = _checkpoint(tmp, args.size_mib)
        for p in paths:  # the page cache holds every file
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass
        report["bytes"] = sum(os.path.getsize(p) for p in paths)
        report["dev_shm"] = measure("/dev/shm", paths)
        if args.huge_dir:
            report["huge_tmpfs"] = measure(args.huge_dir, paths)
        report["load_file_kept"] = []
        for _ in range(ROUNDS):
            settle_memory()
            report["load_file_kept"].append(in_child(load_file_kept, paths)[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
        report["shmem_thp"] = f.read().strip()
    med = statistics.median
    anchor = med(report["load_file_kept"])
    print(f"{report['bytes'] / 2**20:.0f} MiB in {FILES} files; shmem THP: {report['shmem_thp']}")
    print(f"  anchor: load_file, clones kept      {', '.join(f'{x:.3f}' for x in report['load_file_kept'])} s")
    for where in ("dev_shm", "huge_tmpfs"):
        for key, xs in report.get(where, {}).items():
            times = ", ".join(f"{x:.3f}" for x in xs)
            print(f"  {where:10} {key:18} {times} s = {anchor / med(xs):.2f}x the anchor's speed")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
