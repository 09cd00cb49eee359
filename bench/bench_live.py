"""Live-weights benchmark: subscribers against their anchors, in one run.

    python bench/bench_live.py [--size-gib 1.0] [--json PATH]

(a) a same-host subscriber loads each new version's HF view (llama3 adapter) into its own
    tensors (``snap.load_into(params)``: renames copied, rotary rows permuted straight into the
    destination), woken by announcements;
    anchor: the same copies from private memory (a bare memcpy of the same bytes);
(b) a reader over tcp://127.0.0.1 (``remote=True``, CURVE-authenticated with keys from
    ``stager keygen`` as every tcp daemon requires) receives the whole native view tensor by
    tensor; anchor: raw ZeroMQ PUSH/PULL of the same bytes in 64 MiB zero-copy frames, CURVE-encrypted
    with the same keys;
(c) the trainer's ``stage()`` call and its copy (``wait_copied``) with no subscriber, with 4
    subscriber processes loading every whole version, and with 4 loading one tensor-parallel
    shard each (an inference engine's 4 TP ranks);
(d) a remote reader asking for one tensor-parallel shard (1 of 4) of every HF tensor: bytes
    moved and time, against the whole view.
Targets: (a) >= 0.7x memcpy throughput; (b) >= 0.8x raw ZeroMQ; (c) stage() at most 10% slower.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_persist import HF_CONFIG, native_state  # noqa: E402
from common import curve_keys, machine, write_report  # noqa: E402
from stager.dev.launch import DaemonProcess, free_port  # noqa: E402

INFO = {"adapter": "llama3", "hf_config": HF_CONFIG}
GB = 1e9


def _load_loop(endpoint: str, versions: int, queue, view: str = "hf", tp_rank: int | None = None) -> None:
    """Subscriber process: load every new version (or, as tensor-parallel rank ``tp_rank`` of 4,
    its dimension-0 shard of every tensor) into private tensors; report seconds per version."""
    from stager.client import Subscriber

    torch.set_num_threads(1)
    dst: dict[str, torch.Tensor] = {}
    times = []
    with Subscriber(endpoint, view=view) as sub:
        queue.put("ready")
        for snap in sub:
            if not dst and tp_rank is None:  # an engine's parameters exist before it loads weights
                dst = {name: torch.empty(shape, dtype=dtype).fill_(0) for name, dtype, shape in snap.specs()}
            t0 = time.perf_counter()
            if tp_rank is None:  # into the engine's own tensors: no intermediate per tensor
                snap.load_into(dst)
            else:
                for name in snap:
                    t = snap.get(name, shard=(0, tp_rank, 4))
                    out = dst.get(name)
                    if out is None:
                        out = dst[name] = torch.empty_like(t).fill_(0)  # pre-faulted, like model parameters
                    out.copy_(t)
            times.append((snap.step, time.perf_counter() - t0, snap.skipped))
            if snap.step >= versions:
                break
    anchor = []
    if view == "hf" and tp_rank is None:  # the same copies from private memory
        src = {n: t.clone() for n, t in dst.items()}
        for _ in range(3):
            t0 = time.perf_counter()
            for n, t in src.items():
                dst[n].copy_(t)
            anchor.append(time.perf_counter() - t0)
    queue.put({"times": times, "anchor": anchor, "bytes": sum(t.numel() * t.element_size() for t in dst.values())})


def _remote_reader(endpoint: str, queue, shard: bool) -> None:
    from stager.client import Subscriber

    torch.set_num_threads(1)
    with Subscriber(endpoint, view="hf" if shard else "native", remote=True, timeout=120) as sub:
        runs = []
        for _ in range(3):
            with sub.latest() as snap:
                t0, nbytes = time.perf_counter(), 0
                if shard:  # every dimension 0 here divides by 4
                    for name in snap:
                        t = snap.get(name, shard=(0, 1, 4))
                        nbytes += t.numel() * t.element_size()
                else:
                    for _, t in snap.items():
                        nbytes += t.numel() * t.element_size()
                runs.append((time.perf_counter() - t0, nbytes))
    queue.put(runs)


def _zmq_sender(endpoint: str, total: int, keys: str) -> None:
    import zmq
    from zmq.auth import load_certificate

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.curve_serverkey = load_certificate(os.path.join(keys, "server.key"))[0]
    sock.curve_publickey, sock.curve_secretkey = load_certificate(os.path.join(keys, "client.key_secret"))
    sock.connect(endpoint)
    frame = bytearray(64 << 20)
    for _ in range(3):
        sent = 0
        while sent < total:
            n = min(len(frame), total - sent)
            sock.send(memoryview(frame)[:n], copy=False)
            sent += n
    sock.close(linger=-1)
    ctx.term()  # waits until every zero-copy frame is sent: only then may `frame` be freed


def _raw_zmq(total: int, keys: str) -> float:
    """Bytes per second received over CURVE (as the daemon's tcp socket), timed from the first frame
    (connection setup excluded)."""
    import zmq
    from zmq.auth import load_certificate

    ctx = mp.get_context("spawn")
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.curve_publickey, pull.curve_secretkey = load_certificate(os.path.join(keys, "server.key_secret"))
    pull.curve_server = True
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    sender = ctx.Process(target=_zmq_sender, args=(f"tcp://127.0.0.1:{port}", total, keys))
    sender.start()
    first = len(pull.recv(copy=False).buffer)
    t0, got = time.perf_counter(), first
    while got < 3 * total:
        got += len(pull.recv(copy=False).buffer)
    rate = (got - first) / (time.perf_counter() - t0)
    sender.join()
    pull.close()
    return rate


def _stage_loop(endpoint: str, sd: dict, steps: range) -> dict:
    from stager.client import StagingClient

    calls, copies = [], []
    with StagingClient(endpoint, strict=True) as client:
        for step in steps:
            time.sleep(0.3)  # forward/backward: readers load meanwhile
            t0 = time.perf_counter()
            handle = client.stage(sd, step=step, model_info=INFO)
            t1 = time.perf_counter()
            handle.wait_copied()
            t2 = time.perf_counter()
            handle.wait(120)
            calls.append(t1 - t0)
            copies.append(t2 - t1)
    return {"stage_call_ms": [c * 1e3 for c in calls[3:]], "copy_ms": [c * 1e3 for c in copies[3:]]}


def _phase(label: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {label}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    report: dict = machine()
    sd = native_state(args.size_gib)
    total = sum(t.numel() * 4 for t in sd.values())
    report.update(snapshot_bytes=total, tensors=len(sd))
    limit = ("--memory-limit", str(int(4 * total)), "--keep", "2")

    _phase("(a) same-host subscriber")
    # (a) same-host HF view vs memcpy; the first 3 versions warm the segment pool's mappings
    versions = 8
    with DaemonProcess(args=limit) as daemon:
        q = ctx.Queue()
        reader = ctx.Process(target=_load_loop, args=(daemon.endpoint, versions, q))
        reader.start()
        assert q.get(timeout=120) == "ready"
        _stage_loop(daemon.endpoint, sd, range(1, versions + 1))
        local = q.get(timeout=600)
        reader.join()
    warm = [t for step, t, _ in local["times"] if step > 4]
    report["a_hf_view_load_s"] = warm
    report["a_first_load_s"] = local["times"][0][1]
    report["a_first_versions_s"] = [t for _, t, _ in local["times"][:3]]  # each maps a new pool segment
    report["a_memcpy_s"] = local["anchor"]
    report["a_bytes"] = local["bytes"]
    report["a_skipped"] = sum(s for _, _, s in local["times"])

    _phase("(b, d) remote readers")
    # (b) tcp reader vs raw ZeroMQ; (d) sliced remote reads. A tcp daemon requires CURVE keys: made by
    # `stager keygen` in a temporary directory; this process and the spawned readers read them from
    # STAGER_AUTH_DIR, as clients on other hosts do.
    keys_tmp = tempfile.mkdtemp(prefix="stager-keys-")
    keys = curve_keys(keys_tmp)
    try:
        port = free_port()
        with DaemonProcess(f"tcp://127.0.0.1:{port}", args=limit + ("--auth-dir", keys)) as daemon:
            from stager.client import StagingClient
            from stager.client.admin import daemon_status

            with StagingClient(daemon.endpoint, strict=True) as c:
                c.stage(sd, step=1, model_info=INFO).wait(300)
            for key, shard in (("b_tcp", False), ("d_sliced", True)):
                q = ctx.Queue()
                p = ctx.Process(target=_remote_reader, args=(daemon.endpoint, q, shard))
                p.start()
                report[key] = q.get(timeout=900)
                p.join()
            # what the daemon sent for (b) and (d), all runs
            report["daemon_read_bytes"] = daemon_status(daemon.endpoint, 10)["counters"]["read_bytes"]
        _phase("(b) raw ZeroMQ anchor")
        report["b_raw_zmq_bytes_per_s"] = _raw_zmq(total, keys)
    finally:
        del os.environ["STAGER_AUTH_DIR"]
        shutil.rmtree(keys_tmp, ignore_errors=True)

    # (c) stage() with no subscriber, 4 loading every whole version, 4 tensor-parallel ranks loading their shard
    for n, case in ((0, "c_0_subscribers"), (4, "c_4_subscribers"), (4, "c_4_tp_subscribers")):
        _phase(f"(c) {case}")
        with DaemonProcess(args=("--memory-limit", str(int(8 * total)), "--keep", "2")) as daemon:
            q = ctx.Queue()
            tp = case == "c_4_tp_subscribers"
            readers = [
                ctx.Process(target=_load_loop, args=(daemon.endpoint, 10, q, "native", r if tp else None))
                for r in range(n)
            ]
            for r in readers:
                r.start()
            for _ in readers:
                assert q.get(timeout=120) == "ready"
            report[case] = _stage_loop(daemon.endpoint, sd, range(1, 11))
            for _ in readers:
                report.setdefault(case + "_reader_loads", []).append(q.get(timeout=600)["times"])
            for r in readers:
                r.join()

    med = statistics.median
    a_ratio = med(report["a_memcpy_s"]) / med(warm)
    first_ratio = max(report["a_first_versions_s"]) / med(warm)
    b_ours = med(t for t, _ in report["b_tcp"])
    b_bytes = report["b_tcp"][0][1]
    b_ratio = (b_bytes / b_ours) / report["b_raw_zmq_bytes_per_s"]
    c0, c4, ctp = report["c_0_subscribers"], report["c_4_subscribers"], report["c_4_tp_subscribers"]
    c_ratio = med(c4["stage_call_ms"]) / med(c0["stage_call_ms"])
    tp_ratio = med(ctp["stage_call_ms"]) / med(c0["stage_call_ms"])

    def staged_ms(c):  # what the trainer waits for: the call, then the copy out of its tensors
        return med(a + b for a, b in zip(c["stage_call_ms"], c["copy_ms"]))

    d_time, d_bytes = med(t for t, _ in report["d_sliced"]), report["d_sliced"][0][1]
    d_moved = (report["daemon_read_bytes"] - 3 * b_bytes) / 3  # per sliced run, as the daemon counted
    report["targets"] = {
        "a_subscriber_vs_memcpy": {"ratio": a_ratio, "limit": 0.7, "met": a_ratio >= 0.7},
        "a_first_version_vs_later": {"ratio": first_ratio, "limit": 2.0, "met": first_ratio <= 2.0},
        "b_tcp_vs_raw_zmq": {"ratio": b_ratio, "limit": 0.8, "met": b_ratio >= 0.8},
        "c_stage_call_4_subscribers_vs_none": {"ratio": c_ratio, "limit": 1.1, "met": c_ratio <= 1.1},
        "c_stage_call_4_tp_subscribers_vs_none": {"ratio": tp_ratio, "limit": 1.1, "met": tp_ratio <= 1.1},
        "c_call_and_copy_4_subscribers_vs_none": {"ratio": staged_ms(c4) / staged_ms(c0)},
        "c_call_and_copy_4_tp_subscribers_vs_none": {"ratio": staged_ms(ctp) / staged_ms(c0)},
        "d_sliced_bytes_fraction": {"received": d_bytes / b_bytes, "moved": d_moved / b_bytes},
    }
    print(f"snapshot {total / 2**30:.2f} GiB fp32, {len(sd)} tensors; HF view via llama3 adapter")
    print(
        f"  (a) same-host HF load   {', '.join(f'{t:.3f}' for t in warm)} s = "
        f"{report['a_bytes'] / med(warm) / GB:.1f} GB/s"
        f" (first three versions, new mappings: {', '.join(f'{t:.3f}' for t in report['a_first_versions_s'])} s"
        f" -> {first_ratio:.2f}x a later one, target <= 2x)"
    )
    print(
        f"      memcpy anchor       {', '.join(f'{t:.3f}' for t in report['a_memcpy_s'])} s -> ratio {a_ratio:.2f}x "
        f"(target >= 0.7x)"
    )
    print(
        f"  (b) tcp reader          {', '.join(f'{t:.2f}' for t, _ in report['b_tcp'])} s = "
        f"{b_bytes / b_ours / GB:.2f} GB/s"
    )
    print(
        f"      raw ZeroMQ          {report['b_raw_zmq_bytes_per_s'] / GB:.2f} GB/s -> ratio {b_ratio:.2f}x "
        "(target >= 0.8x)"
    )
    print(
        f"  (c) stage() call        none {med(c0['stage_call_ms']):.3f} ms; 4 whole-model readers "
        f"{med(c4['stage_call_ms']):.3f} ms ({c_ratio:.2f}x); 4 TP-shard readers {med(ctp['stage_call_ms']):.3f} ms "
        f"({tp_ratio:.2f}x) (target <= 1.1x)"
    )
    print(
        f"      call + copy         none {staged_ms(c0):.1f} ms; 4 whole-model readers {staged_ms(c4):.1f} ms "
        f"({staged_ms(c4) / staged_ms(c0):.2f}x); 4 TP-shard readers {staged_ms(ctp):.1f} ms "
        f"({staged_ms(ctp) / staged_ms(c0):.2f}x)"
    )
    print(
        f"  (d) 1-of-4 TP shards    {d_bytes / 2**20:.0f} MiB received, {d_moved / 2**20:.0f} MiB sent by the daemon "
        f"({d_moved / b_bytes:.1%} of the view; permuted q/k are fetched whole) in {d_time:.2f} s "
        f"vs {b_ours:.2f} s for all"
    )
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
