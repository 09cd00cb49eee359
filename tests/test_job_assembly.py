"""The region planner (pure): merging the nodes' layouts of one step, planning reads of boxes, complete steps."""

import pytest

from stager.client.readers.planner import (
    complete_steps,
    incomplete_reason,
    intersect,
    merge_layouts,
    plan_box,
    split_rows,
    subtract,
)
from stager.protocol import Block, Box, ErrorCode, StagerError, TensorLayout

pytestmark = pytest.mark.fast  # the fast tier: no daemon process, no torch.distributed job


def layout(fqn, shape, *boxes, dtype="f32"):
    return TensorLayout(fqn, dtype, shape, tuple(Block(64 * i, Box(o, s)) for i, (o, s) in enumerate(boxes)))


FULL = ((0, 0), (4, 2))
TOP, BOTTOM = ((0, 0), (3, 2)), ((3, 0), (1, 2))


@pytest.mark.parametrize(
    "parts,prefer,expected",
    [
        # FSDP across nodes, uneven: each node one part
        (
            {"a": [layout("w", (4, 2), TOP)], "b": [layout("w", (4, 2), BOTTOM)]},
            ["a", "b"],
            [((0, 0), ["a"]), ((3, 0), ["b"])],
        ),
        # HSDP, replicas across nodes: one region, both holders, the preferred one first
        (
            {"a": [layout("w", (4, 2), TOP, BOTTOM)], "b": [layout("w", (4, 2), TOP, BOTTOM)]},
            ["b", "a"],
            [((0, 0), ["b", "a"]), ((3, 0), ["b", "a"])],
        ),
        # one node holds the whole tensor (assembled), the other a part of it: the part is held by both,
        # the rest by the whole one alone; the same regions whatever the preference (writers plan from them)
        (
            {"a": [layout("w", (4, 2), BOTTOM)], "b": [layout("w", (4, 2), FULL)]},
            ["a", "b"],
            [((0, 0), ["b"]), ((3, 0), ["a", "b"])],
        ),
        (
            {"a": [layout("w", (4, 2), BOTTOM)], "b": [layout("w", (4, 2), FULL)]},
            ["b", "a"],
            [((0, 0), ["b"]), ((3, 0), ["b", "a"])],
        ),
        # two assembled nodes and a partial one
        (
            {"a": [layout("w", (4, 2), FULL)], "b": [layout("w", (4, 2), TOP)], "c": [layout("w", (4, 2), FULL)]},
            ["b", "c", "a"],
            [((0, 0), ["b", "c", "a"]), ((3, 0), ["c", "a"])],
        ),
        # a node that holds nothing of it (empty shard) is no holder
        (
            {"a": [layout("w", (4, 2), FULL)], "b": [layout("w", (4, 2), ((4, 0), (0, 2)))]},
            ["b", "a"],
            [((0, 0), ["a"])],
        ),
    ],
    ids=[
        "fsdp across nodes",
        "hsdp replicas",
        "whole and part",
        "whole and part, whole preferred",
        "two whole, one part",
        "empty shard",
    ],
)
def test_regions_and_their_holders(parts, prefer, expected):
    merged = merge_layouts(parts, prefer, 1)["w"]
    assert [(r.box.offset, [n for n, _ in r.holders]) for r in merged.regions] == expected
    assert merged.layout().complete
    holds_whole = [n for n, ts in parts.items() if any(b.box == Box((0, 0), (4, 2)) for b in ts[0].blocks)]
    assert merged.nearest_whole == (prefer[0] if prefer[0] in holds_whole else None)


HALVES = {"a": [layout("w", (4, 2), TOP)], "b": [layout("w", (4, 2), BOTTOM)]}


@pytest.mark.parametrize(
    "parts,prefer,want,expected",
    [
        # one node holding it whole (one daemon, or an assembled copy): one read from there
        ({"a": [layout("w", (4, 2), FULL)]}, ["a"], ((1, 0), (2, 2)), [("a", (1, 0), (2, 2), (0, 0))]),
        (
            {"a": [layout("w", (4, 2), TOP)], "b": [layout("w", (4, 2), FULL)]},
            ["b", "a"],
            FULL,
            [("b", (0, 0), (4, 2), (0, 0))],
        ),
        # a box inside one region: one read from its preferred holder
        (HALVES, ["a", "b"], ((0, 1), (2, 1)), [("a", (0, 1), (2, 1), (0, 0))]),
        # a box across regions: a read per region crossed, each landing where it belongs
        (HALVES, ["b", "a"], ((2, 0), (2, 2)), [("a", (2, 0), (1, 2), (0, 0)), ("b", (3, 0), (1, 2), (1, 0))]),
        # replicas on both nodes: each region read once, from the preferred node
        (
            {"a": [layout("w", (4, 2), TOP, BOTTOM)], "b": [layout("w", (4, 2), TOP, BOTTOM)]},
            ["b", "a"],
            FULL,
            [("b", (0, 0), (3, 2), (0, 0)), ("b", (3, 0), (1, 2), (3, 0))],
        ),
        (HALVES, ["a", "b"], ((1, 0), (0, 2)), []),  # an empty box needs no read
    ],
    ids=["one node whole", "whole copy preferred", "inside a region", "across regions", "replicas once", "empty"],
)
def test_plan_box_reads_each_part_once_from_the_preferred_holder(parts, prefer, want, expected):
    merged = merge_layouts(parts, prefer, 1)["w"]
    reads = plan_box(merged, Box(*want))
    assert [(r.node, r.box.offset, r.box.shape, r.at) for r in reads] == expected


@pytest.mark.parametrize(
    "box,itemsize,limit,expected",
    [
        (((0, 0), (6, 4)), 4, 1 << 20, [((0, 0), (6, 4))]),  # fits: one read
        (((2, 0), (6, 4)), 4, 32, [((2, 0), (2, 4)), ((4, 0), (2, 4)), ((6, 0), (2, 4))]),  # two rows each
        (((0, 0), (3, 4)), 4, 8, [((0, 0), (1, 4)), ((1, 0), (1, 4)), ((2, 0), (1, 4))]),  # a row at least
        (((0, 0), (1, 64)), 4, 8, [((0, 0), (1, 64))]),  # one row is never split
        (((), ()), 4, 1, [((), ())]),  # a scalar
    ],
    ids=["fits", "row ranges", "a row at least", "one row", "scalar"],
)
def test_split_rows(box, itemsize, limit, expected):
    pieces = split_rows(Box(*box), itemsize, limit)
    assert [(p.offset, p.shape) for p in pieces] == expected


def test_a_partial_version_keeps_its_regions_and_leaves_the_tensor_out_of_the_view():
    merged = merge_layouts({"a": [layout("w", (4, 2), TOP), layout("b", (3,), ((0,), (3,)))]}, ["a"], 1, holes=True)
    assert not merged["w"].complete and merged["b"].complete
    assert not merged["w"].layout().complete and merged["b"].layout().complete  # the view shows b only
    assert [r.box for r in merged["w"].regions] == [Box(*TOP)]
    assert [(r.node, r.box.offset) for r in plan_box(merged["w"], Box((0, 0), (2, 2)))] == [("a", (0, 0))]


@pytest.mark.parametrize(
    "box,holes,expected",
    [
        (Box((0, 0), (6, 4)), [Box((2, 0), (2, 4))], [((0, 0), (2, 4)), ((4, 0), (2, 4))]),
        (Box((0, 0), (6, 4)), [Box((0, 0), (2, 4)), Box((4, 0), (2, 4))], [((2, 0), (2, 4))]),
        (
            Box((0, 0), (3, 3)),
            [Box((1, 1), (1, 1))],
            [((0, 0), (1, 3)), ((2, 0), (1, 3)), ((1, 0), (1, 1)), ((1, 2), (1, 1))],
        ),
        (Box((0, 0), (2, 2)), [Box((0, 0), (2, 2))], []),
        (Box((4,), (4,)), [], [((4,), (4,))]),
    ],
    ids=["middle rows", "two row holes", "a hole in the middle of 2D", "all of it", "no hole"],
)
def test_subtract_leaves_disjoint_boxes_covering_the_rest(box, holes, expected):
    pieces = subtract(box, holes)
    assert [(p.offset, p.shape) for p in pieces] == expected
    assert sum(p.numel for p in pieces) + sum(h.numel for h in holes) == box.numel
    assert not any(p.intersects(q) for i, p in enumerate(pieces) for q in pieces[i + 1 :] + holes)


@pytest.mark.parametrize(
    "parts,code,text",
    [
        ({"a": [layout("w", (4, 2), TOP)]}, ErrorCode.PARTIAL, r"hold 6 of 8 elements of w \[4, 2\]"),
        (
            {"a": [layout("w", (4, 2), TOP)], "b": [layout("w", (4, 2), ((2, 0), (2, 2)))]},
            ErrorCode.BAD_PLAN,
            "partly overlaps",
        ),
        (
            {"a": [layout("w", (4, 2), TOP)], "b": [layout("w", (4, 2), BOTTOM, dtype="bf16")]},
            ErrorCode.BAD_PLAN,
            r"w is f32\[4, 2\] on node a but bf16\[4, 2\] on node b",
        ),
    ],
    ids=["hole", "partial overlap", "dtype disagrees"],
)
def test_contradictions_and_holes_are_refused(parts, code, text):
    with pytest.raises(StagerError, match=text) as info:
        merge_layouts(parts, list(parts), 7)
    assert info.value.code == code and "step 7" in info.value.message


@pytest.mark.parametrize(
    "a,b,expected",
    [
        (Box((0, 0), (4, 4)), Box((2, 3), (4, 4)), Box((2, 3), (2, 1))),
        (Box((0,), (3,)), Box((3,), (1,)), None),
        (Box((), ()), Box((), ()), Box((), ())),
    ],
)
def test_intersect(a, b, expected):
    assert intersect(a, b) == expected


def test_complete_steps_and_reasons():
    assert complete_steps({"a": [1, 2, 3], "b": [2, 3], "c": [3, 2]}, {}) == [2, 3]
    assert complete_steps({"a": [1, 2], "b": [1, 2]}, {"c": [2]}) == [1]  # a node that failed 2: never complete
    assert complete_steps({}, {}) == []
    kinds = {"a": {"sealed": [4]}, "b": {"failed": [4]}, "c": {"staging": [4]}, "d": {"sealed": [3]}}
    assert incomplete_reason(4, kinds, {"e": "gone"}) == (
        "node b failed it; node c is still staging it; node d does not hold it; node e does not answer (gone)"
    )


def test_each_region_is_written_once_by_a_node_holding_it():
    from stager.writers.write_dcp_dist import assign_regions

    placement = {
        "w": [((0,), (2,), ["a"]), ((2,), (2,), ["b"])],
        "r": [((i,), (1,), ["a", "b"]) for i in range(16)],
    }  # replicas on both nodes
    out = assign_regions(placement, ["a", "b"])
    assert ("w", (0,), (2,)) in out["a"] and ("w", (2,), (2,)) in out["b"]
    replicas = [r for node in out.values() for r in node if r[0] == "r"]
    assert sorted(r[1] for r in replicas) == [(i,) for i in range(16)]  # each once
    assert all(len([r for r in out[n] if r[0] == "r"]) > 2 for n in "ab")  # spread over the holders
    assert assign_regions(placement, ["a", "b"]) == out  # every writer computes the same
    with pytest.raises(StagerError, match="none of them runs a writer"):
        assign_regions(placement, ["a"])


def test_each_file_goes_to_the_node_holding_most_of_it():
    from types import SimpleNamespace as NS

    from stager.writers.export_hf_dist import assign_files

    tensors = [NS(source="x"), NS(source="y"), NS(source="z"), NS(source="")]
    ep = NS(tensors=tensors, sizes=[40, 10, 10, 4], files=[[0, 1], [2], [3]])
    placement = {
        "x": [((0,), (3,), ["a"]), ((3,), (1,), ["b"])],
        "y": [((0,), (4,), ["b"])],
        "z": [((0,), (4,), ["a", "b"])],
    }
    # file 0: a holds 30 of x's 40 bytes, b 10 + 10; file 1: both hold z (tie: the first writer);
    # file 2: a whole-dict adapter's tensor (no source): the first writer
    assert assign_files(ep, placement, ["b", "a"]) == ["a", "b", "b"]
