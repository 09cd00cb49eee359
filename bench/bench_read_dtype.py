"""Remote reads in the reader's dtype: bf16 from an fp32 version, cast by the daemon or by the reader.

    python bench/bench_read_dtype.py [--params-m 26.5] [--repeat 5] [--transport ipc|tcp|both] [--json PATH]

A ``stager serve`` process holds one fp32 version of about PARAMS_M million parameters ([2048, 1024]
tensors plus a few vectors); a reader in this process reads it over the socket (``remote=True``, what a
reader on another host does; ``tcp`` is CURVE-encrypted, as every tcp daemon is) into bf16:

- ``reader_casts``: ``Subscriber(remote=True)`` without a dtype, then ``.to(bf16)`` by the reader: the fp32
  bytes over the wire (``load_into`` of bf16 buffers asks for their dtype since the daemon casts, so it
  moves bf16 there too: for the figures before, run this script on the commit before the change, as
  bench/results/read-dtype-2026-12-07-{before,after}.json were);
- ``daemon_casts``: ``Subscriber(dtype=torch.bfloat16, remote=True)``: the reads ask for bf16, the daemon
  casts each 64 MiB request before the wire;
- ``same_host``: the same reader mapping the segment (no wire), for reference.

For each: wall time of ``items()`` (every tensor, in bf16) and of ``load_into`` (bf16 engine buffers),
bytes the daemon served (its ``read_bytes`` counter), and the daemon's CPU time (its ``cpu_seconds``)
and the reader's over the read. Medians of ``--repeat`` runs; the machine is shared: compare figures of
one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import curve_keys, machine, write_report  # noqa: E402
from stager.client import StagingClient, Subscriber  # noqa: E402
from stager.client.admin import daemon_status  # noqa: E402
from stager.dev.launch import DaemonProcess  # noqa: E402

MIB = 1 << 20
BF16 = torch.bfloat16


def model(params_m: float) -> dict[str, torch.Tensor]:
    n = max(1, round(params_m * 1e6 / (2048 * 1024)))
    sd = {f"layers.{i}.w": torch.randn(2048, 1024) * 0.02 for i in range(n)}
    sd.update({f"layers.{i}.norm": torch.ones(1024) for i in range(n)})
    return sd


def measure(endpoint: str, mode: str, how: str, engine: dict[str, torch.Tensor]) -> dict:
    before = daemon_status(endpoint)
    cpu0, t0 = time.process_time(), time.perf_counter()
    sub = Subscriber(endpoint, dtype=None if mode == "reader_casts" else BF16, remote=mode != "same_host")
    with sub, sub.latest() as snap:
        if how == "items":
            for _, t in snap.items():
                t.to(BF16)  # a no-op where the bytes came in bf16
        else:
            with torch.no_grad():
                snap.load_into(engine)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    after = daemon_status(endpoint)
    return {
        "wall_s": wall,
        "reader_cpu_s": cpu,
        "daemon_cpu_s": after["cpu_seconds"] - before["cpu_seconds"],
        "served_mib": (after["counters"]["read_bytes"] - before["counters"]["read_bytes"]) / MIB,
    }


def run(transport: str, params_m: float, repeat: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="stgb")
    endpoint, args = f"ipc://{tmp}/d.sock", ["--memory-limit", "2GiB"]
    if transport == "tcp":
        args += ["--auth-dir", curve_keys(tmp)]
        endpoint = "tcp://127.0.0.1:47831"
    sd = model(params_m)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    out: dict = {
        "transport": transport,
        "params_m": sum(t.numel() for t in sd.values()) / 1e6,
        "fp32_mib": nbytes / MIB,
    }
    with DaemonProcess(endpoint, args=tuple(args)) as d:
        with StagingClient(d.endpoint, strict=True) as c:
            c.stage(sd, step=1).wait(120)
        engine = {k: torch.empty(v.shape, dtype=BF16) for k, v in sd.items()}
        for how in ("items", "load_into"):
            for mode in ("reader_casts", "daemon_casts", "same_host"):
                runs = [measure(d.endpoint, mode, how, engine) for _ in range(repeat)]
                out[f"{how}.{mode}"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                print(transport, how, mode, {k: round(v, 4) for k, v in out[f"{how}.{mode}"].items()}, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params-m", type=float, default=26.5)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--transport", choices=("ipc", "tcp", "both"), default="both")
    p.add_argument("--json")
    a = p.parse_args()
    transports = ("ipc", "tcp") if a.transport == "both" else (a.transport,)
    report = {"machine": machine(), "runs": [run(t, a.params_m, a.repeat) for t in transports]}
    write_report(a.json, report)


if __name__ == "__main__":
    main()
