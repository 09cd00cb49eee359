"""The consumers that read across nodes, over NIXL: the distributed writers (`export-hf --distributed`,
`write-dcp --distributed`, one per node) and a restarted job's restore. Two simulated nodes on one
host (own host ids) whose daemons serve ``--transport nixl``, under UCX's default transports (cma)
and ``UCX_TLS=tcp`` (the path two hosts without RDMA take). Each rank process reports its own
bytes by transport (``sources.STATS``): the other node's regions must have come over NIXL, none as
frames, and the daemons served no frame. Skipped where NIXL is not installed."""

import os

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
from stager.client import Subscriber
from stager.client.adapters import load_adapter
from stager.client.admin import daemon_status
from stager.client.readers.nixl_source import nixl_installed
from stager.dev.launch import SimulatedCluster, run_ranks

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
