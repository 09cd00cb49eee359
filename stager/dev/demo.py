"""`stager demo`: the product on one machine, in one command.

A daemon; a 2-rank FSDP2 training loop on CPU (gloo) of a tiny torchtitan-style Llama that stages
model, optimizer and train state every few steps with the README's calls (``model.state_dict()``,
``get_optimizer_state_dict``; ``stage()`` returns at once, the copy overlaps the next
forward/backward); and, while it trains, the readers of a real job:

- an RL-style rollout process, ``Subscriber(view="hf")``, loading each new version by HF names;
- ``export-hf`` following the versions (HF safetensors + config.json);
- ``write-dcp`` following the versions (resumable DCP checkpoints of model + optimizer + train state).

The adapter, the HF config and the prefix of the model's tensors travel with each version
(``model_info={"adapter": "llama3", "hf_config": {...}, "prefix": "model."}``): the HF readers
and the exporter take them from there.

The two writers run in threads of this process, in the loop ``--follow`` runs
(:func:`stager.writers.persist.for_each_version` around ``export_snapshot`` /
``write_snapshot_dcp``, exactly what ``export_hf`` / ``write_dcp`` compose), timed per version.

At the end every output is checked against the trainer's unsharded state at that step, bit for
bit: the rollout's HF tensors and the HF export's tensors equal ``llama3``'s conversion of the
model, and the DCP checkpoint loads with plain ``torch.distributed.checkpoint.load`` in one
process (world size 1, not the trainer's 2) into the full model and optimizer. A short table
(or one JSON object) follows; the exit code is 0 only when every check passed. Outputs go to a
temporary directory that is removed; the daemon is stopped and must leave no segment behind.
"""

from __future__ import annotations

import functools
import glob
import importlib
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stager.client.hook.flatten import flatten_state_dict
from stager.dev.launch import DaemonProcess, run_ranks
from stager.metrics import tree_bytes


class TinyModel(nn.Module):
    """Odd sizes on purpose: FSDP2 over 2 ranks shards 37 and 5 rows unevenly."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 24)
        self.up = nn.Linear(24, 37)
        self.down = nn.Linear(37, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(x).mean(1))))


def sharded_model(world_size: int) -> tuple[TinyModel, torch.optim.Optimizer]:
    """TinyModel under FSDP2 (every layer and the root) over a 1-D CPU mesh, with AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world_size,))
    model = TinyModel()
    for layer in (model.embed, model.up, model.down):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


# ---------------------------------------------------------------------------------------------- trainer


def _train_rank(
    rank: int, world_size: int, endpoint: str, steps: int, every: int, out_dir: str, rollout_ready: Any
) -> dict:
    import torch.nn.functional as F
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    from stager.client import StagingClient
    from stager.dev.tiny_llama import HF_CONFIG, sharded_llama

    torch.set_num_threads(1)  # one core per rank: 2 ranks x 2 intra-op threads on 2 cores is 20x slower
    model, optim = sharded_llama(world_size)
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True)
    # travels with each version: HF readers and exporters take adapter, config and prefix from there
    info = {"adapter": "llama3", "hf_config": HF_CONFIG, "prefix": "model."}
    gen = torch.Generator().manual_seed(1 + rank)
    if not rollout_ready.wait(120):  # an RL job starts training once its inference side is up
        raise RuntimeError("the rollout process did not start within 120 s")
    stage_ms = []
    blocked_ms = []
    sealed_ms = []
    nbytes = []
    staged = []
    waiters: list[threading.Thread] = []

    def until_sealed(handle, t0: float) -> None:
        result = handle.wait(60)
        sealed_ms.append((time.perf_counter() - t0) * 1e3)
        nbytes.append(result["nbytes"])

    handle = None
    with StagingClient(endpoint, strict=True) as client:
        for step in range(1, steps + 1):
            tokens = torch.randint(0, HF_CONFIG["vocab_size"], (4, 17), generator=gen)
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            if handle is not None:  # the previous copy overlapped with this forward/backward
                t0 = time.perf_counter()
                handle.wait_copied()
                blocked_ms.append((time.perf_counter() - t0) * 1e3)
                handle = None
            optim.step()
            optim.zero_grad()
            if step % every and step != steps:
                continue
            train = {"step": step, "loss": loss.item()}
            # the README's calls: model.state_dict() (FSDP2's DTensor shards; what torchtitan's checkpointer
            # takes, and what works on its fused-QKV models where get_model_state_dict raises)
            state = {
                "model": model.state_dict(),
                "optim": get_optimizer_state_dict(model, optim, options=flat),
                "train": train,
            }
            t0 = time.perf_counter()
            handle = client.stage(state, step=step, model_info=info)
            stage_ms.append((time.perf_counter() - t0) * 1e3)
            staged.append(step)
            waiters.append(threading.Thread(target=until_sealed, args=(handle, t0), daemon=True))
            waiters[-1].start()
            # the reference the readers are checked against: the unsharded state at this step (a collective)
            expected = {
                "model": {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state["model"].items()},
                "optim": get_optimizer_state_dict(model, optim, options=full),
                "train": train,
            }
            if rank == 0:
                tensors, objects = flatten_state_dict(expected)
                save_file(
                    {k: v.clone() for k, v in tensors.items()},
                    os.path.join(out_dir, f"expected-{step:08d}"),
                    metadata={"objects": json.dumps(objects)},
                )
        if handle is not None:
            handle.wait(60)
        for waiter in waiters:
            waiter.join(60)
    return {"staged": staged, "stage_ms": stage_ms, "blocked_ms": blocked_ms, "sealed_ms": sealed_ms, "nbytes": nbytes}


# ---------------------------------------------------------------------------------------------- readers


def _rollout(endpoint: str, out_dir: str, final_step: int, ready: Any) -> None:
    """An RL rollout worker: each new version by HF names, loaded as an engine's load_weights would."""
    from stager.client import Subscriber

    torch.set_num_threads(1)  # the trainer's ranks have the cores
    records = []
    try:
        with Subscriber(endpoint, view="hf") as sub:
            ready.set()
            for snap in sub:
                t0 = time.perf_counter()
                weights = {name: tensor.clone() for name, tensor in snap.items()}  # load_weights(snap.items())
                ms = (time.perf_counter() - t0) * 1e3
                records.append(
                    {
                        "step": snap.step,
                        "skipped": snap.skipped,
                        "tensors": len(weights),
                        "ms": ms,
                        "bytes": sum(t.numel() * t.element_size() for t in weights.values()),
                    }
                )
                save_file(weights, os.path.join(out_dir, f"rollout-{snap.step:08d}"))  # for the check
                step = snap.step
                snap.release()
                if step >= final_step:
                    break
    finally:
        ready.set()  # a rollout that failed to start does not hold the trainer up: its check fails instead
    with open(os.path.join(out_dir, "rollout.json"), "w") as f:
        json.dump(records, f)


class _Finished(BaseException):
    """Ends a demo writer's follow loop: a stop, not a failure (for_each_version goes on after any Exception)."""


class _Follower(threading.Thread):
    """``--follow`` in a thread: each new version written by ``write(snapshot, out_dir)``, timed,
    until the final step is written."""

    def __init__(self, name: str, write: Callable[[Any, str], str], out_dir: str, endpoint: str, final_step: int):
        super().__init__(name=name, daemon=True)
        self.write = write
        self.out_dir = out_dir
        self.endpoint = endpoint
        self.final_step = final_step
        self.records: list[dict] = []
        self.error: str | None = None

    def run(self) -> None:
        importlib.import_module("torch.distributed.checkpoint")  # once per writer process, not a version's time

        from stager.writers.persist import for_each_version

        def timed(snap) -> str:
            t0 = time.perf_counter()
            try:
                path = self.write(snap, self.out_dir)
            except BaseException as exc:  # stop following: the demo reports it as a failed check
                self.error = f"step {snap.step}: {type(exc).__name__}: {exc}"
                raise _Finished from exc
            self.records.append(
                {"step": snap.step, "ms": (time.perf_counter() - t0) * 1e3, "path": path, "bytes": tree_bytes(path)}
            )
            if snap.step >= self.final_step:
                raise _Finished
            return path

        try:
            for_each_version(timed, self.out_dir, endpoint=self.endpoint, follow=True)
        except _Finished:
            pass
        except BaseException as exc:  # reported as a failed check
            self.error = f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------- checks


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    """Names that differ (missing, extra, dtype, shape or any bit)."""
    bad = sorted(set(got) ^ set(want))
    bad += [k for k in want if k in got and not (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))]
    return bad


def _check_rollout(records: list[dict], tmp: str, expected_hf: Callable[[int], dict]) -> dict:
    bad = {}
    for r in records:
        got = load_file(os.path.join(tmp, f"rollout-{r['step']:08d}"))
        if diff := _same(got, expected_hf(r["step"])):
            bad[r["step"]] = diff[:5]
    ok = bool(records) and not bad
    steps = [r["step"] for r in records]
    return {
        "ok": ok,
        "detail": f"HF view of steps {steps} == llama3(trainer model) bit for bit"
        if ok
        else f"steps seen {steps}; mismatched {bad}",
    }


def _check_export(records: list[dict], out: str, expected_hf: Callable[[int], dict], hf_config: dict) -> dict:
    from safetensors.torch import load_file

    from stager.formats.integrity import verify

    bad = {}
    for r in records:
        files = sorted(glob.glob(os.path.join(r["path"], "*.safetensors")))
        got = {k: v for f in files for k, v in load_file(f).items()}
        with open(os.path.join(r["path"], "config.json")) as f:
            config = json.load(f)
        problems = _same(got, expected_hf(r["step"]))[:5]
        if config != hf_config:
            problems.append("config.json")
        if not verify(r["path"])["ok"]:
            problems.append("manifest")
        if problems:
            bad[r["step"]] = problems
    latest = os.path.realpath(os.path.join(out, "latest"))
    ok = bool(records) and not bad and latest == os.path.realpath(records[-1]["path"])
    steps = [r["step"] for r in records]
    return {
        "ok": ok,
        "detail": f"safetensors of steps {steps} == llama3(trainer model), config.json, manifest"
        if ok
        else f"exported {steps}; mismatched {bad}; latest -> {latest}",
    }


def _check_dcp(records: list[dict], expected: Callable[[int], tuple[dict, dict]]) -> dict:
    import torch.distributed.checkpoint as dcp

    bad = {}
    for r in records:
        tensors, objects = expected(r["step"])
        template: dict[str, Any] = {k: torch.full_like(v, -1) for k, v in tensors.items()}
        template.update({"train.step": -1, "train.loss": -1.0})
        dcp.load(template, checkpoint_id=r["path"], no_dist=True)  # one process: another world size
        problems = _same({k: template[k] for k in tensors}, tensors)[:5]
        problems += [k for k in ("train.step", "train.loss") if template[k] != objects[k]]
        if problems:
            bad[r["step"]] = problems
    ok = bool(records) and not bad
    steps = [r["step"] for r in records]
    n = len(expected(records[-1]["step"])[0]) if records else 0
    return {
        "ok": ok,
        "detail": f"steps {steps} load with dcp.load(no_dist=True) in 1 process: {n} model + optimizer "
        f"tensors and train state == trainer"
        if ok
        else f"written {steps}; mismatched {bad}",
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


# ---------------------------------------------------------------------------------------------- the demo


def _run(steps: int, every: int, tmp: str) -> dict:
    import multiprocessing as mp

    from stager.client.adapters import load_adapter
    from stager.dev.tiny_llama import HF_CONFIG
    from stager.writers.export_hf import export_snapshot
    from stager.writers.write_dcp import write_snapshot_dcp

    ctx = mp.get_context("spawn")
    hf_dir, dcp_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "dcp")
    started = time.perf_counter()
    with DaemonProcess(args=("--memory-limit", "256MiB", "--keep", "2")) as daemon:
        ready = ctx.Event()
        rollout = ctx.Process(target=_rollout, args=(daemon.endpoint, tmp, steps, ready), daemon=True)
        rollout.start()
        export_one = functools.partial(export_snapshot, progress=False)  # `export-hf --follow`'s
        followers = [
            _Follower("export-hf", export_one, hf_dir, daemon.endpoint, steps),
            _Follower("write-dcp", write_snapshot_dcp, dcp_dir, daemon.endpoint, steps),
        ]
        for follower in followers:
            follower.start()
        wait = 5.0
        try:
            ranks = run_ranks(_train_rank, 2, daemon.endpoint, steps, every, tmp, ready)
            wait = 60.0
        finally:  # readers finish the last version (or are stopped when training failed)
            rollout.join(wait)
            if rollout.is_alive():
                rollout.kill()
                rollout.join()
            for follower in followers:
                follower.join(wait)
        daemon_pid = daemon.pid
    exit_code = daemon.proc.returncode
    leftover = [p for p in glob.glob(f"/dev/shm/stager-{os.getuid()}-{daemon_pid}-*")]
    wall = time.perf_counter() - started

    # ------------------------------------------------------------------ checks
    cache: dict[int, tuple[dict, dict]] = {}

    def expected(step: int) -> tuple[dict, dict]:
        if step not in cache:
            path = os.path.join(tmp, f"expected-{step:08d}")
            with safe_open(path, framework="pt") as f:
                objects = json.loads(f.metadata()["objects"])
            cache[step] = load_file(path), objects
        return cache[step]

    llama3 = load_adapter("llama3", HF_CONFIG)  # the built-in adapter, on the model part of the state

    def expected_hf(step: int) -> dict:
        tensors = expected(step)[0]
        return llama3.to_hf({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})

    rollout_records = []
    if os.path.exists(os.path.join(tmp, "rollout.json")):
        with open(os.path.join(tmp, "rollout.json")) as f:
            rollout_records = json.load(f)
    export, writer = followers
    r0 = ranks[0]
    staged_ok = all(r["staged"] == r0["staged"] and len(r["sealed_ms"]) == len(r["staged"]) for r in ranks)
    checks = {
        "trainer": {
            "ok": staged_ok and bool(r0["staged"]) and r0["staged"][-1] == steps,
            "detail": f"2 ranks staged and sealed steps {r0['staged']}",
        },
        "subscriber": _check_rollout(rollout_records, tmp, expected_hf)
        if rollout.exitcode == 0
        else {"ok": False, "detail": f"rollout process exit code {rollout.exitcode}"},
        "export_hf": _check_export(export.records, hf_dir, expected_hf, HF_CONFIG)
        if not export.error
        else {"ok": False, "detail": export.error},
        "write_dcp": _check_dcp(writer.records, expected)
        if not writer.error
        else {"ok": False, "detail": writer.error},
        "cleanup": {
            "ok": exit_code == 0 and not leftover,
            "detail": f"daemon stopped (exit {exit_code}), {len(leftover)} segments left in /dev/shm",
        },
    }
    total = sum(r0["nbytes"])
    consumers = {
        "trainer": {
            "versions": len(r0["staged"]),
            "steps": r0["staged"],
            "bytes": total,
            "median_ms": _median([m for r in ranks for m in r["sealed_ms"]]),
            "stage_call_median_ms": _median([m for r in ranks for m in r["stage_ms"]]),
            "wait_copied_median_ms": _median([m for r in ranks for m in r["blocked_ms"]]),
        },
        "subscriber": {
            "versions": len(rollout_records),
            "steps": [r["step"] for r in rollout_records],
            "skipped": sum(r["skipped"] for r in rollout_records),
            "bytes": sum(r["bytes"] for r in rollout_records),
            "median_ms": _median([r["ms"] for r in rollout_records]),
        },
        "export_hf": {
            "versions": len(export.records),
            "steps": [r["step"] for r in export.records],
            "bytes": sum(r["bytes"] for r in export.records),
            "median_ms": _median([r["ms"] for r in export.records]),
        },
        "write_dcp": {
            "versions": len(writer.records),
            "steps": [r["step"] for r in writer.records],
            "bytes": sum(r["bytes"] for r in writer.records),
            "median_ms": _median([r["ms"] for r in writer.records]),
        },
    }
    return {
        "ok": all(c["ok"] for c in checks.values()),
        "steps": steps,
        "every": every,
        "model": "tiny torchtitan-style Llama 3 (2 layers, hidden 64), FSDP2 over 2 gloo ranks, AdamW",
        "seconds": round(wall, 2),
        "consumers": consumers,
        "checks": checks,
    }


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _print_table(s: dict) -> None:
    c = s["consumers"]
    t = c["trainer"]
    print(f"stager demo: {s['model']}; {s['steps']} steps, staged every {s['every']} ({s['seconds']:.1f} s)")
    print(f"  {'consumer':<17}{'versions':>8}{'bytes':>12}{'median ms/version':>19}")
    rows = [
        (
            "trainer staging",
            t,
            f"  stage() to sealed; stage() returned in {t['stage_call_median_ms']} ms, "
            f"wait_copied blocked {t['wait_copied_median_ms']} ms",
        ),
        ("subscriber (hf)", c["subscriber"], f"  {c['subscriber']['skipped']} skipped"),
        ("export-hf", c["export_hf"], ""),
        ("write-dcp", c["write_dcp"], ""),
    ]
    for label, row, note in rows:
        ms = "-" if row["median_ms"] is None else f"{row['median_ms']:.1f}"
        print(f"  {label:<17}{row['versions']:>8}{_size(row['bytes']):>12}{ms:>19}{note}")
    print("  checks")
    for name, check in s["checks"].items():
        print(f"    {'ok' if check['ok'] else 'FAILED':<7}{name.replace('_', '-'):<12}{check['detail']}")
    print(
        "ok: every reader's output matches the trainer's state bit for bit: yes"
        if s["ok"]
        else "FAILED: " + ", ".join(k for k, v in s["checks"].items() if not v["ok"])
    )


def run_demo(steps: int = 6, stage_every: int = 2, json_out: bool = False) -> int:
    """Run the demo; print the table (or one JSON object); 0 only when every check passed."""
    if steps < 1 or stage_every < 1:
        raise ValueError("steps and stage_every must be >= 1")
    tmp = tempfile.mkdtemp(prefix="stager-demo-")
    try:
        summary = _run(steps, stage_every, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if json_out:
        print(json.dumps(summary))
    else:
        _print_table(summary)
    return 0 if summary["ok"] else 1
