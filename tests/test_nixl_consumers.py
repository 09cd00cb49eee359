"""The consumers that read across nodes, over NIXL: the distributed writers (`export-hf --distributed`,
`write-dcp --distributed`, one per node), a restarted job's restore, and full assembly (`serve
--assemble-full`, the assembler reading through its daemon's own agent). Two simulated nodes on one
host (own host ids) whose daemons serve ``--transport nixl``, under UCX's default transports (cma)
and ``UCX_TLS=tcp`` (the path two hosts without RDMA take). Each rank process reports its own
bytes by transport (``sources.STATS``): the other node's regions must have come over NIXL, none as
frames, and the daemons served no frame. Skipped where NIXL is not installed."""

import os
import signal
import threading

import pytest
import torch

from dist_jobs import (
    LLAMA_CONFIG,
    full_tensors,
    hf_node_exporter,
    llama_full,
    multi_node_stage,
    scaled,
    stage_fsdp_llama,
)
from helpers import wait_until
from stager.client import Subscriber
from stager.client.adapters import load_adapter
from stager.client.admin import daemon_status
from stager.client.readers.nixl_source import NixlSource, nixl_installed
from stager.daemon.segments import list_segments
from stager.dev.launch import DaemonProcess, SimulatedCluster, run_ranks

pytestmark = pytest.mark.skipif(not nixl_installed(), reason="NIXL is not installed (pip install nixl-cu12==1.5.1)")
ARGS = ("--memory-limit", "256MiB", "--transport", "nixl")
JOB = {"STAGER_JOB_ID": "nixl-consumers"}  # the same job across the run_ranks calls of a test
FP8 = torch.float8_e4m3fn


@pytest.fixture(params=["default", "tcp"])
def ucx(request, monkeypatch):
    """UCX's own choice (cma on one host), or tcp: the daemons and ranks started in the test inherit it."""
    if request.param == "tcp":
        monkeypatch.setenv("UCX_TLS", "tcp")
    return request.param


# ---------------------------------------------------------------- rank functions (spawned: module level)


def _moved() -> dict:
    """This rank process's bytes by transport (it read nothing before)."""
    from stager.client.readers.sources import STATS

    return {k: STATS[k] for k in ("nixl", "frames", "nixl_retried_as_frames")}


def nixl_hf_exporter(rank, world, out, max_shard_size):
    return hf_node_exporter(rank, world, out, max_shard_size), _moved()


def nixl_dcp_writer(rank, world, out):
    from dist_jobs import dcp_node_writer

    return dcp_node_writer(rank, world, out), _moved()


def fp8_weight() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(8)
    return (torch.randn(8, 6, generator=g) * 4).to(FP8), torch.tensor([0.25])


def stage_fp8_across_nodes(rank, world, step):
    """A float8 weight sharded by rows over every rank of both nodes, with its HF-style scale
    (``w_scale_inv``, paired at staging), beside the mixed tensors: a DCP writer dequantizes the
    float8 tensor whole, so the writer assigned it reads the other node's rows."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from dist_jobs import multi_node_placements
    from stager.client import StagingClient

    placements = multi_node_placements(world)
    mesh = placements["fsdp_uneven"][0]
    data, scale = fp8_weight()
    rows = data.shape[0] // world
    local = data[rank * rows : (rank + 1) * rows]  # built locally: gloo does not scatter float8
    w8 = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=data.shape, stride=data.stride())
    full = scaled(full_tensors(), step)
    model = {k: distribute_tensor(v, *placements[k]) if k in placements else v for k, v in full.items()}
    model.update({"w8": w8, "w8_scale_inv": scale})
    with StagingClient(strict=True) as client:
        client.stage({"model": model, "train": {"step": step}}, step=step).wait(60)
    dist.barrier()


def restore_columns_over_nixl(rank, world):
    """A restarted job (one rank per node) restoring the newest version with every 2-D tensor
    column-sharded (``Shard(1)``) and the rest row-sharded: each rank's box spans rows both nodes
    hold, so the other node's part comes through that node's daemon. Returns what it restored and
    its bytes by transport."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from stager.client import StagingClient

    mesh = init_device_mesh("cpu", (world,))
    sd = {
        "model": {
            k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(1 if v.dim() == 2 else 0)])
            if v.dim()
            else torch.zeros_like(v)
            for k, v in full_tensors().items()
        },
        "train": {"step": -1},
    }
    with StagingClient(strict=True) as client:
        step = client.restore(sd)
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).float().numpy() for k, v in sd["model"].items()}
    return step, sd["train"], full, _moved()


# ---------------------------------------------------------------- tests


def _frames_served(cluster) -> list[int]:
    return [daemon_status(e)["counters"]["read_bytes"] for e in cluster.endpoints]


def _check_nixl_only(moved: list[dict]) -> None:
    assert all(m["frames"] == m["nixl_retried_as_frames"] == 0 for m in moved), moved


def test_distributed_writers_read_the_other_nodes_regions_over_nixl_bit_exact(ucx, tmp_path):
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from stager.formats.integrity import verify
    from stager.writers.export_hf import export_hf

    hf = load_adapter("llama3", LLAMA_CONFIG).to_hf(llama_full(5))
    with SimulatedCluster(2, args=ARGS) as cluster:
        run_ranks(stage_fsdp_llama, 4, [5], env=JOB, nodes=cluster.nodes)
        # export-hf --distributed: each exporter fetches the half of its files' bytes the other node holds
        # (FSDP rows split evenly over the nodes: the ties give writer 0 every file)
        served = _frames_served(cluster)
        grants = [daemon_status(e)["transport"]["grants"] for e in cluster.endpoints]
        reports = run_ranks(nixl_hf_exporter, 2, str(tmp_path / "hf"), "20KB", nodes=cluster.nodes)
        assert _frames_served(cluster) == served  # no frame served to any writer
        assert all(daemon_status(e)["transport"]["grants"] > g for e, g in zip(cluster.endpoints, grants))
        moved = [m for _, m in reports]
        _check_nixl_only(moved)
        half = sum(t.numel() * t.element_size() for t in llama_full(5).values()) // 2
        assert sum(m["nixl"] for m in moved) == half, moved
        single = export_hf(str(tmp_path / "one"), endpoint=cluster.endpoints[0], max_shard_size="20KB", progress=False)

        # write-dcp --distributed of a version with a float8 weight over both nodes: dequantized whole by
        # one writer, which reads the other node's rows; every other region is written by a node holding it
        run_ranks(stage_fp8_across_nodes, 4, 6, env=JOB, nodes=cluster.nodes)
        served = _frames_served(cluster)
        dcp_reports = run_ranks(nixl_dcp_writer, 2, str(tmp_path / "dcp"), nodes=cluster.nodes)
        assert _frames_served(cluster) == served
        moved = [m for _, m in dcp_reports]
        _check_nixl_only(moved)
        # the rows of w8 the writer that dequantized it lacked (half of it, 1 byte an element), nothing else
        assert sorted(m["nixl"] for m in moved) == [0, 8 * 6 // 2], moved
        with Subscriber(cluster.endpoints[0], transport="frames") as sub, sub.latest() as snap:  # the frames read
            assert snap.step == 6 and "model.w8" in snap.quant
            framed = {k: snap[k].clone() for k in snap}
    # the HF export: the single exporter's bytes, the adapter's tensors
    path = reports[0][0]["exported"]
    assert [r["exported"] for r, _ in reports] == [path, path] and verify(path)["ok"]
    names = sorted(os.listdir(single[0]))
    assert names == sorted(os.listdir(path))
    for name in names:
        with open(os.path.join(single[0], name), "rb") as a, open(os.path.join(path, name), "rb") as b:
            assert a.read() == b.read(), name
    loaded = {k: v for f in names if f.endswith(".safetensors") for k, v in load_file(os.path.join(path, f)).items()}
    assert sorted(loaded) == sorted(hf) and all(torch.equal(loaded[k], v) for k, v in hf.items())
    # the DCP checkpoint: what a frames reader reads of the version, the float8 weight dequantized
    path = dcp_reports[0][0]["written"]
    assert [r["written"] for r, _ in dcp_reports] == [path, path] and verify(path)["ok"]
    data, scale = fp8_weight()
    assert torch.equal(framed["model.w8"], (data.float() * scale).to(framed["model.w8"].dtype))
    expected = {f"model.{k}": v for k, v in scaled(full_tensors(), 6).items()}
    assert all(torch.equal(framed[k], v) for k, v in expected.items())
    template = {k: torch.zeros_like(v) for k, v in framed.items()}
    dcp.load(template, checkpoint_id=path, no_dist=True)
    assert sorted(template) == sorted(framed) and all(torch.equal(template[k], v) for k, v in framed.items())


def test_a_restore_across_nodes_reads_the_other_nodes_shards_over_nixl_bit_exact(ucx):
    with SimulatedCluster(2, args=ARGS) as cluster:
        run_ranks(multi_node_stage, 4, [1, 2], env=JOB, nodes=cluster.nodes)
        served = _frames_served(cluster)
        grants = [daemon_status(e)["transport"]["grants"] for e in cluster.endpoints]
        results = run_ranks(restore_columns_over_nixl, 2, env=JOB, nodes=cluster.nodes)  # 1 rank per node now
        assert _frames_served(cluster) == served  # no frame served: the other node's part came over NIXL
        assert all(daemon_status(e)["transport"]["grants"] > g for e, g in zip(cluster.endpoints, grants))
        assert all(daemon_status(e)["leases"] == 0 for e in cluster.endpoints)
    expected = scaled(full_tensors(), 2)
    for step, train, full, moved in results:
        assert step == 2 and train == {"step": 2}
        assert [k for k, v in expected.items() if not (torch.from_numpy(full[k]) == v.float()).all()] == []
        assert moved["nixl"] > 0 and moved["frames"] == moved["nixl_retried_as_frames"] == 0, moved


# ---------------------------------------------------------------- full assembly (serve --assemble-full)


def _assembled(endpoint: str, step: int) -> bool:
    return step in daemon_status(endpoint).get("assembly", {}).get("assembled", [])


def _read_whole_here(endpoint: str, node: str, step: int) -> None:
    """A reader on ``node`` reads ``step`` whole from that node's memory alone, bit-exact."""
    expected = {f"model.{k}": v for k, v in scaled(full_tensors(), step).items()}
    with Subscriber(endpoint, node=node) as sub, sub.at(step) as snap:
        assert sorted(snap) == sorted(expected)
        for k, v in expected.items():
            t = snap[k]
            assert torch.equal(t, v) and snap.is_zero_copy(t), k


def test_full_assembly_reads_the_other_nodes_half_through_the_daemons_own_agent_bit_exact(ucx):
    with SimulatedCluster(2, args=ARGS + ("--assemble-full",)) as cluster:
        run_ranks(multi_node_stage, 4, [1], env=JOB, nodes=cluster.nodes)
        for endpoint in cluster.endpoints:
            wait_until(lambda: _assembled(endpoint, 1), timeout=120)
        served = _frames_served(cluster)
        before = [daemon_status(e)["transport"] for e in cluster.endpoints]
        run_ranks(multi_node_stage, 4, [2], env=JOB, nodes=cluster.nodes)
        for endpoint in cluster.endpoints:  # each node pulls the other's half of step 2 over NIXL
            wait_until(lambda: _assembled(endpoint, 2), timeout=120)
        assert _frames_served(cluster) == served == [0, 0]  # no frame served: not to the assemblers, not to rank 0
        for endpoint, old in zip(cluster.endpoints, before):
            status = daemon_status(endpoint)
            transport = status["transport"]
            # READ into this daemon's own segment by its assembler (the daemon's agent), the other node granted it
            assert transport["assembled_over_nixl_bytes"] > old["assembled_over_nixl_bytes"] > 0
            assert transport["grants"] > old["grants"]
            # every segment (the assembler's included) registered once, at creation, by the segment factory
            assert set(transport["registrations"]) == {"stager-segments"}
            assert transport["registration_failures"] == 0
            assert transport["registered_bytes"] == status["memory"]["used"] <= status["memory"]["limit"]
            assert status["counters"]["assembly_failed"] == 0
        for i, endpoint in enumerate(cluster.endpoints):
            _read_whole_here(endpoint, f"node-{i}", 2)

        # kill -9 of a daemon whose assembler reads over NIXL (the next version just staged): nothing stays behind
        run_ranks(multi_node_stage, 4, [3], env=JOB, nodes=cluster.nodes)
        old = cluster.daemons[0]
        old.stop(signal.SIGKILL)
        assert list_segments(old.pid)  # left by the kill, reclaimed by the next daemon on the node
        cluster.daemons[0] = DaemonProcess(old.endpoint, args=old.args, env=old.env).start()
        assert list_segments(old.pid) == []
        assert _assembled(cluster.endpoints[1], 2)  # the other node's whole versions are untouched


def test_a_node_stopped_mid_assembly_fails_that_version_only_and_its_segment_waits_for_the_late_read(
    make_daemon, monkeypatch
):
    """node-0's daemon and its assembler in this process (the assembler driven here, with a short
    timeout); node-1 a process, SIGSTOPped just before the assembler's first READ from it: over tcp
    the READ cannot complete, the assembly fails (the version stays partial) and the segment is not
    reused while that READ may still land; after SIGCONT the next version is assembled whole."""
    from stager.loaders.assemble_full import Assembler

    monkeypatch.setenv("UCX_TLS", "tcp")  # over cma a stopped process's memory stays readable
    node0 = make_daemon(transport="nixl", assemble_full=True, host_id="node-0", memory_limit=256 << 20)
    with DaemonProcess(args=ARGS, env={"STAGER_HOST_ID": "node-1"}) as node1:
        nodes = [
            {"STAGER_HOST_ID": "node-0", "STAGER_ENDPOINT": node0.endpoint},
            {"STAGER_HOST_ID": "node-1", "STAGER_ENDPOINT": node1.endpoint},
        ]
        run_ranks(multi_node_stage, 4, [1], env=JOB, nodes=nodes)
        stopped = threading.Event()
        fetch = NixlSource.fetch

        def stop_node1_first(self, fqn, box, out=None):
            if threading.current_thread().name == "stager-assembler" and not stopped.is_set():
                stopped.set()
                os.kill(node1.pid, signal.SIGSTOP)
            return fetch(self, fqn, box, out)

        monkeypatch.setattr(NixlSource, "fetch", stop_node1_first)
        daemon = node0.daemon
        assembler = Assembler(
            node0.endpoint, daemon.assembly_endpoint, node="node-0", auth_dir=None, timeout=3.0, nixl=daemon.nixl
        )
        assembler.start()
        try:
            wait_until(stopped.is_set, timeout=60)
            try:
                status = wait_until(lambda: (s := node0.status())["counters"]["assembly_failed"] == 1 and s, timeout=60)
                # nothing half-done: step 1 stays partial here; its segment is held back while a READ may land
                assert status["assembly"]["assembled"] == []
                assert next(v for v in status["versions"] if v["step"] == 1)["partial"]
                assert status["memory"]["draining"] > 0
            finally:
                os.kill(node1.pid, signal.SIGCONT)
            wait_until(lambda: node0.status()["memory"]["draining"] == 0, timeout=60)  # the READ ended: reusable
            run_ranks(multi_node_stage, 4, [2], env=JOB, nodes=nodes)
            wait_until(lambda: _assembled(node0.endpoint, 2), timeout=120)
            status = node0.status()
            assert status["assembly"]["assembled"] == [2] and status["counters"]["assembly_failed"] == 1
            assert status["transport"]["assembled_over_nixl_bytes"] > 0
            # a READ that timed out is not retried as frames (the node is down): node-1 never served one
            assert daemon_status(node1.endpoint)["counters"]["read_bytes"] == 0
            _read_whole_here(node0.endpoint, "node-0", 2)
        finally:
            assembler.close()
