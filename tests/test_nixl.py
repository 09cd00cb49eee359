"""Cross-node bytes over NIXL (UCX): real daemons served with ``--transport nixl``, simulated nodes
on one host (own host ids), with UCX's default transports (same host: cma) and with
``UCX_TLS=tcp`` (the path two hosts without RDMA take). Skipped where NIXL is not installed."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from dist_jobs import full_tensors, multi_node_stage, scaled
from helpers import wait_until
from stager.client import StagingClient, Subscriber
from stager.client.admin import daemon_status
from stager.client.connection import Connection
from stager.client.readers import nixl_agents, nixl_source
from stager.client.readers.job_reader import JobReader
from stager.client.readers.nixl_source import NixlSource, nixl_installed, nixl_stats
from stager.client.readers.sources import SegmentMaps, open_source
from stager.daemon.segments import list_segments
from stager.dev.launch import DaemonProcess, SimulatedCluster, run_ranks
from stager.protocol import Acquire, Box, ErrorCode, NixlInfo, NixlInfoReply, NodeDown, Release, StagerError

pytestmark = pytest.mark.skipif(not nixl_installed(), reason="NIXL is not installed (pip install nixl-cu12==1.5.1)")
LIMIT = ("--memory-limit", "256MiB")
NIXL = ("--transport", "nixl")


@pytest.fixture(params=["default", "tcp"])
def ucx(request, monkeypatch):
    """UCX's own choice (cma on one host), or tcp: the daemons started in the test inherit it."""
    if request.param == "tcp":
        monkeypatch.setenv("UCX_TLS", "tcp")
    return request.param


def _moved(before: dict) -> dict:
    """Bytes each transport moved into this process since ``before`` (a copy of ``STATS``)."""
    return {k: nixl_source.STATS[k] - before.get(k, 0) for k in ("nixl", "frames", "nixl_retried_as_frames")}


def _nixl_source(endpoint: str):
    """A lease on the newest version and the NIXL source of it: (connection, source, lease reply)."""
    conn = Connection(endpoint, role="reader")
    reply = conn.request(Acquire(), 10)
    src = open_source(
        conn,
        reply.lease,
        reply.segment,
        reply.size,
        reply.tensors,
        remote=True,
        maps=SegmentMaps(),
        timeout=10,
        transport="nixl",
    )
    assert isinstance(src, NixlSource)
    return conn, src, reply


def test_a_lease_is_needed_for_descriptors_and_a_frames_daemon_refuses(make_daemon):
    d = make_daemon(transport="nixl", keep=1)
    frames_only = make_daemon()
    w = torch.randn(64, 32)
    for daemon in (d, frames_only):
        with StagingClient(daemon.endpoint, rank=0, local_world_size=1, world_size=1) as c:
            c.stage({"w": w}, step=1).wait(10)
    conn = Connection(d.endpoint, role="reader")
    with pytest.raises(StagerError) as info:
        conn.request(NixlInfo(lease=12345), 5)
    assert info.value.code == ErrorCode.UNKNOWN_LEASE and "acquire the version first" in info.value.message
    lease = conn.request(Acquire(), 5).lease
    reply = conn.request(NixlInfo(lease=lease), 5)
    assert isinstance(reply, NixlInfoReply) and reply.size >= w.numel() * 4 and reply.metadata
    other = Connection(d.endpoint, role="reader")  # another connection does not hold that lease
    with pytest.raises(StagerError) as info:
        other.request(NixlInfo(lease=lease), 5)
    assert info.value.code == ErrorCode.UNKNOWN_LEASE
    status = d.status()
    assert status["transport"]["mode"] == "nixl" and status["transport"]["registered_bytes"] == status["memory"]["used"]
    assert status["counters"]["nixl_granted_bytes"] == w.numel() * 4
    conn.request(Release(lease=lease), 5)
    plain = Connection(frames_only.endpoint, role="reader")
    lease = plain.request(Acquire(), 5).lease
    with pytest.raises(StagerError) as info:
        plain.request(NixlInfo(lease=lease), 5)
    assert info.value.code == ErrorCode.UNSUPPORTED and "--transport nixl" in info.value.message
    assert frames_only.status()["transport"] == {"mode": "frames"}
    for c in (conn, other, plain):
        c.close()
    # a frames daemon: "auto" reads frames, "nixl" says why it cannot
    before = dict(nixl_source.STATS)
    with Subscriber(frames_only.endpoint, remote=True) as sub, sub.latest() as snap:
        assert torch.equal(snap["w"], w)
    assert _moved(before) == {"nixl": 0, "frames": w.numel() * 4, "nixl_retried_as_frames": 0}  # reader side
    with Subscriber(frames_only.endpoint, remote=True, transport="nixl") as sub:
        with pytest.raises(StagerError) as info:
            sub.latest()
        assert info.value.code == ErrorCode.UNSUPPORTED and "does not serve NIXL" in info.value.message
    with pytest.raises(ValueError, match="transport must be one of"):
        Subscriber(frames_only.endpoint, transport="rdma")


def test_segments_are_registered_at_creation_off_the_loop_and_pooled_ones_stay_registered(make_daemon):
    d = make_daemon(transport="nixl", keep=1)
    w = torch.randn(128, 64)
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        c.stage({"w": w}, step=1).wait(10)
        status = d.status()
        transport = status["transport"]
        # registered before any grant, each segment by the thread that created it (never the socket loop)
        assert transport["grants"] == 0 and transport["registered_segments"] >= 1
        assert transport["registered_bytes"] == status["memory"]["used"]
        assert transport["registrations"] == {"stager-segments": transport["registered_segments"]}
        for step in (2, 3):  # the rotation (keep + 1 segments) fills up
            c.stage({"w": w + step}, step=step).wait(10)
        made = d.status()["transport"]["registrations"]
        for step in range(4, 9):  # pooled segments reused, each version read over NIXL (a grant each)
            c.stage({"w": w + step}, step=step).wait(10)
            with Subscriber(d.endpoint, remote=True, transport="nixl") as sub, sub.latest() as snap:
                assert torch.equal(snap["w"], w + step)
        status = d.status()
        transport = status["transport"]
        assert transport["grants"] == 5
        assert transport["registrations"] == made  # one registration per segment, kept while it is pooled
        assert transport["registered_segments"] == sum(made.values())  # none was freed
        assert transport["registered_bytes"] == status["memory"]["used"] and transport["registration_failures"] == 0


def test_remote_reads_on_one_daemon_are_bit_exact_and_registrations_end_with_their_segments(make_daemon):
    d = make_daemon(transport="nixl", keep=1)
    tensors = {
        "w": torch.randn(300, 70),
        "h": torch.arange(1000, dtype=torch.int64),
        "b": torch.randn(5, 3, 4).to(torch.bfloat16),
        "s": torch.tensor(2.5),
    }
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        for step in (1, 2, 3):
            c.stage({k: v + step for k, v in tensors.items()}, step=step).wait(10)
            before = dict(nixl_source.STATS)
            with Subscriber(d.endpoint, remote=True, transport="nixl") as sub, sub.latest() as snap:
                for k, v in tensors.items():
                    assert torch.equal(snap[k], v + step), k
                # a destination given (registered once)
                out = torch.empty(300, 70)
                snap.load_into({"w": out})
                assert torch.equal(out, tensors["w"] + step)
            moved = _moved(before)
            assert moved["nixl"] > 0 and moved["frames"] == moved["nixl_retried_as_frames"] == 0
            conn, src, _ = _nixl_source(d.endpoint)
            inner = torch.full((2, 5), -1.0)  # a strided box: one descriptor per row
            src.fetch("w", Box((7, 3), (2, 5)), inner).wait()
            assert torch.equal(inner, (tensors["w"] + step)[7:9, 3:8])
            src.close()
            conn.close()
        registered = d.status()["transport"]["registered_segments"]
        assert registered >= 1
        for step in (4, 5, 6):  # another layout: the pooled segments of the old one are unlinked
            c.stage({"other": torch.randn(10, 10)}, step=step).wait(10)
    status = d.status()
    # the old layout's segments are gone, their registrations with them: what stays registered is the new one's
    assert status["transport"]["registered_bytes"] == status["memory"]["used"] < tensors["w"].numel() * 4
    assert status["leases"] == 0


def test_destination_registrations_stay_bounded_and_strided_boxes_read_exact(make_daemon, monkeypatch):
    d = make_daemon(transport="nixl")
    cube = torch.randn(6, 5, 4)
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        c.stage({"cube": cube}, step=1).wait(10)
    monkeypatch.setattr(nixl_agents, "MAX_REGISTERED_BYTES", 2 * cube.numel() * 4)
    conn, src, _ = _nixl_source(d.endpoint)
    with Subscriber(d.endpoint, remote=True, transport="nixl") as sub, sub.latest() as snap:
        for offset, shape in (
            ((1, 1, 0), (2, 3, 4)),
            ((0, 2, 1), (6, 2, 2)),
            ((5, 0, 0), (1, 5, 4)),
            ((2, 4, 3), (1, 1, 1)),
        ):
            want = cube[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
            assert torch.equal(src.fetch("cube", Box(offset, shape)).wait(), want), offset
        outs = [torch.empty(6, 5, 4) for _ in range(5)]  # each a storage of its own, registered once
        for out in outs:
            snap.load_into({"cube": out})
            assert torch.equal(out, cube)
        stats = nixl_stats()
        assert stats["registered_bytes"] <= nixl_agents.MAX_REGISTERED_BYTES and stats["registered"] <= 2
        assert stats["busy"] == stats["in_flight"] == 0  # no READ left marked in flight
    src.close()
    conn.close()


def test_a_read_nixl_will_not_start_is_retried_as_frames_once_and_counted(make_daemon):
    d = make_daemon(transport="nixl")
    w = torch.randn(40, 8)
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        c.stage({"w": w}, step=1).wait(10)
    conn, src, reply = _nixl_source(d.endpoint)
    g = src.grant  # a grant for memory the daemon never registered: NIXL refuses to start the READ
    off = NixlSource(
        src.agent,
        src.remote,
        NixlInfoReply(agent=g.agent, metadata=g.metadata, addr=g.addr + (1 << 40), size=g.size, device=g.device),
        src.frames,
        reply.tensors,
        10,
    )
    before = dict(nixl_source.STATS)
    assert torch.equal(off.fetch("w", Box((0, 0), (40, 8))).wait(), w)
    assert _moved(before) == {"nixl": 0, "frames": w.numel() * 4, "nixl_retried_as_frames": 1}
    src.close()
    conn.close()


def test_two_nodes_uneven_shards_read_bit_exact_over_nixl(ucx):
    with SimulatedCluster(2, args=LIMIT + NIXL) as cluster:
        # rank 0 also reads the newest through its own node: node-1's regions come over NIXL
        run_ranks(multi_node_stage, 4, [1, 2], nodes=cluster.nodes)
        expected = {f"model.{k}": v for k, v in scaled(full_tensors(), 2).items()}
        for endpoint in cluster.endpoints:  # this process is on neither node
            before = dict(nixl_source.STATS)
            with Subscriber(endpoint, transport="nixl") as sub, sub.latest() as snap:
                assert all(torch.equal(snap[k], v) for k, v in expected.items())
                for name, dim in (("model.fsdp_uneven", 0), ("model.two_d", 1)):
                    for rank in range(3):
                        want = torch.chunk(expected[name], 3, dim)[rank]
                        assert torch.equal(snap.get(name, shard=(dim, rank, 3)), want), (name, rank)
            moved = _moved(before)  # every byte over NIXL, from both nodes (this process is on neither)
            assert moved["nixl"] > 0 and moved["frames"] == 0
        for endpoint in cluster.endpoints:
            status = daemon_status(endpoint)
            assert status["transport"]["mode"] == "nixl" and status["transport"]["grants"] >= 1
            assert status["leases"] == 0


def test_nixl_on_one_node_only_reads_the_other_as_frames():
    nodes = [
        DaemonProcess(args=LIMIT + NIXL, env={"STAGER_HOST_ID": "node-0"}),
        DaemonProcess(args=LIMIT, env={"STAGER_HOST_ID": "node-1"}),
    ]
    cluster = SimulatedCluster(0)
    cluster.daemons = nodes
    with cluster:
        run_ranks(multi_node_stage, 4, [1], nodes=cluster.nodes)
        expected = {f"model.{k}": v for k, v in scaled(full_tensors(), 1).items()}
        grants = daemon_status(cluster.endpoints[0])["transport"]["grants"]
        before = dict(nixl_source.STATS)
        with Subscriber(cluster.endpoints[1]) as sub, sub.latest() as snap:
            assert all(torch.equal(snap[k], v) for k, v in expected.items())
        moved = _moved(before)  # node-0's regions over NIXL (granted), node-1's as frames
        assert moved["nixl"] > 0 and moved["frames"] > 0 and moved["nixl_retried_as_frames"] == 0
        assert daemon_status(cluster.endpoints[0])["transport"]["grants"] == grants + 1
        assert daemon_status(cluster.endpoints[1])["transport"] == {"mode": "frames"}


READER = """
import sys, torch
from stager.client import Subscriber
with Subscriber(sys.argv[1], remote=True, transport="nixl") as sub:
    snap = sub.latest()
    print("reading", flush=True)
    while True:
        snap["w"]
"""


def test_a_reader_killed_mid_transfer_loses_its_lease_and_no_segment_leaks(ucx, tmp_path):
    with DaemonProcess(args=LIMIT + NIXL + ("--keep", "1")) as d:
        w = torch.randn(8 << 20)  # 32 MiB: every read is several READs in flight
        with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
            c.stage({"w": w}, step=1).wait(30)
            reader = subprocess.Popen([sys.executable, "-c", READER, d.endpoint], stdout=subprocess.PIPE, text=True)
            try:
                assert reader.stdout.readline().strip() == "reading"
                wait_until(lambda: daemon_status(d.endpoint)["transport"]["grants"] >= 1, 30)
                reader.send_signal(signal.SIGKILL)
                reader.wait(30)
            finally:
                reader.kill()
            wait_until(lambda: daemon_status(d.endpoint)["leases"] == 0, 60)
            for step in (2, 3):  # the version it leased is freed or reused like any other
                c.stage({"w": w + step}, step=step).wait(30)
        status = daemon_status(d.endpoint)
        live = list_segments(d.pid)
        assert [v["step"] for v in status["versions"] if v["state"] == "sealed"] == [3]
        assert status["transport"]["registered_segments"] <= len(live) <= 2  # the sealed one, and a pooled one
        with Subscriber(d.endpoint, remote=True, transport="nixl") as sub, sub.latest() as snap:
            assert torch.equal(snap["w"], w + 3)


def test_a_node_that_stops_mid_read_gives_node_down_within_the_timeout(monkeypatch):
    monkeypatch.setenv("UCX_TLS", "tcp")  # over cma a stopped process's memory stays readable: tcp needs its side
    with SimulatedCluster(2, args=LIMIT + NIXL) as cluster:
        run_ranks(multi_node_stage, 4, [1], nodes=cluster.nodes)
        before = nixl_stats()
        sub = Subscriber(cluster.endpoints[0], transport="nixl", timeout=5)
        snap = sub.latest()
        os.kill(cluster.daemons[1].pid, signal.SIGSTOP)  # node-1 hangs with the version leased
        try:
            with pytest.raises(NodeDown) as info:
                for name in snap:
                    snap[name]  # node-1's regions: its READs never complete
            assert info.value.node == "node-1" and info.value.code == ErrorCode.NODE_DOWN
            # the READ that timed out may still land: its destination is kept (dropped, not freed)
            assert nixl_stats()["dropped"] >= 1
        finally:
            os.kill(cluster.daemons[1].pid, signal.SIGCONT)
        snap.release()  # waits for the READs still in flight (node-0's too) before the leases go
        assert _settled(nixl_stats(), before)
        sub.close()


def _settled(stats: dict, before: dict) -> bool:
    """No READ in flight or dropped, no cached destination busy, one-read registrations as before."""
    return stats["in_flight"] == stats["dropped"] == stats["busy"] == 0 and stats["once"] == before["once"]


def test_reads_stopped_early_end_before_their_lease_is_released(make_daemon):
    d = make_daemon(transport="nixl")
    tensors = {f"t{i}": torch.randn(1 << 18) for i in range(12)}  # 1 MiB each: several READs in flight
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        c.stage(tensors, step=1).wait(10)
    before = nixl_stats()
    with Subscriber(d.endpoint, remote=True, transport="nixl") as sub:
        for _ in range(3):
            with sub.latest() as snap:
                for name, t in snap.items():
                    assert torch.equal(t, tensors[name])
                    break  # the next tensors' READs were started
            assert _settled(nixl_stats(), before)
    # a stream into destinations (cached registrations), closed after its first tensor
    reader = JobReader(d.endpoint, 10, remote=True, transport="nixl")
    try:
        outs = {k: torch.empty_like(v) for k, v in tensors.items()}
        version = reader.acquire(None)
        stream = version.stream(list(outs), outs)
        name, t = next(stream)
        assert t is outs[name] and torch.equal(t, tensors[name])
        stream.close()
        version.close()
        stats = nixl_stats()
        assert _settled(stats, before) and stats["registered"] >= 1  # kept (cached), none busy: the cap holds
    finally:
        reader.close()


def test_load_into_destinations_of_another_dtype_is_cast_never_raw_bytes(make_daemon, monkeypatch):
    d = make_daemon(transport="nixl")
    w, v, big = torch.randn(64, 32), torch.randn(64, 32), torch.randn(512, 512)
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        c.stage({"w": w, "v": v, "big": big}, step=1).wait(10)
    flat = torch.zeros(3 * w.numel(), dtype=torch.bfloat16)  # parameters side by side in one buffer (vLLM, FSDP)
    out_w, guard = flat[: w.numel()].view(64, 32), flat[w.numel() :]
    own = torch.zeros(512, 512, dtype=torch.bfloat16)  # a storage of its own, read in several parts
    monkeypatch.setattr(NixlSource, "max_read_bytes", 256 << 10)
    before = dict(nixl_source.STATS)
    with Subscriber(d.endpoint, remote=True, transport="nixl") as sub, sub.latest() as snap:
        snap.load_into({"w": out_w, "big": own})
    assert torch.equal(out_w, w.to(torch.bfloat16)) and bool((guard == 0).all())
    assert torch.equal(own, big.to(torch.bfloat16))
    assert nixl_source.STATS["nixl"] > before.get("nixl", 0)
    assert nixl_source.STATS["frames"] == before.get("frames", 0)  # all of it over NIXL, none retried
    assert nixl_source.STATS["nixl_retried_as_frames"] == before.get("nixl_retried_as_frames", 0)


NO_AGENT_READER = """
import sys, torch
from stager.client import Subscriber
from stager.client.readers.sources import STATS
from stager.protocol import StagerError
with Subscriber(sys.argv[1], remote=True) as sub:  # transport="auto"
    for _ in range(2):
        with sub.latest() as snap:
            assert torch.equal(snap["w"], torch.arange(64.0).view(8, 8))
print("auto", STATS["frames"], STATS["nixl"], flush=True)
with Subscriber(sys.argv[1], remote=True, transport="nixl") as sub:
    try:
        sub.latest()
    except StagerError as exc:
        print("nixl", exc.code.name, exc.message, flush=True)
"""


def test_auto_reads_frames_when_this_process_cannot_make_its_nixl_agent(make_daemon, tmp_path):
    d = make_daemon(transport="nixl")
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        c.stage({"w": torch.arange(64.0).view(8, 8)}, step=1).wait(10)
    # NIXL importable, but no plugin where it looks for them: its agent cannot be made in the reader
    env = dict(os.environ, NIXL_PLUGIN_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", NO_AGENT_READER, d.endpoint], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"auto {2 * 64 * 4} 0"  # both leases read as frames
    assert lines[1].startswith("nixl UNSUPPORTED transport='nixl' but this reader cannot use NIXL")
    assert done.stderr.count("NIXL reads are off in this process") == 1  # said once per process
    assert d.status()["transport"]["grants"] == 1  # asked once: the process remembers it cannot READ


def test_subscribers_in_threads_share_the_process_agent_and_read_bit_exact(make_daemon):
    # one agent per process serves every Subscriber: its calls come from many threads at once
    import threading

    d = make_daemon(transport="nixl")
    tensors = {f"t{i}": torch.randn(256, 64) for i in range(8)}
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        c.stage(tensors, step=1).wait(10)
    errors = []

    def read():
        try:
            with Subscriber(d.endpoint, remote=True, transport="nixl") as sub:
                for _ in range(10):
                    outs = {k: torch.empty(256, 64, dtype=torch.bfloat16) for k in tensors}
                    with sub.latest() as snap:
                        snap.load_into(outs)
                        assert all(torch.equal(snap[k], v) for k, v in tensors.items())
                    assert all(torch.equal(outs[k], v.to(torch.bfloat16)) for k, v in tensors.items())
        except BaseException as exc:  # noqa: BLE001 (reported by the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and errors == []
    stats = nixl_stats()
    assert stats["busy"] == stats["in_flight"] == stats["dropped"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device-memory destinations need a CUDA GPU")
def test_cuda_destinations_are_registered_as_device_memory_and_read_into_directly(make_daemon):
    d = make_daemon(transport="nixl")
    w = torch.randn(512, 256)
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        c.stage({"w": w, "b": w.to(torch.bfloat16)}, step=1).wait(10)
    before = dict(nixl_source.STATS)
    out = {"w": torch.empty(512, 256, device="cuda"), "b": torch.empty(512, 256, dtype=torch.bfloat16, device="cuda")}
    with Subscriber(d.endpoint, remote=True, transport="nixl") as sub, sub.latest() as snap:
        snap.load_into(out)
    assert torch.equal(out["w"].cpu(), w) and torch.equal(out["b"].cpu(), w.to(torch.bfloat16))
    into_device = nixl_source.STATS["nixl_into_device"] - before.get("nixl_into_device", 0)
    assert into_device == w.numel() * 4 + w.numel() * 2  # every byte READ into device memory, none via the host
    assert _moved(before)["frames"] == 0
