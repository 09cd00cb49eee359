"""Change maps as pure functions: what changed, bitwise in the reader's dtype, and its encoding."""

import math

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stager.protocol.change_regions import regional
from stager.protocol.changes import (
    DENSE,
    INDICES,
    UNCHANGED,
    WHOLE,
    Change,
    apply,
    changed_indices,
    checksum,
    compare_dtype,
    diff,
    diff_spans,
    gather,
    gather_many,
    union,
    whole,
)


def _bf16_step(n: int, moved: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values exactly on bf16, every element nudged below half a bf16 ulp, ``moved`` by a full one."""
    prev = torch.linspace(1, 2, n).bfloat16().float()
    new = prev + 2.0**-12  # bf16 ulp at [1, 2) is 2**-7: stays on the same bf16 value
    new[moved] = (prev[moved].bfloat16() + 2.0**-6).float()
    return prev, new


@pytest.mark.parametrize(
    "n,moved,dtype,kind,count",
    [
        (100, [], torch.bfloat16, UNCHANGED, 0),  # fp32 moved, bf16 did not
        (100, [0, 7, 99], torch.bfloat16, INDICES, 3),
        (100, list(range(25)), torch.bfloat16, INDICES, 25),  # exactly DENSE: still indices
        (100, list(range(26)), torch.bfloat16, WHOLE, 26),  # over DENSE: whole
        (100, [], torch.float32, WHOLE, 100),  # an fp32 reader sees every element move
        (100, [5], torch.float16, INDICES, 1),
    ],
    ids=["bf16 unchanged", "bf16 sparse", "at threshold", "dense", "fp32 reader", "fp16 reader"],
)
def test_diff_table(n, moved, dtype, kind, count):
    prev, new = _bf16_step(n, moved)
    c = diff(prev, new, dtype)
    assert (c.kind, c.count, c.numel) == (kind, count, n)
    if kind == INDICES:
        assert c.indices.dtype == torch.int32 and c.indices.tolist() == sorted(moved)
    else:
        assert c.indices is None


@pytest.mark.parametrize(
    "a,b,changed",
    [
        (0.0, -0.0, True),  # signed zeros differ bitwise
        (float("nan"), float("nan"), False),  # the same NaN bits: unchanged
        (1.0, 1.0 + 2**-20, False),  # rounds to the same bf16
        (float("inf"), 3.0e38, True),  # 3e38 rounds to a finite bf16, inf stays inf
    ],
)
def test_bitwise_in_the_cast_dtype(a, b, changed):
    prev, new = torch.tensor([a, 1.0]), torch.tensor([b, 1.0])
    assert changed_indices(prev, new, torch.bfloat16).tolist() == ([0] if changed else [])


@pytest.mark.parametrize(
    "stored,reader,expected",
    [
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.int64, torch.bfloat16, torch.int64),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.bool, torch.float16, torch.bool),
    ],
)
def test_compare_dtype(stored, reader, expected):
    assert compare_dtype(stored, reader) == expected


def test_integer_bool_and_complex_tensors_compare_in_their_own_dtype():
    assert diff(torch.arange(10), torch.arange(10).flip(0), torch.bfloat16).count == 10
    b = torch.zeros(16, dtype=torch.bool)
    nb = b.clone()
    nb[3] = True
    assert diff(b, nb, torch.bfloat16).indices.tolist() == [3]
    c = torch.zeros(8, dtype=torch.complex64)
    nc = c.clone()
    nc[2] = 1j
    assert changed_indices(c, nc, torch.complex64).tolist() == [2]


def test_chunks_give_the_same_indices():
    g = torch.Generator().manual_seed(0)
    prev = torch.randn(1000, generator=g)
    new = prev + torch.randn(1000, generator=g) * 1e-3
    assert torch.equal(changed_indices(prev, new, torch.bfloat16, chunk=7), changed_indices(prev, new, torch.bfloat16))


def test_union_of_a_chain_is_exact():
    chain = [torch.zeros(64)]
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        nxt = chain[-1].clone()
        nxt[torch.randint(0, 64, (3,), generator=g)] += 1.0
        chain.append(nxt)
    maps = [diff(a, b, torch.bfloat16) for a, b in zip(chain, chain[1:])]
    u = union(maps, 64)
    reader = chain[0].bfloat16()
    apply(reader, u.indices, gather(chain[-1], u.indices, torch.bfloat16))
    assert torch.equal(reader, chain[-1].bfloat16())
    assert union([], 64).kind == UNCHANGED
    assert union([maps[0], Change(WHOLE, 64, 64)], 64).kind == WHOLE
    assert union([maps[0]], 65).kind == WHOLE  # a map of another shape cannot be combined


def test_union_becomes_whole_when_dense():
    numel = 100
    parts = [Change(INDICES, 20, numel, torch.arange(i, i + 20, dtype=torch.int32)) for i in (0, 50)]
    assert union(parts, numel).kind == WHOLE and union(parts, numel, dense=0.5).kind == INDICES
    assert DENSE == 0.25


def test_shapes_must_match():
    with pytest.raises(ValueError, match="cannot compare"):
        changed_indices(torch.zeros(3), torch.zeros(4), torch.bfloat16)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(0, 300), st.sampled_from([0, 0, 3, 17])), min_size=1, max_size=8),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.complex64, torch.bool]),
    moved=st.sampled_from([0, 1, 5, 50, 10_000]),
    step=st.sampled_from([1e-6, 0.5]),
    chunk=st.sampled_from([7, 64, 1 << 22]),
    group=st.sampled_from([1, 2, 128]),
    seed=st.integers(0, 2**16),
)
def test_diff_spans_is_diff_per_tensor(sizes, dtype, moved, step, chunk, group, seed):
    """Tensors compared together over one region (padding between them, chunks across their
    boundaries, chunks cut at a count of tensors beginning in them) get the maps each gets alone."""
    g = torch.Generator().manual_seed(seed)
    spans, at = [], 2
    for numel, pad in sizes:
        spans.append((at, numel))
        at += numel + pad
    a = torch.randn(at + 3, generator=g)
    a = a > 0 if dtype == torch.bool else (a * 4).long() if dtype == torch.int64 else a.to(dtype)
    b = a.clone()
    idx = torch.randint(0, at + 3, (moved,), generator=g)
    if dtype == torch.bool:
        b[idx] = ~b[idx]
    else:
        b[idx] += 1 if dtype == torch.int64 else step
    sums = [[None, 0] for _ in spans]
    got = diff_spans(a, b, spans, torch.bfloat16, chunk=chunk, sums=sums, group=group)
    cast = compare_dtype(dtype, torch.bfloat16)
    for (start, numel), c, crc in zip(spans, got, sums):
        x, y = a[start : start + numel].to(cast), b[start : start + numel].to(cast)
        assert crc == [checksum(x), checksum(y)]  # the checksums come from the same pass
        ref = diff(a[start : start + numel], b[start : start + numel], torch.bfloat16)
        assert (c.kind, c.count, c.numel) == (ref.kind, ref.count, ref.numel)
        if ref.kind == INDICES:
            assert c.indices.dtype == torch.int32 and torch.equal(c.indices, ref.indices)


def test_diff_spans_stops_when_cancelled():
    a = torch.zeros(100)
    assert diff_spans(a, a + 1, [(0, 100)], torch.bfloat16, chunk=10, cancel=lambda: True) is None


@pytest.mark.parametrize(
    "stored, reader",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.complex64, torch.complex64)],
)
def test_gather_many_is_gather_per_tensor(stored, reader):
    """One take over a region for several tensors gives what a gather per tensor gives."""
    g = torch.Generator().manual_seed(7)
    region = torch.randn(1000, generator=g).to(stored)
    tensors = [(0, 100), (128, 300), (600, 7), (700, 300)]  # (offset, numel): padding between them
    picked = [torch.randperm(n, generator=g)[: n // 3].sort().values.to(torch.int32) for _, n in tensors]
    out = torch.empty(sum(p.numel() for p in picked), dtype=reader)
    gather_many(region, [o for o, _ in tensors], [p.numel() for p in picked], torch.cat(picked), out)
    expected = torch.cat([gather(region[o : o + n], p, reader) for (o, n), p in zip(tensors, picked)])
    assert torch.equal(out.view(-1), expected)


def _regional_reference(blocks, shape, boxes):
    """What regional answers, the slow way: every changed element's coordinates, kept when inside a box."""
    flat, asked = [], 0
    for (offset, bshape), c in blocks:
        for box in boxes:
            lo = [max(o, b) for o, b in zip(offset, box[0])]
            hi = [min(o + s, b + n) for o, s, b, n in zip(offset, bshape, box[0], box[1])]
            asked += math.prod(max(0, h - lo_) for lo_, h in zip(lo, hi))
        if c.kind != INDICES:
            continue
        for i in c.indices.tolist():
            at = [int(x) + o for x, o in zip(numpy.unravel_index(i, bshape), offset)]
            if any(all(b <= x < b + n for x, b, n in zip(at, *box)) for box in boxes):
                flat.append(int(numpy.ravel_multi_index(at, shape)))
    return sorted(flat), asked


@settings(max_examples=80, deadline=None)
@given(
    split=st.integers(1, 5),
    cols=st.sampled_from([None, 3]),
    boxes=st.lists(
        st.tuples(st.integers(0, 5), st.integers(1, 6), st.integers(0, 7), st.integers(1, 8)), min_size=1, max_size=4
    ),
    seed=st.integers(0, 2**16),
)
def test_regional_keeps_what_lies_in_the_boxes_once(split, cols, boxes, seed):
    """Blocks of a (6, 8) tensor (row blocks, or row and column blocks), possibly overlapping boxes:
    the changes inside any box, once each, in flat indices of the tensor; the count asked is the
    boxes' elements the blocks hold, whichever block decides the answer."""
    shape = (6, 8)
    g = torch.Generator().manual_seed(seed)
    rows = [(0, split), (split, 6 - split)] if split < 6 else [(0, 6)]
    widths = [(0, cols), (cols, 8 - cols)] if cols else [(0, 8)]
    blocks = []
    for r0, rn in rows:
        for c0, cn in widths:
            numel = rn * cn
            idx = torch.randperm(numel, generator=g)[: numel // 5].sort().values.to(torch.int32)
            blocks.append((((r0, c0), (rn, cn)), Change(INDICES, idx.numel(), numel, idx)))
    boxes = [((r, c), (min(rn, 6 - r), min(cn, 8 - c))) for r, rn, c, cn in boxes if r < 6]
    if not boxes:
        return
    c, parts, order = regional(blocks, shape, boxes, dense=1.0)
    want, asked = _regional_reference(blocks, shape, boxes)
    assert c.numel == asked
    got = c.indices.tolist() if c.kind == INDICES else []
    assert got == want and len(set(got)) == len(got)
    if c.kind == INDICES:  # the parts gather the same elements, in the order given
        local = torch.cat([p for _, p in parts])
        assert local.numel() == len(want)
    blocks[0] = (blocks[0][0], whole(blocks[0][1].numel))  # the first block decides: the rest still counts
    c = regional(blocks, shape, boxes, dense=1.0)[0]
    if any(_overlap_any(blocks[0][0], b) for b in boxes):
        assert c.kind == WHOLE and c.numel == asked  # every box counted, not only up to the whole block


def _overlap_any(block, box):
    return all(max(o, b) < min(o + s, b + n) for o, s, b, n in zip(*block, *box))


def test_regional_answers_whole_when_the_changes_the_boxes_may_hold_pass_the_limit():
    """The bound is counted from each box's range of indices before any box is looked at: many boxes
    over a big, much changed tensor cost the searchsorted per box, not a pass over its changes each."""
    shape = (4096, 4096)
    n = shape[0] * shape[1]
    idx = torch.arange(0, n, 5, dtype=torch.int32)
    blocks = [(((0, 0), shape), Change(INDICES, idx.numel(), n, idx))]
    boxes = [((0, 0), shape)] * 64
    c, parts, _ = regional(blocks, shape, boxes, limit=1 << 22)
    assert c.kind == WHOLE and parts == []
    c, parts, _ = regional(blocks, shape, [((0, 0), (8, 4096))], limit=1 << 22)
    assert c.kind == INDICES and c.count == 8 * 4096 // 5 + 1
