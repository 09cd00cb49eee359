"""Shard planning: coverage, dedup of replicas and offsets, table-driven."""

import math

import pytest
import torch

from stager.daemon.planning import ALIGN, build_layout
from stager.protocol import ErrorCode, ProtocolError
from stager.protocol.layout import Box, Placement, PlanEntry, plan_from_wire

pytestmark = pytest.mark.fast  # the fast tier: no daemon process, no torch.distributed job


def E(fqn, shape, offset, local, dtype="f32"):
    return PlanEntry(fqn, dtype, tuple(shape), Box(tuple(offset), tuple(local)))


# name, plans {rank: [entries]}, full_world, expected {rank: [writes? per entry]}, partial
GOOD = [
    (
        "fsdp uneven 5 rows",
        {0: [E("w", (5, 3), (0, 0), (3, 3))], 1: [E("w", (5, 3), (3, 0), (2, 3))]},
        True,
        {0: [True], 1: [True]},
        False,
    ),
    (
        "tp shard dim 1",
        {0: [E("w", (4, 6), (0, 0), (4, 3))], 1: [E("w", (4, 6), (0, 3), (4, 3))]},
        True,
        {0: [True], 1: [True]},
        False,
    ),
    (
        "replicated: lowest rank writes",
        {0: [E("b", (4,), (0,), (4,))], 1: [E("b", (4,), (0,), (4,))]},
        True,
        {0: [True], 1: [False]},
        False,
    ),
    (
        "hsdp replicate x shard",
        {r: [E("w", (4, 2), ((r % 2) * 2, 0), (2, 2))] for r in range(4)},
        True,
        {0: [True], 1: [True], 2: [False], 3: [False]},
        False,
    ),
    (
        "pipeline: tensors on different ranks",
        {0: [E("a", (2,), (0,), (2,))], 1: [E("b", (3,), (0,), (3,))]},
        True,
        {0: [True], 1: [True]},
        False,
    ),
    ("scalar", {0: [E("s", (), (), ())], 1: [E("s", (), (), ())]}, True, {0: [True], 1: [False]}, False),
    ("empty tensor", {0: [E("e", (0, 4), (0, 0), (0, 4))]}, True, {0: [False]}, False),
    (
        "multi-node: half held",
        {0: [E("w", (8, 2), (0, 0), (2, 2))], 1: [E("w", (8, 2), (2, 0), (2, 2))]},
        False,
        {0: [True], 1: [True]},
        True,
    ),
]


@pytest.mark.parametrize("name,plans,full,writes,partial", GOOD, ids=[g[0] for g in GOOD])
def test_layouts(name, plans, full, writes, partial):
    layout = build_layout(plans, full_world=full)
    assert layout.partial == partial
    for rank, expected in writes.items():
        assert [a is not None for a in layout.assignments[rank]] == expected
    for t in layout.tensors:
        for b in t.blocks:
            assert b.byte_offset % ALIGN == 0
    assert layout.size >= layout.nbytes


def test_offsets_place_shards_in_the_full_tensor():
    plans = {
        0: [E("a", (3,), (0,), (3,)), E("w", (4, 6), (0, 0), (4, 3))],
        1: [E("a", (3,), (0,), (3,)), E("w", (4, 6), (0, 3), (4, 3))],
    }
    layout = build_layout(plans)
    a, w = layout.tensors
    assert a.complete and w.complete
    assert w.blocks[0].byte_offset == ALIGN  # 12 bytes of "a", aligned up
    assert layout.assignments[1][1] == Placement(ALIGN, (4, 6), (0, 3))
    assert layout.nbytes == 3 * 4 + 24 * 4


def test_partial_layout_reports_held_regions():
    plans = {0: [E("w", (8, 2), (4, 0), (2, 2))], 1: [E("w", (8, 2), (0, 0), (2, 2))]}
    layout = build_layout(plans, full_world=False)
    assert layout.held_regions() == {"w": [[[0, 0], [2, 2]], [[4, 0], [2, 2]]]}
    assert layout.assignments[0][0] == Placement(layout.tensors[0].blocks[1].byte_offset, (2, 2), (0, 0))


BAD = [
    ("overlap", {0: [E("w", (4,), (0,), (3,))], 1: [E("w", (4,), (2,), (2,))]}, "overlap"),
    ("gap", {0: [E("w", (5,), (0,), (2,))], 1: [E("w", (5,), (3,), (2,))]}, "cover 4 of 5"),
    ("dtype mismatch", {0: [E("w", (4,), (0,), (2,))], 1: [E("w", (4,), (2,), (2,), "bf16")]}, "agree on dtype"),
    (
        "shape mismatch",
        {0: [E("w", (4,), (0,), (2,))], 1: [E("w", (6,), (2,), (2,))]},
        "agree on dtype and global shape",
    ),
]


@pytest.mark.parametrize("name,plans,text", BAD, ids=[b[0] for b in BAD])
def test_inconsistent_plans_are_refused(name, plans, text):
    with pytest.raises(ProtocolError) as info:
        build_layout(plans)
    assert info.value.code == ErrorCode.BAD_PLAN and text in info.value.message


BAD_WIRE = [
    ("not a list", {"w": 1}, "must be a list"),
    ("short entry", [["w", "f32", [4]]], "must be [fqn"),
    ("no name", [["", "f32", [4], [0], [4]]], "no tensor name"),
    ("duplicate", [["w", "f32", [4], [0], [4]], ["w", "f32", [4], [0], [4]]], "appears twice"),
    ("bad dtype", [["w", "float128", [4], [0], [4]]], "unknown dtype"),
    ("shape not ints", [["w", "f32", ["4"], [0], [4]]], "list of ints"),
    ("out of bounds", [["w", "f32", [4], [2], [3]]], "outside the global shape"),
    ("rank mismatch", [["w", "f32", [4, 4], [0], [4]]], "one entry per dimension"),
    ("local rank mismatch", [["w", "f32", [4, 1], [0, 0], [4]]], "one entry per dimension"),
    ("negative", [["w", "f32", [4], [-1], [1]]], "outside the global shape"),
]


@pytest.mark.parametrize("name,plan,text", BAD_WIRE, ids=[b[0] for b in BAD_WIRE])
def test_malformed_plans_are_refused(name, plan, text):
    with pytest.raises(ProtocolError) as info:
        plan_from_wire(plan)
    assert info.value.code == ErrorCode.BAD_PLAN and text in info.value.message


@pytest.mark.parametrize("shape,dim,world", [((10, 4), 0, 4), ((10, 4), 1, 3), ((3,), 0, 4), ((0, 2), 0, 2)])
def test_shard_boxes_are_torch_chunks(shape, dim, world):
    from stager.protocol.layout import shard_box

    full = torch.arange(math.prod(shape)).view(shape)
    chunks = torch.chunk(full, world, dim) if full.numel() else ()
    for rank in range(world):
        offsets, sizes = shard_box(shape, dim, rank, world)
        box = full.narrow(dim, offsets[dim], sizes[dim])
        expected = chunks[rank] if rank < len(chunks) else full.narrow(dim, 0, 0)
        assert torch.equal(box, expected)


@pytest.mark.parametrize(
    "shape,offsets,sizes,contiguous",
    [
        ((4, 3), (1, 0), (2, 3), True),
        ((4, 3), (2, 1), (1, 2), True),  # part of one row
        ((4, 3), (0, 1), (2, 2), False),
        ((2, 4, 3), (1, 1, 0), (1, 2, 3), True),
        ((2, 4, 3), (0, 1, 0), (2, 1, 3), False),
        ((5,), (2,), (0,), True),
    ],
)
def test_contiguous_spans(shape, offsets, sizes, contiguous):
    from stager.protocol.layout import contiguous_span

    full = torch.arange(math.prod(shape)).view(shape)
    box = full
    for d, (o, s) in enumerate(zip(offsets, sizes)):
        box = box.narrow(d, o, s)
    span = contiguous_span(shape, offsets, sizes)
    assert (span is not None) == contiguous
    if span is not None and box.numel():
        assert torch.equal(full.view(-1)[span[0] : span[0] + span[1]], box.reshape(-1))


@pytest.mark.parametrize(
    "view",
    [
        lambda t: t,
        lambda t: t.transpose(0, 2),
        lambda t: t[2],  # one expert of a grouped [E, out, in] tensor
        lambda t: t[1].t(),
        lambda t: t.permute(2, 0, 1),
        lambda t: t[:, 1:3],
    ],
)
def test_boxes_of_strided_views_map_to_native_boxes(view):
    from stager.client.readers.views import arrange, native_box

    native = torch.arange(4 * 5 * 6).view(4, 5, 6)
    v = view(native)
    meta = view(torch.empty(native.shape, device="meta"))
    strided = (tuple(meta.shape), tuple(meta.stride()), meta.storage_offset())
    offsets = tuple(min(1, n - 1) for n in v.shape)
    sizes = tuple(max(1, n - 2) for n in v.shape)
    expected = v
    for d, (o, s) in enumerate(zip(offsets, sizes)):
        expected = expected.narrow(d, o, s)
    mapped = native_box(tuple(native.shape), strided, offsets, sizes)
    assert mapped is not None
    block = native
    for d, (o, s) in enumerate(zip(*mapped[:2])):
        block = block.narrow(d, o, s)
    assert torch.equal(arrange(block.contiguous(), mapped[2], sizes), expected)
