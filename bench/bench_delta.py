"""Delta reads on a real RL-like run: what changes per step, and what a delta read moves and costs.

    python bench/bench_delta.py [--hidden 512] [--layers 8] [--steps 20] [--lr 1e-5] [--json PATH]

A transformers Llama (fp32 master weights, AdamW at an RL learning rate) trains on real text (the
Python documentation topics shipped with the interpreter, ``pydoc_data``, word-level tokens) and
stages every step to two real daemons (``stager serve`` processes): A computes change maps (bf16,
the default), B does not (``--change-maps none``), the order alternating per step, so the trainer's
``stage()`` and ``wait_copied()`` are measured with and without change maps in the same run.
Readers of A keep bf16 parameters: per step a same-host reader (shared memory) and a remote reader
(frames over the socket, ``remote=True``) each update once with ``load_into(params, since=N)`` and
once in full into other tensors; the results are compared bit for bit.

Per step: fraction of bf16 elements / bytes / tensors changed; what other encodings would move
(whole changed tensors, changed 4 KiB blocks); bytes a delta read moved (the daemon's read_bytes)
against a full read; delta and full update times; the daemon's CPU seconds for the change map
against the trainer's copy time. Goals (issue 25): bytes moved <= 1.5x the changed data (values
plus indices); a remote delta >= 5x faster than a full read when <= 5% of elements change; change
maps cost the trainer nothing (stage() and wait_copied() unchanged within noise).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_report  # noqa: E402
from stager.client import StagingClient, Subscriber  # noqa: E402
from stager.client.admin import daemon_status  # noqa: E402
from stager.dev.launch import DaemonProcess  # noqa: E402

BLOCK = 4096  # bytes: the granularity a block-level delta would move


def corpus(vocab: int, seq: int, batch: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """``steps`` batches of word-level token ids from the Python docs' topics (pydoc_data)."""
    from pydoc_data.topics import topics

    words = re.findall(r"\w+|[^\w\s]", " ".join(topics.values()))
    ids = {w: i + 1 for i, (w, _) in enumerate(Counter(words).most_common(vocab - 1))}
    tokens = torch.tensor([ids.get(w, 0) for w in words])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq - 1, (steps, batch), generator=g)
    return [torch.stack([tokens[s : s + seq] for s in row.tolist()]) for row in starts]


def status_of(endpoint: str, step: int) -> dict | None:
    for v in daemon_status(endpoint)["versions"]:
        if v["step"] == step:
            return v
    return None


def wait_for(pred, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


def read_bytes(endpoint: str) -> int:
    return daemon_status(endpoint)["counters"]["read_bytes"]


def alternatives(prev: dict, new: dict) -> dict:
    """Bytes each encoding would move for this step's bf16 change (prev/new: bf16 tensors)."""
    elems = tensors = whole = blocks = 0
    for k, t in new.items():
        ne = (t.view(torch.int16) != prev[k].view(torch.int16)).view(-1)
        n = int(ne.sum())
        elems += n
        if n:
            tensors += 1
            whole += t.numel() * 2
            per = BLOCK // 2
            pad = (-ne.numel()) % per
            blocks += int(torch.nn.functional.pad(ne, (0, pad)).view(-1, per).any(dim=1).sum()) * BLOCK
    return {
        "changed_elements": elems,
        "changed_tensors": tensors,
        "indices_values_bytes": elems * 6,
        "whole_changed_tensors_bytes": whole,
        "changed_4k_blocks_bytes": blocks,
    }


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far, from /proc: load does not inflate it."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(fn, daemon_pid: int) -> tuple[float, float, float]:
    """Wall seconds, this process's CPU seconds and the daemon's CPU seconds of ``fn()``."""
    d0, c0 = cpu_s(daemon_pid), time.process_time()
    wall = timed(fn)
    return wall, time.process_time() - c0, cpu_s(daemon_pid) - d0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
    )
    model = LlamaForCausalLM(cfg).float()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    batches = corpus(args.vocab, args.seq, args.batch, args.steps + 1)
    sd = model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    report: dict = {
        **machine(),
        "model": {
            "params": sum(t.numel() for t in sd.values()),
            "fp32_bytes": nbytes,
            "tensors": len(sd),
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
        },
        "lr": args.lr,
        "steps": [],
    }
    print(
        f"model: {report['model']['params'] / 1e6:.1f}M params, {nbytes / 2**20:.0f} MiB fp32, {len(sd)} tensors",
        file=sys.stderr,
    )
    limit = ("--memory-limit", str(5 * nbytes), "--keep", "2")
    with (
        DaemonProcess(args=(*limit, "--change-maps", "bfloat16")) as a,
        DaemonProcess(args=(*limit, "--change-maps", "none")) as b,
        StagingClient(a.endpoint, strict=True) as ca,
        StagingClient(b.endpoint, strict=True) as cb,
        Subscriber(a.endpoint) as local,
        Subscriber(a.endpoint, remote=True) as remote,
    ):
        bf16 = {k: torch.empty(t.shape, dtype=torch.bfloat16) for k, t in sd.items()}
        readers = {
            name: ({k: t.clone() for k, t in bf16.items()}, {k: t.clone() for k, t in bf16.items()})
            for name in ("local", "remote")
        }  # (delta params, full params)
        subs = {"local": local, "remote": remote}
        prev_cast = None
        for step in range(1, args.steps + 2):
            model.train()
            t0 = time.perf_counter()
            ids = batches[step - 1]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            train_s = time.perf_counter() - t0
            row: dict = {"step": step, "loss": round(float(loss), 4), "train_s": round(train_s, 3)}
            for client, tag in ((ca, "maps"), (cb, "no_maps")) if step % 2 else ((cb, "no_maps"), (ca, "maps")):
                t0 = time.perf_counter()
                h = client.stage(sd, step=step)
                t1 = time.perf_counter()
                h.wait_copied()
                t2 = time.perf_counter()
                h.wait(120)
                row[f"stage_ms_{tag}"] = round((t1 - t0) * 1e3, 2)
                row[f"copied_ms_{tag}"] = round((t2 - t1) * 1e3, 2)
            cast = {k: v.detach().bfloat16() for k, v in sd.items()}
            if prev_cast is not None:
                row.update(alternatives(prev_cast, cast))
                t0 = time.monotonic()
                changed = wait_for(lambda: (status_of(a.endpoint, step) or {}).get("changed"))["bf16"]
                row["map_wait_s"] = round(time.monotonic() - t0, 3)
                row.update(
                    {
                        "elements": changed["elements"],
                        "bytes": changed["bytes"],
                        "tensors": changed["tensors"],
                        "whole_tensors": changed["whole"],
                        "delta_bytes_est": changed["delta_bytes"],
                        "full_bytes_bf16": changed["full_bytes"],
                        "map_cpu_s": changed["cpu_s"],
                    }
                )
            prev_cast = cast
            for name, sub in subs.items():
                delta_dst, full_dst = readers[name]
                with sub.at(step) as snap:
                    reads = {
                        "delta": lambda: snap.load_into(delta_dst, since=step - 1 if step > 1 else None),
                        "full": lambda: snap.load_into(full_dst),
                    }
                    for kind, read in reads.items():
                        before = read_bytes(a.endpoint)
                        wall, cpu, daemon_cpu = measured(read, a.pid)
                        row[f"{name}_{kind}_moved"] = read_bytes(a.endpoint) - before
                        row[f"{name}_{kind}_s"] = round(wall, 4)
                        row[f"{name}_{kind}_cpu_s"] = round(cpu, 4)  # the reader's (this process's)
                        row[f"{name}_{kind}_daemon_cpu_s"] = round(daemon_cpu, 4)
                exact = all(torch.equal(delta_dst[k], full_dst[k]) for k in sd)
                row[f"{name}_exact"] = exact
                if not exact:
                    print(f"step {step}: {name} delta read differs from the full read", file=sys.stderr)
            row["daemon_cpu_s"] = daemon_status(a.endpoint)["cpu_seconds"]
            report["steps"].append(row)
            print({k: row[k] for k in row if not k.startswith("stage_ms")}, file=sys.stderr)
        report["daemon_changes"] = daemon_status(a.endpoint)["changes"]
    summarize(report)
    write_report(args.json, report)
    return 0 if all(r["local_exact"] and r["remote_exact"] for r in report["steps"]) else 1


def summarize(report: dict) -> None:
    rows = [r for r in report["steps"] if "elements" in r]
    med = statistics.median
    out = {
        "elements_changed_median": med(r["elements"] for r in rows),
        "elements_changed_range": [min(r["elements"] for r in rows), max(r["elements"] for r in rows)],
        "remote_delta_vs_changed_data": med(r["remote_delta_moved"] / max(1, r["indices_values_bytes"]) for r in rows),
        "remote_full_over_delta_time": med(r["remote_full_s"] / r["remote_delta_s"] for r in rows),
        "local_full_over_delta_time": med(r["local_full_s"] / r["local_delta_s"] for r in rows),
        "remote_delta_cpu_s_median": {
            side: med(r[f"remote_delta_{side}"] for r in rows) for side in ("cpu_s", "daemon_cpu_s")
        },
        "remote_full_cpu_s_median": {
            side: med(r[f"remote_full_{side}"] for r in rows) for side in ("cpu_s", "daemon_cpu_s")
        },
        "map_cpu_s_median": med(r["map_cpu_s"] for r in rows),
        "copied_ms_maps_median": med(r["copied_ms_maps"] for r in rows),
        "copied_ms_no_maps_median": med(r["copied_ms_no_maps"] for r in rows),
        "stage_ms_maps_median": med(r["stage_ms_maps"] for r in rows),
        "stage_ms_no_maps_median": med(r["stage_ms_no_maps"] for r in rows),
    }
    report["summary"] = out
    print(
        "\nstep | elems % | tensors | whole | idx+val MB | whole-tensors MB | 4K-blocks MB | remote delta MB | "
        "remote full MB | local delta s | local full s | remote delta s | remote full s | map cpu s | copy ms"
    )
    for r in rows:
        print(
            f"{r['step']:4d} | {100 * r['elements']:6.2f} | {r['tensors'][0]}/{r['tensors'][1]} | "
            f"{r['whole_tensors']} | {r['indices_values_bytes'] / 1e6:.2f} | "
            f"{r['whole_changed_tensors_bytes'] / 1e6:.1f} | {r['changed_4k_blocks_bytes'] / 1e6:.1f} | "
            f"{r['remote_delta_moved'] / 1e6:.2f} | {r['remote_full_moved'] / 1e6:.1f} | {r['local_delta_s']:.4f} | "
            f"{r['local_full_s']:.4f} | {r['remote_delta_s']:.4f} | {r['remote_full_s']:.4f} | "
            f"{r['map_cpu_s']:.3f} | {r['copied_ms_maps']:.0f}"
        )
    print(out)


if __name__ == "__main__":
    sys.exit(main())
