"""Garbage collections in a real ``stager serve`` that keeps change maps: what the kept maps cost the GC.

    python bench/gc_change_maps.py [--tensors 1000] [--steps 200] [--change-maps bfloat16] [--json PATH]

A CPython full (generation 2) collection walks every GC-tracked object and holds the GIL while it
does: the daemon's loop answers no Begin meanwhile. The kept change maps (``--change-maps-keep``,
64 by default) are most of a daemon's long-lived objects, and the objects a map is made of pass
through the generations as it is made. This probe runs the daemon under a ``gc.callbacks`` hook
(this script re-runs itself as the daemon: ``--serve``), stages ``--steps`` steps of ``--tensors``
small fp32 tensors from one client (per step a few elements of a quarter of the tensors move past
bf16's precision, one tensor in 50 is rewritten whole; each step waits for its map, so every map is
made), then stops the daemon, which reports:

- per generation: collections, their CPU ms (the collecting thread's ``time.thread_time``: load on
  the machine does not distort it), the largest one, and per 100 staged steps;
- the map thread's CPU time per map made (``changes.cpu_s``);
- GC-tracked objects: all of them after a ``gc.collect()`` (and those frozen at start-up, which no
  collection walks), and those each kept map holds (reached from the map's record through tracked
  objects only; types, modules and functions not followed).

Collections during start-up (until ``Daemon.serve``) are reported apart.

Figures are counts and CPU time, not wall-clock: they can be rerun on a loaded machine.
Run with ``--change-maps none`` for the daemon's objects without maps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- the daemon side


def _gc_hook() -> dict:
    """Install a ``gc.callbacks`` hook; returns the per-generation tallies it fills."""
    gens = {g: {"count": 0, "cpu_ms": 0.0, "max_cpu_ms": 0.0, "map_thread": 0} for g in range(3)}
    started = {}

    def hook(phase: str, info: dict) -> None:
        if phase == "start":
            started[threading.get_ident()] = time.thread_time()
            return
        began = started.pop(threading.get_ident(), None)
        if began is None:
            return
        ms = (time.thread_time() - began) * 1e3
        g = gens[info["generation"]]
        g["count"] += 1
        g["cpu_ms"] += ms
        g["max_cpu_ms"] = max(g["max_cpu_ms"], ms)
        g["map_thread"] += threading.current_thread().name == "stager-changes"

    gc.callbacks.append(hook)
    return gens


_LEAVES = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def _tracked_from(root) -> int:
    """GC-tracked objects reachable from ``root`` through tracked objects (itself included)."""
    seen, todo = {id(root)}, [root]
    while todo:
        for ref in gc.get_referents(todo.pop()):
            if gc.is_tracked(ref) and not isinstance(ref, _LEAVES) and id(ref) not in seen:
                seen.add(id(ref))
                todo.append(ref)
    return len(seen)


def _objects_report(maps) -> dict:
    gc.collect()
    per_map = [_tracked_from(r) for r in maps.records.values()]
    return {
        "map_cpu_s": maps.cpu_s,  # the map thread's CPU time, the maps recorded (made) together
        "skipped": maps.skipped,
        "tracked_objects": len(gc.get_objects()),  # the frozen ones aside
        "frozen": gc.get_freeze_count(),
        "kept_maps": len(per_map),
        "tracked_per_kept_map": {
            "min": min(per_map, default=0),
            "max": max(per_map, default=0),
            "mean": round(sum(per_map) / len(per_map), 1) if per_map else 0,
        },
    }


def serve(out: str, argv: list[str]) -> int:
    """``stager serve argv`` in this process, under the hook; the figures go to ``out`` when it stops."""
    from stager import cli
    from stager.daemon import Daemon, handlers

    gens = _gc_hook()
    report: dict = {}
    close, start = handlers.Handlers.close, Daemon.serve

    def closing(self, *args, **kwargs):  # the maps as the daemon held them, before it lets them go
        report.update(_objects_report(self.changes))
        return close(self, *args, **kwargs)

    def serving(self, *args, **kwargs):  # start-up is done: the collections of serving from here
        report["start_up"] = {g: dict(c) for g, c in gens.items()}
        for c in gens.values():
            c.update(count=0, cpu_ms=0.0, max_cpu_ms=0.0, map_thread=0)
        return start(self, *args, **kwargs)

    handlers.Handlers.close, Daemon.serve = closing, serving
    rc = cli.main(["serve", *argv])
    report["collections"] = gens
    report["threshold"] = list(gc.get_threshold())
    with open(out, "w") as f:
        json.dump(report, f)
    return rc


# --------------------------------------------------------------------------- the trainer side


def _wait(pred, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.005)
    raise TimeoutError(f"{what} within {timeout:.0f}s")


def _made(endpoint: str, step: int) -> bool:
    from stager.client.admin import daemon_status

    status = daemon_status(endpoint)
    return any(v["step"] == step and "changed" in v for v in status["versions"]) or not status["changes"]["dtypes"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tensors", type=int, default=1000, help="tensors per step (default 1000)")
    p.add_argument("--numel", type=int, default=256, help="fp32 elements per tensor (default 256)")
    p.add_argument("--steps", type=int, default=200, help="steps staged (default 200)")
    p.add_argument("--change-maps", default="bfloat16", help="daemon --change-maps (default bfloat16)")
    p.add_argument("--daemon-args", default="", help="more daemon flags, space-separated")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON to PATH")
    p.add_argument("--serve", metavar="OUT", help=argparse.SUPPRESS)  # internal: run as the daemon
    args, rest = p.parse_known_args(argv)
    if args.serve:
        return serve(args.serve, [a for a in rest if a != "--"])

    tmp = tempfile.mkdtemp(prefix="gcmaps-")
    out = os.path.join(tmp, "gc.json")
    flags = ["--json", "--endpoint", f"ipc://{tmp}/s.sock", "--change-maps", args.change_maps]
    flags += args.daemon_args.split()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", out, "--", *flags], stdout=subprocess.PIPE, text=True)
    try:
        if not select.select([proc.stdout], [], [], 120)[0]:
            raise RuntimeError("the daemon was not ready within 120 s")
        endpoint = json.loads(proc.stdout.readline())["endpoint"]
        _stage(endpoint, args)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    with open(out) as f:
        report = json.load(f)
    report["config"] = {"tensors": args.tensors, "numel": args.numel, "steps": args.steps, "maps": args.change_maps}
    _print(report, args.steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def _stage(endpoint: str, args) -> None:
    from stager.client import StagingClient

    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.w": torch.randn(args.numel, generator=g) for i in range(args.tensors)}
    names = list(sd)
    with StagingClient(endpoint, strict=True) as client:
        for step in range(1, args.steps + 1):
            moved = torch.randperm(len(names), generator=g)[: max(1, len(names) // 4)].tolist()
            for i in moved:  # a few elements past bf16's precision: an indices map
                sd[names[i]][torch.randint(0, args.numel, (3,), generator=g)] += 0.5
            for i in moved[: max(1, len(names) // 50)]:  # dense: whole
                sd[names[i]].copy_(torch.randn(args.numel, generator=g))
            client.stage(sd, step=step).wait(60)
            if step > 1:
                _wait(lambda: _made(endpoint, step), f"the change map of step {step}")


def _print(report: dict, steps: int) -> None:
    print(f"config {report['config']}  gc threshold {report['threshold']}")
    per = report.get("tracked_per_kept_map", {})
    print(
        f"tracked objects: {report.get('tracked_objects')} in all ({report.get('frozen')} frozen aside); "
        f"{report.get('kept_maps')} kept maps, "
        f"{per.get('min')}..{per.get('max')} (mean {per.get('mean')}) each"
    )
    made = steps - 1 - report.get("skipped", 0)
    if made > 0 and report.get("map_cpu_s"):
        print(f"maps: {made} made, {report['map_cpu_s'] * 1e3 / made:.2f} ms of the map thread's CPU each")
    start = report["start_up"]
    print("start-up: " + ", ".join(f"gen {g} {c['count']} ({c['cpu_ms']:.1f} ms CPU)" for g, c in start.items()))
    for g, c in sorted(report["collections"].items()):
        print(
            f"gen {g}: {c['count']} collections ({c['count'] * 100 / steps:.1f} per 100 steps, "
            f"{c['map_thread']} on the map thread), {c['cpu_ms']:.1f} ms CPU "
            f"({c['cpu_ms'] * 100 / steps:.1f} per 100 steps), largest {c['max_cpu_ms']:.2f} ms"
        )


if __name__ == "__main__":
    sys.exit(main())
