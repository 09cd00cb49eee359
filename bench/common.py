"""What every benchmark script shares: the machine header of a report, and writing it."""

from __future__ import annotations

import datetime
import json
import os
import platform

import torch


def machine() -> dict:
    """Date and machine of a run, recorded with every report (BENCHMARKS.md quotes them)."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_report(path: str | None, report: dict) -> None:
    """Write ``report`` as JSON to ``path`` (nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {path}")


def curve_keys(tmp: str) -> str:
    """``stager keygen`` into ``tmp/keys`` (every tcp daemon requires CURVE keys), exported as
    ``STAGER_AUTH_DIR`` for this process and the ones it spawns; returns the directory."""
    import subprocess
    import sys

    keys = os.path.join(tmp, "keys")
    subprocess.run([sys.executable, "-m", "stager.cli", "keygen", keys], check=True, capture_output=True)
    os.environ["STAGER_AUTH_DIR"] = keys
    return keys


PAGE_REPORTING = "/sys/module/page_reporting/parameters/reported_kib"


def settle_memory(quiet_s: float = 5.0, limit_s: float = 30.0) -> float:
    """Wait until a VM guest's free page reporting has handed the memory freed by the previous
    measurement back to the host (its counter unchanged for ``quiet_s``, at most ``limit_s``);
    returns the seconds waited (0 where the kernel does not report free pages).

    Why: on such a guest, touching memory the host took back costs a host fault per page (measured
    here: ~2.5 s per GiB, against ~0.35 s for memory freed a moment ago). Without this wait, a
    measurement that runs right after another reuses the memory the other just freed, and the
    order of the two decides the comparison rather than the code.
    """
    if not os.path.exists(PAGE_REPORTING):
        return 0.0
    import time

    def reported() -> int:
        with open(PAGE_REPORTING) as f:
            return int(f.read())

    start = quiet_since = time.monotonic()
    last = reported()
    while time.monotonic() - start < limit_s and time.monotonic() - quiet_since < quiet_s:
        time.sleep(0.25)
        now = reported()
        if now != last:
            last, quiet_since = now, time.monotonic()
    return time.monotonic() - start


def _touch_fresh(size: int, count: int, queue) -> None:
    import time

    held, times = [], []
    for _ in range(count):
        t0 = time.perf_counter()
        held.append(torch.ones(size // 4, dtype=torch.float32))  # allocates and writes every page
        times.append(time.perf_counter() - t0)
    queue.put(times)


def in_child(target, *args, timeout: float = 600.0):
    """Run ``target(*args, queue)`` in a fresh spawned process and return what it put on the queue;
    a child that dies without answering raises at once, naming its exit code."""
    import multiprocessing as mp
    import queue as queue_mod
    import time

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, results))
    proc.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                return results.get(timeout=1.0)
            except queue_mod.Empty:
                if proc.exitcode is not None:
                    raise RuntimeError(
                        f"{target.__name__} exited with code {proc.exitcode} without answering"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{target.__name__} did not answer within {timeout:.0f}s") from None
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()


def fresh_memory_seconds(size: int, count: int = 4) -> list[float]:
    """Seconds a fresh process takes to allocate and write each of ``count`` blocks of ``size`` bytes
    of new memory, held together: the floor under any first checkpoint, which fills memory it
    never had. On a guest that reports free pages to its host the first block or so comes from
    memory freed recently and is cheap; the later ones show what new memory really costs."""
    return in_child(_touch_fresh, size, count, timeout=300.0)


def load_file_kept(paths, queue) -> None:
    """The anchor of a checkpoint load: ``safetensors.torch.load_file`` (lazy mmap), then every
    tensor copied into process memory and kept, as a loader holds them. (Summing clones as they
    are made would free each at once, and the allocator would hand the next clone the same warm
    pages: a copy loop, not a load.) Puts ``(seconds, bytes)`` on ``queue``; run it with
    :func:`in_child`."""
    import time

    from safetensors.torch import load_file

    t0 = time.perf_counter()
    held = [t.clone() for p in paths for t in load_file(p).values()]
    queue.put((time.perf_counter() - t0, sum(t.numel() * t.element_size() for t in held)))
