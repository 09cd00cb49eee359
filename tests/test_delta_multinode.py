"""Delta reads of versions held by several nodes: each node's daemon maps its own blocks, the reader
asks each node for the changes of the boxes it reads there (frames from another host, indices only
from a node on its own host), a node without maps for the base has its regions read whole, and the
result is always bit-exact to a full read. Real multi-node jobs on one host: several daemons with
their own host ids, ranks launched as torchrun does on each node."""

import collections
import signal
import threading

import torch

from dist_jobs import LLAMA_CONFIG, rl_chain, stage_rl_chain
from helpers import wait_until
from stager.client import Subscriber
from stager.client.adapters import load_adapter
from stager.client.admin import daemon_status
from stager.dev.launch import DaemonProcess, SimulatedCluster, run_ranks
from stager.protocol.changes import DENSE

ARGS = ("--memory-limit", "64MiB", "--keep", "8", "--change-maps", "bfloat16")


def served(cluster) -> collections.Counter:
    """Bytes each node's daemon has served to readers (Read and Changes replies)."""
    return collections.Counter(
        {f"node-{i}": daemon_status(e)["counters"]["read_bytes"] for i, e in enumerate(cluster.endpoints)}
    )


def mapped_on(endpoint, steps) -> bool:
    """Whether the daemon has the change maps of every step of ``steps`` (each against the one before)."""
    versions = {v["step"]: v for v in daemon_status(endpoint)["versions"]}
    return all(s in versions and "changed" in versions[s] for s in steps)


def expected_moved(states: list, regions: dict, mapped: set) -> collections.Counter:
    """What each node serves for a delta read from ``states[0]`` to ``states[-1]`` in bf16 (the
    states staged in between: the maps' union counts an element that changed in any step): per
    tensor, of the boxes the node serves, the changed elements' indices and (unless the reader maps
    that node's memory) values, or the boxes whole when over DENSE of them changed (nothing from a
    mapped node: shared memory)."""
    out = collections.Counter()
    for fqn, boxes in regions.items():
        ne = torch.zeros(states[0][fqn].shape, dtype=torch.bool)
        for prev, new in zip(states, states[1:]):
            ne |= prev[fqn].bfloat16() != new[fqn].bfloat16()
        per = {}
        for offset, shape, nodes in boxes:
            part = ne[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
            count, numel = per.get(nodes[0], (0, 0))
            per[nodes[0]] = (count + int(part.sum()), numel + part.numel())
        for node, (count, numel) in per.items():
            if count > DENSE * numel:
                out[node] += 0 if node in mapped else numel * 2
            else:
                out[node] += count * (4 if node in mapped else 6)
    return out


def bf16(sd: dict) -> dict:
    return {k: v.bfloat16() for k, v in sd.items()}


def full(sub, step, like: dict) -> dict:
    fresh = {n: torch.empty_like(t) for n, t in like.items()}
    with sub.at(step) as snap:
        snap.load_into(fresh)
    return fresh


def test_multi_node_delta_reads_move_only_each_nodes_changes(monkeypatch):
    """A chain of sparse RL steps staged FSDP over two nodes; readers on neither node (frames from
    both) and on node-0 (its memory mapped, node-1's frames) skip a version, and one last reader
    holds copies the ledger knows nothing of (proven by checksums): each node serves exactly the
    changes of the boxes read from it, and every result equals a full read. The HF view (the llama3
    adapter: q/k through the rotary permutation) moves exactly what the native one does."""
    steps = [1, 2, 3, 4, 5, 6]
    chain = rl_chain(len(steps))
    adapter = load_adapter("llama3", LLAMA_CONFIG)
    with SimulatedCluster(2, args=ARGS) as cluster:
        run_ranks(stage_rl_chain, 4, steps, nodes=cluster.nodes)
        for endpoint in cluster.endpoints:  # each node maps its own blocks (a partial version each)
            wait_until(lambda: mapped_on(endpoint, steps[1:]), timeout=60)
            assert all(v["partial"] for v in daemon_status(endpoint)["versions"])
        total = sum(v.numel() * 2 for v in chain[0].values())
        for mapped, view in ((set(), "native"), (set(), "hf"), ({"node-0"}, "native"), ({"node-0"}, "hf")):
            if mapped:
                monkeypatch.setenv("STAGER_HOST_ID", "node-0")  # a reader beside node-0's ranks
            how = {"view": "hf", "adapter": "llama3", "hf_config": LLAMA_CONFIG} if view == "hf" else {}
            state = (lambda sd: adapter.to_hf(bf16(sd))) if view == "hf" else bf16
            with Subscriber(cluster.endpoints[1], **how) as sub:
                dst = {k: torch.empty(v.shape, dtype=torch.bfloat16) for k, v in state(chain[0]).items()}
                held = None
                for step in (1, 2, 4, 5):  # step 3 skipped: the union of the maps 2->3->4
                    before = served(cluster)
                    with sub.at(step) as snap:
                        assert sorted(snap.load_into(dst, since=held)) == sorted(dst)
                        regions = snap.placement()
                    moved = served(cluster) - before
                    assert all(torch.equal(dst[k], v) for k, v in state(chain[step - 1]).items()), (step, mapped)
                    expected = full(sub, step, dst)
                    assert all(torch.equal(dst[k], expected[k]) for k in dst)
                    if held is not None:
                        want = expected_moved(chain[held - 1 : step], regions, mapped)
                        assert moved == want, (step, mapped)
                        assert want["node-0"] > 0 and want["node-1"] > 0 and sum(want.values()) < total / 4
                    held = step
                # copies of step 5 the ledger never saw (as if loaded from disk): proven by checksums
                copies = {k: v.clone() for k, v in dst.items()}
                before = served(cluster)
                with sub.at(6) as snap:
                    snap.load_into(copies, since=5)
                moved = served(cluster) - before
                assert all(torch.equal(copies[k], v) for k, v in state(chain[5]).items())
                assert moved == expected_moved(chain[4:6], regions, mapped)


def test_a_node_restarted_between_versions_has_its_regions_read_whole(tmp_path):
    """node-1's daemon is killed and restarted between steps 2 and 4: it has no map back to step 2
    (nor the reader's proof of its session), so its regions are read whole; node-0's still move only
    their changes; the result is the full read's."""
    chain = rl_chain(4)
    with SimulatedCluster(2, args=ARGS) as cluster:
        done: dict = {}

        def train():
            try:
                done["sealed"] = run_ranks(stage_rl_chain, 4, [1, 2, 3, 4], str(tmp_path), 2, nodes=cluster.nodes)
            except BaseException as exc:  # reported by the assertion below
                done["error"] = exc

        ranks = threading.Thread(target=train)
        ranks.start()
        try:
            wait_until(lambda: all((tmp_path / f"staged-{r}").exists() for r in range(4)) or "error" in done, 120)
            for endpoint in cluster.endpoints:
                wait_until(lambda: mapped_on(endpoint, [2]), timeout=60)
            dst = {k: torch.empty(v.shape, dtype=torch.bfloat16) for k, v in chain[0].items()}
            with Subscriber(cluster.endpoints[0]) as sub:
                with sub.at(1) as snap:
                    snap.load_into(dst)
                with sub.at(2) as snap:
                    snap.load_into(dst, since=1)
            assert all(torch.equal(dst[k], v) for k, v in bf16(chain[1]).items())
            old = cluster.daemons[1]
            old.stop(signal.SIGKILL)
            cluster.daemons[1] = DaemonProcess(old.endpoint, args=ARGS, env=old.env).start()
        finally:
            (tmp_path / "go").touch()
            ranks.join(180)
        assert "error" not in done, done.get("error")
        assert all("error" not in rank[-1] for rank in done["sealed"]), done["sealed"]  # step 4 sealed
        wait_until(lambda: mapped_on(cluster.endpoints[0], [4]), timeout=60)
        before = served(cluster)
        with Subscriber(cluster.endpoints[0]) as sub:
            with sub.latest() as snap:
                assert snap.step == 4
                snap.load_into(dst, since=2)
                regions = snap.placement()
            moved = served(cluster) - before
            expected = full(sub, 4, dst)
        assert all(torch.equal(dst[k], expected[k]) for k in dst)
        assert all(torch.equal(dst[k], v) for k, v in bf16(chain[3]).items())
        assert moved["node-0"] == expected_moved(chain[1:4], regions, set())["node-0"]
        node1 = sum(
            torch.Size(shape).numel() for boxes in regions.values() for _, shape, nodes in boxes if nodes[0] == "node-1"
        )
        assert moved["node-1"] == node1 * 2  # every region of node-1 read whole, in bf16
