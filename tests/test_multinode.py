"""Multi-node jobs on one host: several daemons, each its own node (own host id, own shared
memory), ranks launched as torchrun does on each node; every consumer reads whole versions from
any daemon of the job."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from dist_jobs import (
    LLAMA_CONFIG,
    full_tensors,
    llama_full,
    multi_node_stage,
    restore_multi_node,
    scaled,
    stage_fsdp_llama,
    stage_replicated,
)
from helpers import wait_until
from stager.client import Subscriber
from stager.client.adapters import load_adapter
from stager.client.admin import daemon_status
from stager.dev.launch import DaemonProcess, SimulatedCluster, run_ranks
from stager.protocol import ErrorCode, NodeDown

LIMIT = ("--memory-limit", "64MiB")


def test_two_nodes_fsdp_hsdp_tp_every_reader_sees_whole_versions(tmp_path):
    with SimulatedCluster(2, args=LIMIT) as cluster:
        results = run_ranks(multi_node_stage, 4, [1, 2], nodes=cluster.nodes)
        assert len({r["job"] for r in results}) == 1 and results[0]["job"]
        assert all(s["partial"] for r in results for s in r["sealed"])  # each node holds only its part
        assert results[0]["job_seen"]["nodes"] == dict(zip(["node-0", "node-1"], cluster.endpoints))
        for endpoint in cluster.endpoints:
            status = daemon_status(endpoint)
            assert status["job"]["job"] == results[0]["job"] and sorted(status["job"]["nodes"]) == ["node-0", "node-1"]
        out = subprocess.run(
            [sys.executable, "-m", "stager.cli", "status", "--json", "--endpoint", cluster.endpoints[1]],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)},
        ).stdout
        nodes = json.loads(out)["job_nodes"]
        assert nodes["complete"] == nodes["readable"] == [1, 2] and nodes["node"] == "node-1"
        assert {n: v["sealed"] for n, v in nodes["nodes"].items()} == {"node-0": [1, 2], "node-1": [1, 2]}
        expected = {f"model.{k}": v for k, v in scaled(full_tensors(), 2).items()}
        for endpoint in cluster.endpoints:  # this process is on neither node: every byte comes as frames
            with Subscriber(endpoint) as sub:
                with sub.latest() as snap:
                    assert snap.step == 2 and not snap.partial and sorted(snap) == sorted(expected)
                    assert all(torch.equal(snap[k], v) for k, v in expected.items())
                    for name, dim in (("model.fsdp_uneven", 0), ("model.hsdp", 0), ("model.two_d", 1)):
                        for rank in range(3):
                            want = torch.chunk(expected[name], 3, dim)[rank]
                            assert torch.equal(snap.get(name, shard=(dim, rank, 3)), want), (name, rank)
                got = sub.get_many(["model.tp_col", "model.scalar"], step=1)
                assert torch.equal(got["model.tp_col"], full_tensors()["tp_col"])
                assert sub.wait_for_newer(1, timeout=30).step == 2
        # one DCP writer reading everything through node-1's daemon: plain dcp.load reads it
        import torch.distributed.checkpoint as dcp

        from stager.writers.write_dcp import write_dcp

        path = write_dcp(str(tmp_path / "dcp"), endpoint=cluster.endpoints[1])[0]
        template = {k: torch.zeros_like(v) for k, v in expected.items()}
        dcp.load(template, checkpoint_id=path, no_dist=True)
        assert all(torch.equal(template[k], v) for k, v in expected.items())


def test_full_assembly_puts_whole_versions_on_each_node_for_zero_copy_readers(monkeypatch):
    with SimulatedCluster(2, args=LIMIT + ("--assemble-full",)) as cluster:
        run_ranks(multi_node_stage, 4, [1, 2, 3], nodes=cluster.nodes)  # the trainer stages on while nodes assemble
        expected = {f"model.{k}": v for k, v in scaled(full_tensors(), 3).items()}
        for endpoint in cluster.endpoints:  # each node pulls the other's half of the newest complete version
            wait_until(lambda: 3 in daemon_status(endpoint).get("assembly", {}).get("assembled", []), timeout=60)
        status = daemon_status(cluster.endpoints[0])
        newest = next(v for v in status["versions"] if v["step"] == 3)
        assert newest["assembled"] and not newest["partial"] and newest["tensors"] == len(expected)
        assert status["memory"]["used"] <= status["memory"]["limit"] and status["counters"]["assembled"] >= 1
        for endpoint in cluster.endpoints:  # the trainer was never refused or failed while the nodes assembled
            counters = daemon_status(endpoint)["counters"]
            assert counters["memory_refusals"] == counters["failed"] == 0 and counters["sealed"] == 3
        served = daemon_status(cluster.endpoints[1])["counters"]["read_bytes"]
        monkeypatch.setenv("STAGER_HOST_ID", "node-0")  # a reader on node-0, beside its trainer ranks
        with Subscriber(cluster.endpoints[0]) as sub, sub.latest() as snap:
            assert snap.step == 3 and sorted(snap) == sorted(expected) and snap.objects == {"train.step": 3}
            for k, v in expected.items():
                t = snap[k]
                assert torch.equal(t, v) and snap.is_zero_copy(t), k  # node-0's memory, no copy
            assert all("node-0" in nodes for regions in snap.placement().values() for *_, nodes in regions)
        assert daemon_status(cluster.endpoints[1])["counters"]["read_bytes"] == served  # no byte from node-1
        monkeypatch.delenv("STAGER_HOST_ID")  # a reader on neither node: reads from both, the same values
        with Subscriber(cluster.endpoints[1]) as sub, sub.latest() as snap:
            assert all(torch.equal(snap[k], v) for k, v in expected.items())


def test_a_restarted_multi_node_job_restores_from_every_node_at_another_world_size():
    with SimulatedCluster(2, args=LIMIT) as cluster:
        job = {"STAGER_JOB_ID": "train-42"}  # a launcher's id, the same after the restart (e.g. $SLURM_JOB_ID)
        run_ranks(multi_node_stage, 4, [1, 2], env=job, nodes=cluster.nodes)
        results = run_ranks(restore_multi_node, 2, env=job, nodes=cluster.nodes)  # 1 rank per node now
    expected = scaled(full_tensors(), 2)
    for step, train, full in results:
        assert step == 2 and train == {"step": 2}
        assert [k for k, v in expected.items() if not (torch.from_numpy(full[k]) == v.float()).all()] == []


def test_three_nodes_uneven_fsdp_hf_view_and_export_from_any_daemon(tmp_path):
    from safetensors.torch import load_file

    from stager.writers.export_hf import export_hf

    hf = load_adapter("llama3", LLAMA_CONFIG).to_hf(llama_full(3))
    with SimulatedCluster(3, args=LIMIT) as cluster:
        run_ranks(stage_fsdp_llama, 3, [3], nodes=cluster.nodes)
        with Subscriber(cluster.endpoints[2], view="hf") as sub, sub.latest() as snap:
            assert sorted(snap) == sorted(hf) and all(torch.equal(snap[k], v) for k, v in hf.items())
            params = {k: torch.empty_like(v) for k, v in hf.items()}
            snap.load_into(params)
            assert all(torch.equal(params[k], v) for k, v in hf.items())
        exports = [
            export_hf(str(tmp_path / f"hf{i}"), endpoint=cluster.endpoints[i], progress=False)[0] for i in (0, 2)
        ]
    files = sorted(f for f in os.listdir(exports[0]) if f.endswith(".safetensors"))
    assert files and files == sorted(f for f in os.listdir(exports[1]) if f.endswith(".safetensors"))
    for f in files:  # the same bytes whichever daemon the exporter was pointed at
        with open(os.path.join(exports[0], f), "rb") as a, open(os.path.join(exports[1], f), "rb") as b:
            assert a.read() == b.read()
    loaded = {k: v for f in files for k, v in load_file(os.path.join(exports[0], f)).items()}
    assert sorted(loaded) == sorted(hf) and all(torch.equal(loaded[k], v) for k, v in hf.items())


def test_a_dead_node_gives_a_typed_error_and_replicas_stay_readable(tmp_path):
    def status(runtime):  # `stager status --json`, remembering the nodes' answers in its own runtime directory
        out = subprocess.run(
            [sys.executable, "-m", "stager.cli", "status", "--json", "--endpoint", cluster.endpoints[0]],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
            env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        ).stdout
        return json.loads(out)["job_nodes"]

    (tmp_path / "seen").mkdir()
    (tmp_path / "never").mkdir()
    with SimulatedCluster(2, args=LIMIT) as cluster:
        # step 1: every tensor replicated on both nodes; step 2 also shards one tensor across them
        run_ranks(stage_replicated, 4, [(1, False), (2, True)], nodes=cluster.nodes)
        before = status(tmp_path / "seen")
        assert before["complete"] == [1, 2]
        sub = Subscriber(cluster.endpoints[0], timeout=5)
        snap = sub.latest()
        assert snap.step == 2 and torch.equal(snap["fsdp"], scaled(full_tensors(), 2)["fsdp_uneven"])
        cluster.daemons[1].stop(signal.SIGKILL)  # node-1 dies while step 2 is leased
        with pytest.raises(NodeDown, match="node node-1") as info:
            snap["fsdp"]  # regions only node-1 held: read again, they are gone
        assert info.value.node == "node-1" and info.value.code == ErrorCode.NODE_DOWN
        snap.release()
        # step 2 needs node-1; step 1 is complete from node-0's replicas alone
        with sub.latest() as snap1:
            assert snap1.step == 1 and torch.equal(snap1["hsdp"], scaled(full_tensors(), 1)["hsdp"])
        with pytest.raises(NodeDown, match=r"step 2 of job .* needs a node that does not answer \(node node-1"):
            sub.at(2)
        sub.close()
        # both steps were complete when node-1 last answered; only step 1 is readable from node-0 alone
        job = status(tmp_path / "seen")
        assert job["complete"] == [1, 2] and job["readable"] == [1] and before["readable"] == [1, 2]
        down = job["nodes"]["node-1"]
        assert "down" in down and down["sealed"] == [1, 2] and down["failed"] == [] and down["last_seen_s"] >= 0
        assert job["nodes"]["node-0"]["sealed"] == [1, 2]
        blind = status(tmp_path / "never")  # a host that never saw node-1 answer knows nothing it sealed
        assert blind["complete"] == blind["readable"] == [] and "sealed" not in blind["nodes"]["node-1"]
        assert daemon_status(cluster.endpoints[0])["leases"] == 0  # the readability probe let go of its leases


def test_a_restarted_node_daemon_rejoins_and_the_next_step_completes(tmp_path):
    with SimulatedCluster(2, args=LIMIT) as cluster:
        done: dict = {}

        def train():
            try:
                done["sealed"] = run_ranks(stage_fsdp_llama, 2, [1, 2, 3], str(tmp_path), nodes=cluster.nodes)
            except BaseException as exc:  # reported by the assertion below
                done["error"] = exc

        ranks = threading.Thread(target=train)
        ranks.start()
        wait_until(lambda: all((tmp_path / f"staged-{r}").exists() for r in range(2)) or "error" in done, 120)
        old = cluster.daemons[1]
        old.stop(signal.SIGKILL)
        cluster.daemons[1] = DaemonProcess(old.endpoint, args=LIMIT, env=old.env).start()
        (tmp_path / "go").touch()
        ranks.join(180)
        assert "error" not in done, done.get("error")
        assert all("error" not in rank[-1] for rank in done["sealed"]), done["sealed"]  # the last step sealed
        status = daemon_status(cluster.endpoints[1])
        assert status["job"] is not None and sorted(status["job"]["nodes"]) == ["node-0", "node-1"]
        expected = llama_full(3)
        with Subscriber(cluster.endpoints[1]) as sub, sub.latest() as snap:
            assert snap.step == 3 and all(torch.equal(snap[k], v) for k, v in expected.items())


def test_one_dcp_writer_per_node_writes_one_checkpoint_dcp_loads_at_any_world_size(tmp_path):
    import torch.distributed.checkpoint as dcp

    from dist_jobs import dcp_node_writer, load_dcp_sharded
    from stager.formats.integrity import verify

    with SimulatedCluster(2, args=LIMIT) as cluster:
        run_ranks(multi_node_stage, 4, [1, 2], nodes=cluster.nodes)
        before = [daemon_status(e)["counters"]["read_bytes"] for e in cluster.endpoints]
        reports = run_ranks(dcp_node_writer, 2, str(tmp_path / "dcp"), nodes=cluster.nodes)
        after = [daemon_status(e)["counters"]["read_bytes"] for e in cluster.endpoints]
    paths = [r["written"] for r in reports]
    assert paths[0] == paths[1] == str(tmp_path / "dcp" / "step-00000002")
    check_writer_reports(
        reports,
        2,
        sum(t.numel() * t.element_size() for t in full_tensors().values()),
        len([f for f in os.listdir(paths[0]) if f.endswith(".distcp")]),
    )
    assert after == before  # each writer read its own node's memory only: no tensor byte crossed nodes
    assert verify(paths[0])["ok"]
    expected = {f"model.{k}": v for k, v in scaled(full_tensors(), 2).items()}
    template = {k: torch.zeros_like(v) for k, v in expected.items()}
    dcp.load(template, checkpoint_id=paths[0], no_dist=True)
    assert all(torch.equal(template[k], v) for k, v in expected.items())
    assert run_ranks(load_dcp_sharded, 3, paths[0], 2) == [2, 2, 2]


def test_one_hf_exporter_per_node_writes_the_single_exporters_bytes(tmp_path):
    from dist_jobs import hf_node_exporter
    from stager.writers.export_hf import export_hf

    with SimulatedCluster(2, args=LIMIT) as cluster:
        run_ranks(stage_fsdp_llama, 4, [5], nodes=cluster.nodes)
        single = export_hf(str(tmp_path / "one"), endpoint=cluster.endpoints[0], max_shard_size="20KB", progress=False)[
            0
        ]
        before = [daemon_status(e)["counters"]["read_bytes"] for e in cluster.endpoints]
        reports = run_ranks(hf_node_exporter, 2, str(tmp_path / "two"), "20KB", nodes=cluster.nodes)
        sent = [daemon_status(e)["counters"]["read_bytes"] - b for e, b in zip(cluster.endpoints, before)]
    paths = [r["exported"] for r in reports]
    assert paths[0] == paths[1] and os.path.basename(paths[0]) == "step-00000005"
    names = sorted(os.listdir(single))
    check_writer_reports(
        reports,
        5,
        sum(t.numel() * t.element_size() for t in llama_full(5).values()),
        len([n for n in names if n.endswith(".safetensors")]),
    )
    assert names == sorted(os.listdir(paths[0])) and len([n for n in names if n.endswith(".safetensors")]) > 2
    for name in names:  # every file, the index, config and manifest: the single exporter's bytes
        with open(os.path.join(single, name), "rb") as a, open(os.path.join(paths[0], name), "rb") as b:
            assert a.read() == b.read(), name
    # every tensor is split evenly over the nodes (FSDP rows): each exporter holds half of each of its
    # files' bytes and fetched exactly the other half, nothing twice
    assert sum(sent) == sum(t.numel() * t.element_size() for t in llama_full(5).values()) // 2


def check_writer_reports(reports, step, tensor_bytes, files):
    """--distributed --json: each writer prints a single writer's keys, its own share of the bytes
    and files (together: the whole checkpoint, each byte once), and says which one published."""
    assert [(r["writer"], r["writers"], r["node"]) for r in reports] == [(0, 2, "node-0"), (1, 2, "node-1")]
    assert [r["published"] for r in reports] == [True, False] and all(r["step"] == step for r in reports)
    assert all(r["seconds"] >= 0 and r["files"] >= 0 for r in reports), reports  # (a writer may have none)
    assert sum(r["bytes"] for r in reports) == tensor_bytes and sum(r["files"] for r in reports) == files
