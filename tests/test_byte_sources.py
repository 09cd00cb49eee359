"""Byte sources: every source (shared memory, frames, NIXL) through the same cases, on a real daemon's lease;
the mover keeping each source within its window; a partial version's regions read through either."""

import os

import pytest
import torch

from conftest import wire_plan
from stager.client import Subscriber
from stager.client.connection import Connection
from stager.client.readers.mover import Want, move
from stager.client.readers.nixl_source import nixl_installed
from stager.client.readers.planner import Read, merge_layouts, plan_box
from stager.client.readers.sources import ByteSource, SegmentMaps, open_source
from stager.protocol import Acquire, Begin, Box, Commit, ErrorCode, Hello, Put, Sealed, StagerError, TensorLayout
from stager.protocol.endpoint import host_id, process_start_time
from stager.protocol.layout import Block, narrow_box, plan_digest

W = torch.arange(24, dtype=torch.float32).view(6, 4)  # this node holds rows 0-3 of it: the job spans nodes
B = torch.tensor([1.5, 2.5, 3.5])


def _stage_partial(d, raw_peer):
    p = raw_peer(d.endpoint)
    pid = os.getpid()
    p.request(
        Hello(
            role="trainer",
            rank=0,
            local_world_size=1,
            world_size=2,
            pid=pid,
            start_time=process_start_time(pid),
            host_id=host_id(),
        )
    )
    plan = wire_plan(["w", "f32", [6, 4], [0, 0], [4, 4]], ["b", "f32", [3], [0], [3]])
    assert (
        p.request(Begin(step=1, digest=plan_digest(plan), plan=plan, shm=False, full_world=False)).TYPE == "begin_reply"
    )
    p.request(Put(step=1, regions=[0, 1], frames=[W[:4].numpy().tobytes(), B.numpy().tobytes()]))
    sealed = p.request(Commit(step=1))
    assert isinstance(sealed, Sealed) and sealed.partial
    return d


@pytest.fixture
def partial_daemon(make_daemon, raw_peer):
    """A daemon holding step 1: ``b`` whole and rows 0-3 of ``w`` (rank 0 of 2, the other on another node)."""
    return _stage_partial(make_daemon(), raw_peer)


@pytest.fixture
def nixl_partial_daemon(make_daemon, raw_peer):
    """The same, served with ``--transport nixl`` (skipped where NIXL is not installed)."""
    if not nixl_installed():
        pytest.skip("NIXL is not installed (pip install nixl-cu12==1.5.1)")
    return _stage_partial(make_daemon(transport="nixl"), raw_peer)


@pytest.fixture(params=["shared memory", "frames", "nixl"])
def source(request):
    kind = request.param
    daemon = request.getfixturevalue("nixl_partial_daemon" if kind == "nixl" else "partial_daemon")
    conn = Connection(daemon.endpoint, role="reader")
    reply = conn.request(Acquire(), 10)
    src = open_source(
        conn,
        reply.lease,
        reply.segment,
        reply.size,
        reply.tensors,
        remote=kind != "shared memory",
        maps=SegmentMaps(),
        timeout=10,
        transport="nixl" if kind == "nixl" else "frames",
    )
    assert (
        type(src).__name__
        == {"shared memory": "SharedMemorySource", "frames": "FramesSource", "nixl": "NixlSource"}[kind]
    )
    yield kind, src
    src.close()
    conn.close()


def test_every_source_is_a_byte_source(source):
    _, src = source
    assert isinstance(src, ByteSource) and src.max_in_flight >= 1 and src.max_read_bytes > 0


@pytest.mark.parametrize(
    "fqn,box,expected",
    [
        ("w", Box((0, 0), (4, 4)), W[:4]),  # the block this node holds
        ("w", Box((1, 1), (2, 3)), W[1:3, 1:4]),  # a box inside it
        ("w", Box((3, 0), (1, 4)), W[3:4]),
        ("b", Box((0,), (3,)), B),
        ("b", Box((2,), (1,)), B[2:]),
    ],
    ids=["held block", "inner box", "last row", "whole tensor", "one element"],
)
def test_fetch_gives_the_box_or_fills_the_destination(source, fqn, box, expected):
    _, src = source
    assert torch.equal(src.fetch(fqn, box).wait(), expected)
    out = torch.full(box.shape, -1.0)
    assert src.fetch(fqn, box, out).wait() is out and torch.equal(out, expected)


@pytest.mark.parametrize(
    "fqn,box,expected",
    [
        ("w", Box((0, 0), (4, 4)), W[:4]),
        ("w", Box((1, 1), (2, 3)), W[1:3, 1:4]),
        ("b", Box((0,), (3,)), B),
    ],
    ids=["held block", "inner box", "whole tensor"],
)
def test_a_destination_of_another_dtype_is_cast_into_and_its_neighbours_are_untouched(source, fqn, box, expected):
    # load_into's destinations come in the reader's dtype, often side by side in one flat buffer
    # (vLLM, FSDP): the staged dtype's raw bytes must never be written into them
    _, src = source
    n = box.numel
    flat = torch.zeros(3 * n, dtype=torch.bfloat16)
    out = flat[n : 2 * n].view(box.shape)
    assert src.fetch(fqn, box, out).wait() is out
    assert torch.equal(out, expected.to(torch.bfloat16))
    assert bool((flat[:n] == 0).all()) and bool((flat[2 * n :] == 0).all())  # the neighbours
    strided = torch.zeros(box.shape[:-1] + (2 * box.shape[-1],), dtype=torch.float64)[..., ::2]
    assert torch.equal(src.fetch(fqn, box, strided).wait(), expected.to(torch.float64))


def test_map_is_a_view_of_shared_memory_or_nothing(source):
    kind, src = source
    view = src.map("w", Box((1, 0), (2, 4)))
    if kind != "shared memory":  # fetched, never mapped
        assert view is None and not src.shares(src.fetch("w", Box((1, 0), (2, 4))).wait())
        return
    assert torch.equal(view, W[1:3]) and src.shares(view) and not src.shares(view.clone())


@pytest.mark.parametrize(
    "fqn,box,code",
    [
        ("w", Box((4, 0), (2, 4)), ErrorCode.PARTIAL),  # held by the other node
        ("w", Box((2, 0), (4, 4)), ErrorCode.PARTIAL),  # partly held here
        ("w", Box((0, 0), (7, 4)), ErrorCode.BAD_VALUE),  # larger than the tensor
        ("b", Box((0, 0), (1, 1)), ErrorCode.BAD_VALUE),  # a dimension too many
    ],
    ids=["other node's rows", "across the nodes", "too large", "wrong rank"],
)
def test_boxes_a_node_does_not_hold_get_typed_errors(source, fqn, box, code):
    _, src = source
    with pytest.raises(StagerError) as info:
        src.fetch(fqn, box).wait()
    assert info.value.code == code and fqn in info.value.message


def test_unknown_tensors_and_closed_sources_are_refused(source):
    kind, src = source
    with pytest.raises(KeyError):
        src.fetch("nope", Box((0,), (1,)))
    if kind == "frames":  # its connection closed (the node left the job): a typed error, not a crash
        src.conn.close()
        with pytest.raises(StagerError) as info:
            src.fetch("b", Box((0,), (3,)))
        assert info.value.code == ErrorCode.UNAVAILABLE and "lease the version again" in info.value.message
    src.close()
    with pytest.raises(StagerError) as info:
        src.fetch("b", Box((0,), (3,)))
    assert info.value.code == ErrorCode.UNKNOWN_LEASE


@pytest.mark.parametrize("remote", [False, True], ids=["shared memory", "frames"])
def test_a_partial_version_reads_its_regions_from_either_source(partial_daemon, remote):
    with Subscriber(partial_daemon.endpoint, remote=remote) as sub:
        with pytest.raises(StagerError) as info:
            sub.latest()
        assert info.value.code == ErrorCode.PARTIAL and "allow_partial=True" in info.value.message
        with sub.latest(allow_partial=True) as snap:
            assert snap.partial and list(snap) == ["b"] and torch.equal(snap["b"], B)
            ((offset, rows),) = snap.regions("w")
            assert offset == (0, 0) and torch.equal(rows, W[:4])
            ((offset, whole),) = snap.regions("b")
            assert offset == (0,) and torch.equal(whole, B)


@pytest.mark.parametrize("remote", [False, True], ids=["shared memory", "frames"])
def test_a_lease_does_not_search_sys_path_for_nixl(partial_daemon, remote, monkeypatch):
    """Whether NIXL is installed is searched for once per process, not at every lease per node: each search
    stats every sys.path entry, which a multi-node reader's every acquire paid per node."""
    import importlib.util

    with Subscriber(partial_daemon.endpoint, remote=remote) as sub:
        sub.latest(allow_partial=True).release()  # the first lease of the process may search
        searched = []
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: searched.append(name) or real(name, *a))
        for _ in range(3):
            with sub.latest(allow_partial=True) as snap:
                assert torch.equal(snap["b"], B)
    assert searched == []


class TensorSource:
    """The smallest ByteSource: in-process tensors, each fetch done when waited for. Records how
    many fetches were outstanding at once and checks they are waited for in the order started."""

    def __init__(self, tensors, max_in_flight, max_read_bytes, mappable=False, fails=False):
        self.tensors, self.max_in_flight, self.max_read_bytes = tensors, max_in_flight, max_read_bytes
        self.mappable, self.fails = mappable, fails
        self.started, self.waited, self.peak = 0, 0, 0

    def map(self, fqn, box):
        return narrow_box(self.tensors[fqn], box.offset, box.shape) if self.mappable else None

    def fetch(self, fqn, box, out=None):
        assert box.numel * self.tensors[fqn].element_size() <= self.max_read_bytes
        n, self.started = self.started, self.started + 1
        self.peak = max(self.peak, self.started - self.waited)
        return _Fetch(self, n, narrow_box(self.tensors[fqn], box.offset, box.shape), out)

    def shares(self, t):
        return False

    def close(self):
        pass


class _Fetch:
    def __init__(self, src, n, data, out):
        self.src, self.n, self.data, self.out = src, n, data, out

    def wait(self):
        assert self.n == self.src.waited, "fetches of one source are waited for in the order started"
        self.src.waited += 1
        if self.src.fails:
            raise StagerError(ErrorCode.UNAVAILABLE, "gone")
        return self.data.clone() if self.out is None else self.out.copy_(self.data)


def _layout(fqn, shape, *boxes):
    return (TensorLayout(fqn, "f32", shape, tuple(Block(0, Box(o, s)) for o, s in boxes)),)


def test_the_mover_keeps_each_source_in_its_window_and_gives_boxes_in_order():
    full = {f"t{i}": torch.randn(8, 4) for i in range(6)}
    # node a holds rows 0-4 of every tensor, node b rows 5-7; a fetches at most 2 rows at once
    a = TensorSource({k: v for k, v in full.items()}, max_in_flight=2, max_read_bytes=32)
    b = TensorSource({k: v for k, v in full.items()}, max_in_flight=1, max_read_bytes=1 << 20)
    parts = {
        "a": sum((_layout(k, (8, 4), ((0, 0), (5, 4))) for k in full), ()),
        "b": sum((_layout(k, (8, 4), ((5, 0), (3, 4))) for k in full), ()),
    }
    merged = merge_layouts(parts, ["a", "b"], 1)
    outs = {"t1": torch.empty(8, 4)}
    wants = [
        Want(k, Box((0, 0), (8, 4)), torch.float32, plan_box(merged[k], Box((0, 0), (8, 4))), outs.get(k)) for k in full
    ]
    got = [(w.fqn, t) for w, t in move(wants, {"a": a, "b": b}, lambda node, exc, fqn: exc)]
    assert [k for k, _ in got] == list(full) and all(torch.equal(t, full[k]) for k, t in got)
    assert dict(got)["t1"] is outs["t1"]  # landed in the destination given
    assert (a.peak, b.peak) == (2, 1) and a.started == 6 * 3 and b.started == 6  # 5 rows: 2 + 2 + 1


def test_the_mover_maps_what_it_can_and_names_the_node_that_failed():
    t = torch.randn(4, 2)
    local = TensorSource({"w": t}, 1, 1 << 20, mappable=True)
    read = [Read("a", Box((0, 0), (4, 2)), (0, 0))]
    ((_, got),) = move([Want("w", Box((0, 0), (4, 2)), torch.float32, read)], {"a": local}, None)
    assert got.data_ptr() == t.data_ptr() and local.started == 0  # the mapped memory itself, nothing fetched
    dead = TensorSource({"w": t}, 1, 1 << 20, fails=True)
    with pytest.raises(StagerError, match="node a: gone while reading w"):
        list(
            move(
                [Want("w", Box((0, 0), (4, 2)), torch.float32, read)],
                {"a": dead},
                lambda node, exc, fqn: StagerError(
                    ErrorCode.NODE_DOWN, f"node {node}: {exc.message} while reading {fqn}"
                ),
            )
        )


@pytest.mark.fast
def test_nixl_runs_pair_a_boxs_elements_with_their_places_in_a_strided_destination():
    """A READ's descriptors: each run contiguous in the staged block and in the destination (dense,
    or a view of a larger tensor, as the assembler's segment is), together the whole box."""
    from stager.client.readers.nixl_runs import paired_runs

    block = torch.arange(5 * 6 * 7).view(5, 6, 7)
    cases = [((1, 2, 3), (2, 3, 4)), ((0, 0, 0), (5, 6, 7)), ((2, 0, 0), (3, 6, 7)), ((0, 1, 0), (5, 2, 7))]
    cases += [((4, 5, 6), (1, 1, 1)), ((1, 0, 2), (3, 1, 5))]
    for at, sizes in cases:
        box = block[tuple(slice(a, a + n) for a, n in zip(at, sizes))]
        big = torch.full((9, 8, 10), -1)
        for store, dest in ((None, torch.full(sizes, -1)), (big, big[1 : 1 + sizes[0], 2 : 2 + sizes[1], 3:])):
            dest = dest[..., : sizes[2]]
            flat = (dest if store is None else store).view(-1)
            remote, local, length = paired_runs(block.shape, at, sizes, dest.stride())
            assert len(remote) == len(local) and length * len(remote) == box.numel()
            for r, loc in zip(remote, local):
                at_dest = dest.storage_offset() + loc
                flat[at_dest : at_dest + length] = block.view(-1)[r : r + length]
            assert torch.equal(dest, box), (at, sizes, store is None)
    assert paired_runs((8192, 2), (0, 0), (8192, 1), (1, 1)) is None  # more runs than MAX_RUNS
