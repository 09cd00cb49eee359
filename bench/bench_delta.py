"""Delta reads on a real RL-like run: what changes per step, and what a delta read moves and costs.

    python bench/bench_delta.py [--hidden 512] [--layers 8] [--steps 20] [--lr 1e-5] [--json PATH]

A transformers Llama (fp32 master weights, AdamW at an RL learning rate) trains on real text (the
Python documentation topics shipped with the interpreter, ``pydoc_data``, word-level tokens) and
stages every step to two real daemons (``stager serve`` processes): A computes change maps (bf16,
the default), B does not (``--change-maps none``), the order alternating per step, so the trainer's
``stage()`` and ``wait_copied()`` are measured with and without change maps in the same run.
Readers keep bf16 parameters: per step each reader updates once with ``load_into(params, since=N)``
and once in full into other tensors; the results are compared bit for bit (and with the local
reader's). Readers: ``local`` (A's shared memory), ``remote`` (frames over A's ipc socket,
``remote=True``: a remote reader without a link's cost) and ``tcp`` (frames over tcp with CURVE, as a
reader on another host reads: a third daemon T on ``tcp://127.0.0.1`` with an auth dir and bf16 change
maps, staged each step after A and B; ``--no-tcp`` leaves it out). ``--profile-step N`` runs the tcp
reader's delta read of step N under cProfile and records its top functions.

Per step: fraction of bf16 elements / bytes / tensors changed; what other encodings would move
(whole changed tensors, changed 4 KiB blocks); bytes a delta read moved (the daemon's read_bytes)
against a full read; delta and full update times; the daemon's CPU seconds for the change map
against the trainer's copy time. Goals (issue 25): bytes moved <= 1.5x the changed data (values
plus indices); a remote delta >= 5x faster than a full read when <= 5% of elements change; change
maps cost the trainer nothing (stage() and wait_copied() unchanged within noise).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import re
import statistics
import sys
import tempfile
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import curve_keys, machine, write_report  # noqa: E402
from stager.client import StagingClient, Subscriber  # noqa: E402
from stager.client.admin import daemon_status  # noqa: E402
from stager.dev.launch import DaemonProcess, free_port  # noqa: E402

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


def profiled(fn, top: int = 25) -> str:
    """``fn()`` under cProfile; its top functions by cumulative time, as text."""
    prof = cProfile.Profile()
    prof.runcall(fn)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


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
    parser.add_argument("--no-tcp", action="store_true", help="no tcp+CURVE daemon and reader")
    parser.add_argument("--profile-step", type=int, help="cProfile the tcp reader's delta read of this step")
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
    names = ("local", "remote") if args.no_tcp else ("local", "remote", "tcp")
    with contextlib.ExitStack() as stack:
        enter = stack.enter_context
        a = enter(DaemonProcess(args=(*limit, "--change-maps", "bfloat16")))
        b = enter(DaemonProcess(args=(*limit, "--change-maps", "none")))
        ca, cb = enter(StagingClient(a.endpoint, strict=True)), enter(StagingClient(b.endpoint, strict=True))
        subs = {"local": enter(Subscriber(a.endpoint)), "remote": enter(Subscriber(a.endpoint, remote=True))}
        daemon_of = {"local": a, "remote": a}
        if not args.no_tcp:
            # a reader on another host: tcp with CURVE (keys by `stager keygen`, STAGER_AUTH_DIR for the clients)
            keys = curve_keys(enter(tempfile.TemporaryDirectory(prefix="bdelta", dir="/tmp")))
            auth = ("--auth-dir", keys, "--change-maps", "bfloat16")
            t = enter(DaemonProcess(f"tcp://127.0.0.1:{free_port()}", args=(*limit, *auth)))
            ct = enter(StagingClient(t.endpoint, strict=True))
            subs["tcp"], daemon_of["tcp"] = enter(Subscriber(t.endpoint, remote=True)), t
        bf16 = {k: torch.empty(t.shape, dtype=torch.bfloat16) for k, t in sd.items()}
        readers = {
            name: ({k: t.clone() for k, t in bf16.items()}, {k: t.clone() for k, t in bf16.items()}) for name in names
        }  # (delta params, full params)
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
            if "tcp" in subs:
                ct.stage(sd, step=step).wait(120)  # not timed: the trainer's cost is A's and B's
            cast = {k: v.detach().bfloat16() for k, v in sd.items()}
            if prev_cast is not None:
                row.update(alternatives(prev_cast, cast))
                t0 = time.monotonic()
                changed = wait_for(lambda: (status_of(a.endpoint, step) or {}).get("changed"))["bf16"]
                row["map_wait_s"] = round(time.monotonic() - t0, 3)
                if "tcp" in subs:
                    wait_for(lambda: (status_of(t.endpoint, step) or {}).get("changed"))
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
                daemon = daemon_of[name]
                with sub.at(step) as snap:
                    reads = {
                        "delta": lambda: snap.load_into(delta_dst, since=step - 1 if step > 1 else None),
                        "full": lambda: snap.load_into(full_dst),
                    }
                    if name == "tcp" and step == args.profile_step:
                        # this step's delta read itself under cProfile (a second read would find the
                        # destination rewritten, unproven by the load ledger: checksummed, not this read)
                        delta, reads["delta"] = reads["delta"], lambda: report.update(tcp_delta_profile=profiled(delta))
                        row["tcp_profiled"] = True  # its times carry the profiler's cost: not in the medians
                    for kind, read in reads.items():
                        before = read_bytes(daemon.endpoint)
                        wall, cpu, daemon_cpu = measured(read, daemon.pid)
                        row[f"{name}_{kind}_moved"] = read_bytes(daemon.endpoint) - before
                        row[f"{name}_{kind}_s"] = round(wall, 4)
                        row[f"{name}_{kind}_cpu_s"] = round(cpu, 4)  # the reader's (this process's)
                        row[f"{name}_{kind}_daemon_cpu_s"] = round(daemon_cpu, 4)
                exact = all(torch.equal(delta_dst[k], full_dst[k]) for k in sd)
                exact = exact and all(torch.equal(delta_dst[k], readers["local"][1][k]) for k in sd)
                row[f"{name}_exact"] = exact
                if not exact:
                    print(f"step {step}: {name} delta read differs from the full (or the local) read", file=sys.stderr)
            row["daemon_cpu_s"] = daemon_status(a.endpoint)["cpu_seconds"]
            if "tcp" in subs:
                row["tcp_daemon_cpu_s"] = daemon_status(t.endpoint)["cpu_seconds"]
            report["steps"].append(row)
            print({k: row[k] for k in row if not k.startswith("stage_ms")}, file=sys.stderr)
        report["daemon_changes"] = daemon_status(a.endpoint)["changes"]
    report["readers"] = list(names)
    summarize(report)
    write_report(args.json, report)
    return 0 if all(r[f"{n}_exact"] for r in report["steps"] for n in report["readers"]) else 1


def summarize(report: dict) -> None:
    rows = [r for r in report["steps"] if "elements" in r]
    med = statistics.median
    out: dict = {
        "elements_changed_median": med(r["elements"] for r in rows),
        "elements_changed_range": [min(r["elements"] for r in rows), max(r["elements"] for r in rows)],
        "remote_delta_vs_changed_data": med(r["remote_delta_moved"] / max(1, r["indices_values_bytes"]) for r in rows),
        "map_cpu_s_median": med(r["map_cpu_s"] for r in rows),
        "copied_ms_maps_median": med(r["copied_ms_maps"] for r in rows),
        "copied_ms_no_maps_median": med(r["copied_ms_no_maps"] for r in rows),
        "stage_ms_maps_median": med(r["stage_ms_maps"] for r in rows),
        "stage_ms_no_maps_median": med(r["stage_ms_no_maps"] for r in rows),
    }
    for name in report["readers"]:
        # the in-run ratio per step, then its median: each step's pair ran back to back under the same load
        rows = [r for r in report["steps"] if "elements" in r and not r.get(f"{name}_profiled")]
        out[f"{name}_full_over_delta_time"] = med(r[f"{name}_full_s"] / r[f"{name}_delta_s"] for r in rows)
        out[f"{name}_full_over_delta_cpu"] = med(
            (r[f"{name}_full_cpu_s"] + r[f"{name}_full_daemon_cpu_s"])
            / max(1e-9, r[f"{name}_delta_cpu_s"] + r[f"{name}_delta_daemon_cpu_s"])
            for r in rows
        )  # reader + daemon CPU seconds: what load does not distort
        for kind in ("delta", "full"):
            out[f"{name}_{kind}_median"] = {
                m: med(r[f"{name}_{kind}_{m}"] for r in rows) for m in ("s", "moved", "cpu_s", "daemon_cpu_s")
            }
    report["summary"] = out
    print(
        "\nstep | elems % | tensors | whole | idx+val MB | whole-tensors MB | 4K-blocks MB | delta MB | full MB | "
        + " | ".join(f"{n} delta s | {n} full s" for n in report["readers"])
        + " | map cpu s | copy ms"
    )
    for r in [r for r in report["steps"] if "elements" in r]:
        times = " | ".join(f"{r[f'{n}_delta_s']:.4f} | {r[f'{n}_full_s']:.4f}" for n in report["readers"])
        print(
            f"{r['step']:4d} | {100 * r['elements']:6.2f} | {r['tensors'][0]}/{r['tensors'][1]} | "
            f"{r['whole_tensors']} | {r['indices_values_bytes'] / 1e6:.2f} | "
            f"{r['whole_changed_tensors_bytes'] / 1e6:.1f} | {r['changed_4k_blocks_bytes'] / 1e6:.1f} | "
            f"{r['remote_delta_moved'] / 1e6:.2f} | {r['remote_full_moved'] / 1e6:.1f} | {times} | "
            f"{r['map_cpu_s']:.3f} | {r['copied_ms_maps']:.0f}"
        )
    print(
        "\nreader (median per step) | delta s | full s | full/delta time | full/delta CPU | delta MB | full MB | "
        "delta CPU reader/daemon s | full CPU reader/daemon s"
    )
    labels = {"local": "local (shm)", "remote": "remote, no link cost (ipc frames)", "tcp": "remote over tcp+CURVE"}
    for n in report["readers"]:
        d, f = out[f"{n}_delta_median"], out[f"{n}_full_median"]
        print(
            f"{labels[n]} | {d['s']:.4f} | {f['s']:.4f} | {out[f'{n}_full_over_delta_time']:.2f}x | "
            f"{out[f'{n}_full_over_delta_cpu']:.2f}x | {d['moved'] / 1e6:.2f} | {f['moved'] / 1e6:.1f} | "
            f"{d['cpu_s']:.4f}/{d['daemon_cpu_s']:.4f} | {f['cpu_s']:.4f}/{f['daemon_cpu_s']:.4f}"
        )
    print(out)
    if "tcp_delta_profile" in report:
        print(report["tcp_delta_profile"])


if __name__ == "__main__":
    sys.exit(main())
