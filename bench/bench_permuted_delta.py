"""Delta reads of row-permuted tensors (the llama3 adapter's rotary q/k): bytes and the index map's CPU.

    python bench/bench_permuted_delta.py [--hidden 32] [--heads 4] [--kv-heads 2]

Stages two versions of a one-layer torchtitan Llama (an RL-like step: 2% of the elements past a bf16 ulp)
to a real daemon (``stager serve --change-maps bfloat16``) and reads the second by HF names into bf16
tensors from another "host" (``remote=True``): the bytes the daemon sent (its ``read_bytes``) for a delta
read from the first and for a full read, against what the delta read moved when q/k were read whole.
Then the CPU time (``time.process_time``, one thread, best of 20) of mapping a change map's flat indices
through the rotary row order (``hf_flat_indices``) for 2% and 10% of a 4096 x 4096 q_proj. Counts and CPU
time, not wall clock: they hold on a loaded machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from stager.client import StagingClient, Subscriber
from stager.client.adapters import hf_flat_indices, load_adapter, rotary_rows
from stager.client.admin import daemon_status
from stager.dev.launch import DaemonProcess


def llama(hidden: int, kv: int, vocab: int = 96, ffn: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "tok_embeddings.weight": (vocab, hidden),
        "layers.0.attention.wq.weight": (hidden, hidden),
        "layers.0.attention.wk.weight": (kv, hidden),
        "layers.0.attention.wv.weight": (kv, hidden),
        "layers.0.attention.wo.weight": (hidden, hidden),
        "layers.0.attention_norm.weight": (hidden,),
        "layers.0.ffn_norm.weight": (hidden,),
        "layers.0.feed_forward.w1.weight": (ffn, hidden),
        "layers.0.feed_forward.w2.weight": (hidden, ffn),
        "layers.0.feed_forward.w3.weight": (ffn, hidden),
        "norm.weight": (hidden,),
        "output.weight": (vocab, hidden),
    }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def rl_step(sd: dict, seed: int, frac: float = 0.02) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        n = v.clone()
        if not k.endswith("norm.weight"):
            n += torch.randn(n.shape, generator=g) * 1e-6
            n[torch.rand(n.shape, generator=g) < frac] += 0.05
        out[k] = n
    return out


def served(endpoint: str) -> int:
    return daemon_status(endpoint)["counters"]["read_bytes"]


def delta_bytes(hidden: int, heads: int, kv_heads: int) -> None:
    config = {"vocab_size": 96, "hidden_size": hidden, "intermediate_size": 48, "num_hidden_layers": 1}
    config.update(num_attention_heads=heads, num_key_value_heads=kv_heads)
    info = {"adapter": "llama3", "hf_config": config}
    sds = [llama(hidden, kv_heads * hidden // heads)]
    sds.append(rl_step(sds[0], 1))
    hf = [{k: v.bfloat16() for k, v in load_adapter("llama3", config).to_hf(sd).items()} for sd in sds]
    permuted = {k for k in hf[0] if k.endswith(("q_proj.weight", "k_proj.weight"))}
    with tempfile.TemporaryDirectory(prefix="bpd", dir="/tmp") as tmp:
        daemon = DaemonProcess(f"ipc://{tmp}/d.sock", args=("--memory-limit", "64MiB", "--change-maps", "bfloat16"))
        daemon.start()
        try:
            with (
                StagingClient(daemon.endpoint, strict=True) as c,
                Subscriber(daemon.endpoint, view="hf", remote=True) as sub,
            ):
                dst = {k: torch.empty_like(v) for k, v in hf[0].items()}
                c.stage(sds[0], step=1, model_info=info).wait(30)
                with sub.at(1) as snap:
                    snap.load_into(dst)
                c.stage(sds[1], step=2, model_info=info).wait(30)
                deadline = time.monotonic() + 60
                while not any(v["step"] == 2 and v.get("changed") for v in daemon_status(daemon.endpoint)["versions"]):
                    if time.monotonic() > deadline:
                        sys.exit("no change map for step 2 within 60 s")
                    time.sleep(0.05)  # polling for the map, not a measurement
                before = served(daemon.endpoint)
                with sub.at(2) as snap:
                    snap.load_into(dst, since=1)
                delta = served(daemon.endpoint) - before
                before = served(daemon.endpoint)
                with sub.at(2) as snap:
                    snap.load_into({k: torch.empty_like(v) for k, v in dst.items()})
                full = served(daemon.endpoint) - before
        finally:
            daemon.stop()
    assert all(torch.equal(dst[k], hf[1][k]) for k in dst), "the delta read is not the full read's"
    counts = {k: int((hf[1][k] != hf[0][k]).sum()) for k in dst}
    before = sum(counts[k] * 6 for k in dst if k not in permuted) + sum(dst[k].numel() * 2 for k in permuted)
    qk = sum(counts[k] * 6 for k in permuted), sum(dst[k].numel() * 2 for k in permuted)
    print(
        f"remote bf16 HF read of step 2: full {full} B; delta {delta} B (q/k read whole, as before: {before} B);"
        f" q/k {qk[0]} B of changes against {qk[1]} B whole"
    )


def index_map_cpu() -> None:
    torch.set_num_threads(1)
    rows = rotary_rows(4096, 32)
    for frac in (0.02, 0.10):
        n = int(4096 * 4096 * frac)
        perm = torch.randperm(4096 * 4096, generator=torch.Generator().manual_seed(0))
        idx = torch.sort(perm[:n]).values.to(torch.int32)
        best = float("inf")
        for _ in range(20):
            t0 = time.process_time()
            hf_flat_indices(idx, rows, 4096)
            best = min(best, time.process_time() - t0)
        print(
            f"hf_flat_indices, {n} indices ({frac:.0%} of a 4096 x 4096 q_proj): {best * 1e3:.2f} ms CPU, "
            f"{best / n * 1e9:.1f} ns per index (one thread, best of 20)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    a = p.parse_args()
    delta_bytes(a.hidden, a.heads, a.kv_heads)
    index_map_cpu()


if __name__ == "__main__":
    os.environ.setdefault("STAGER_LOG_LEVEL", "WARNING")
    main()
