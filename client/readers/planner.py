"""The region planner: which node serves which bytes of a version (pure functions, no sockets).

A version is a set of regions held by N >= 1 nodes (a single daemon is a one-member job). Each
node's lease answers with the blocks it holds of each tensor; :func:`merge_layouts` puts them
together: the nodes must agree on each tensor's dtype and shape, a region several nodes hold (HSDP
replicas across nodes, an assembled copy) is one region with several holders, the reader's
preferred node first, and a tensor whose regions leave a hole is refused (or, for a reader that
asked for a partial version, marked incomplete). :func:`plan_box` then maps a wanted box (a whole
tensor, a slice, a rank's shard) to reads of (node, box), and :func:`split_rows` cuts a read into
the sizes a byte source moves at once. Table-tested in ``tests/test_job_assembly.py``.
"""

from __future__ import annotations

import dataclasses
import math

from stager.protocol import Block, Box, ErrorCode, StagerError, TensorLayout


@dataclasses.dataclass(frozen=True)
class Region:
    """One distinct box of a tensor and the nodes holding it, preferred first (node, its block)."""

    box: Box
    holders: tuple[tuple[str, Block], ...]


@dataclasses.dataclass(frozen=True)
class MergedTensor:
    """A tensor of a version as the nodes hold it together."""

    fqn: str
    dtype: str
    shape: tuple[int, ...]
    regions: tuple[Region, ...]  # disjoint; they cover the tensor unless ``complete`` is False
    # the reader's most preferred node, when it holds the tensor in one block (one node's version,
    # an assembled copy): whole reads then come from there in one piece (zero-copy on its host)
    nearest_whole: str | None = None
    complete: bool = True
    whole: TensorLayout | None = None  # a node's layout holding it in one block (a one-node version's own)
    box: Box = None  # type: ignore[assignment]  # the whole tensor's box (made here when not given)

    def __post_init__(self) -> None:
        if self.box is None:
            object.__setattr__(self, "box", Box((0,) * len(self.shape), self.shape))

    def layout(self) -> TensorLayout:
        """What a reader's view is planned from: one whole block for a complete tensor, else its
        regions (then ``layout().complete`` is False and the view leaves it out)."""
        if self.complete and self.whole is not None:
            return self.whole  # its byte offset is of no concern to a view
        boxes = [self.box] if self.complete else [r.box for r in self.regions]
        return TensorLayout(self.fqn, self.dtype, self.shape, tuple(Block(0, b) for b in boxes))


@dataclasses.dataclass(frozen=True)
class Read:
    """Read ``box`` (global coordinates) of a tensor from ``node``; it lands at ``at`` in the wanted box."""

    node: str
    box: Box
    at: tuple[int, ...]


def merge_layouts(
    parts: dict[str, tuple[TensorLayout, ...]], prefer: list[str], step: int, *, holes: bool = False
) -> dict[str, MergedTensor]:
    """``{fqn: MergedTensor}`` from each node's layout of ``step`` (``parts``: node -> tensors,
    in node order), regions read from nodes in ``prefer`` order. Raises PARTIAL naming the tensor
    when the nodes' regions do not cover it (``holes``: mark it incomplete instead), BAD_PLAN when
    they contradict each other.

    >>> a = (TensorLayout("w", "f32", (4,), (Block(0, Box((0,), (3,))),)),)
    >>> b = (TensorLayout("w", "f32", (4,), (Block(0, Box((3,), (1,))),)),)
    >>> [(r.box.offset, r.holders[0][0]) for r in merge_layouts({"a": a, "b": b}, ["b", "a"], 1)["w"].regions]
    [((0,), 'a'), ((3,), 'b')]
    """
    rank = {node: i for i, node in enumerate(prefer)}
    held: dict[str, list[tuple[str, TensorLayout]]] = {}
    for node, tensors in parts.items():
        for t in tensors:
            held.setdefault(t.fqn, []).append((node, t))
    out = {}
    for fqn, holders in held.items():
        node, t = holders[0]
        block = t.blocks[0]
        if len(holders) == 1 and t.complete and block.box.numel:  # one node holds it whole: nothing to merge
            nearest = node if prefer and prefer[0] == node else None
            out[fqn] = MergedTensor(
                fqn, t.dtype, t.shape, (Region(block.box, ((node, block),)),), nearest, True, t, block.box
            )
        else:
            out[fqn] = _merge(fqn, holders, prefer, rank, step, holes)
    return out


def _merge(
    fqn: str, holders: list[tuple[str, TensorLayout]], prefer: list[str], rank: dict[str, int], step: int, holes: bool
) -> MergedTensor:
    """One tensor as several nodes (or one node's several blocks) hold it."""
    first_node, first = holders[0]
    boxes: list[tuple[Box, str, Block]] = []
    whole_layout = None
    for node, t in holders:
        if (first.dtype, first.shape) != (t.dtype, t.shape):
            raise StagerError(
                ErrorCode.BAD_PLAN,
                f"step {step}: {fqn} is {first.dtype}{list(first.shape)} on node "
                f"{first_node} but {t.dtype}{list(t.shape)} on node {node}; the "
                "nodes staged different models under one step",
            )
        if whole_layout is None and t.complete:
            whole_layout = t
        boxes.extend((b.box, node, b) for b in t.blocks if b.box.numel)
    whole = Box((0,) * len(first.shape), first.shape)
    nearest = prefer[0] if prefer and any(n == prefer[0] and b == whole for b, n, _ in boxes) else None
    regions, covered = _cover(fqn, first.shape, boxes, rank, step, holes)
    return MergedTensor(fqn, first.dtype, first.shape, regions, nearest, covered, whole_layout, whole)


def _cover(
    fqn: str, shape: tuple[int, ...], boxes: list[tuple[Box, str, Block]], rank: dict[str, int], step: int, holes: bool
) -> tuple[tuple[Region, ...], bool]:
    """Disjoint regions covering ``shape``, the same whatever the reader's preference (per-node
    writers plan from them): the smallest boxes first; a box equal to a kept one is another holder
    of it; one that contains kept ones (a node holding the tensor whole, ``serve --assemble-full``)
    holds them too, and the rest of it becomes new regions; one that partly overlaps a kept one
    without covering it contradicts it. Holders are sorted by preference. Also says whether the
    regions cover the tensor."""
    kept: list[tuple[Box, list[tuple[str, Block]]]] = []
    for box, node, block in sorted(boxes, key=lambda c: (c[0].numel, c[0].offset, rank.get(c[1], len(rank)))):
        hits = [(kbox, holders) for kbox, holders in kept if kbox.intersects(box)]
        same = next((holders for kbox, holders in hits if kbox == box), None)
        if same is not None:
            same.append((node, block))
            continue
        for kbox, _ in hits:
            if not box.contains(kbox):
                raise StagerError(
                    ErrorCode.BAD_PLAN,
                    f"step {step}: {fqn}: a region at {list(box.offset)} of shape "
                    f"{list(box.shape)} on node {node} partly overlaps one at "
                    f"{list(kbox.offset)} of shape {list(kbox.shape)}; the nodes' "
                    "shards do not tile the tensor",
                )
        for _, holders in hits:
            holders.append((node, block))
        kept += [(piece, [(node, block)]) for piece in subtract(box, [kbox for kbox, _ in hits])]
    total, covered = math.prod(shape), sum(b.numel for b, _ in kept)
    if covered != total and not holes:
        raise StagerError(
            ErrorCode.PARTIAL,
            f"step {step}: the nodes that answered hold {covered} of {total} "
            f"elements of {fqn} {list(shape)}; a node holding the rest is missing",
        )
    regions = [Region(box, tuple(sorted(h, key=lambda nb: rank.get(nb[0], len(rank))))) for box, h in kept]
    return tuple(sorted(regions, key=lambda r: r.box.offset)), covered == total


def plan_box(m: MergedTensor, want: Box) -> list[Read]:
    """The reads that fill box ``want`` of ``m``: one, from the nearest node holding the tensor
    whole or the first holder of a region containing the box; else one per region it crosses,
    each from the region's first holder (replicas are read once). An empty box needs no read.

    >>> w = merge_layouts({"a": (TensorLayout("w", "f32", (4,), (Block(0, Box((0,), (2,))),)),),
    ...                    "b": (TensorLayout("w", "f32", (4,), (Block(0, Box((2,), (2,))),)),)}, ["a", "b"], 1)["w"]
    >>> [(r.node, r.box.offset, r.at) for r in plan_box(w, Box((1,), (2,)))]
    [('a', (1,), (0,)), ('b', (2,), (1,))]
    """
    if not want.numel:
        return []
    holder = m.nearest_whole or next((r.holders[0][0] for r in m.regions if r.box.contains(want)), None)
    if holder is not None:
        return [Read(holder, want, (0,) * len(want.shape))]
    reads = []
    for r in m.regions:
        part = intersect(r.box, want)
        if part is not None and part.numel:
            reads.append(Read(r.holders[0][0], part, tuple(p - w for p, w in zip(part.offset, want.offset))))
    return reads


def split_rows(box: Box, itemsize: int, limit: int) -> list[Box]:
    """``box`` as row ranges (dimension 0) of at most ``limit`` bytes each, a row at least.

    >>> [b.shape for b in split_rows(Box((0, 0), (5, 4)), 4, 32)]
    [(2, 4), (2, 4), (1, 4)]
    """
    nbytes = box.numel * itemsize
    if nbytes <= limit or not box.shape or box.shape[0] <= 1:
        return [box]
    rows = max(1, limit // (nbytes // box.shape[0]))
    return [
        Box((box.offset[0] + start, *box.offset[1:]), (min(rows, box.shape[0] - start), *box.shape[1:]))
        for start in range(0, box.shape[0], rows)
    ]


def placement(merged: dict[str, MergedTensor]) -> dict[str, list[tuple[tuple[int, ...], tuple[int, ...], list[str]]]]:
    """Per tensor its regions ``(offset, shape, [nodes holding it])``: what per-node writers plan from."""
    return {
        fqn: [(r.box.offset, r.box.shape, sorted(n for n, _ in r.holders)) for r in m.regions]
        for fqn, m in merged.items()
    }


def subtract(box: Box, holes: list[Box]) -> list[Box]:
    """``box`` minus disjoint ``holes`` inside it, as disjoint boxes (slabs: at most two per
    dimension per hole).

    >>> subtract(Box((0, 0), (6, 4)), [Box((2, 0), (2, 4))])
    [Box(offset=(0, 0), shape=(2, 4)), Box(offset=(4, 0), shape=(2, 4))]
    """
    pieces = [box]
    for hole in holes:
        out = []
        for piece in pieces:
            cut = intersect(piece, hole)
            if cut is None:
                out.append(piece)
                continue
            offset, size = list(piece.offset), list(piece.shape)
            for d in range(len(size)):
                lo, hi = cut.offset[d], cut.offset[d] + cut.shape[d]
                if lo > offset[d]:  # the slab below the hole in dimension d
                    out.append(Box(tuple(offset), tuple(size[:d] + [lo - offset[d]] + size[d + 1 :])))
                if hi < offset[d] + size[d]:  # and above it
                    out.append(
                        Box(
                            tuple(offset[:d] + [hi] + offset[d + 1 :]),
                            tuple(size[:d] + [offset[d] + size[d] - hi] + size[d + 1 :]),
                        )
                    )
                offset[d], size[d] = lo, hi - lo  # narrow to the hole and go on with the next dimension
        pieces = out
    return pieces


def intersect(a: Box, b: Box) -> Box | None:
    """The box both ``a`` and ``b`` cover (None: none).

    >>> intersect(Box((0, 0), (4, 4)), Box((2, 3), (4, 4)))
    Box(offset=(2, 3), shape=(2, 1))
    """
    offset = tuple(max(x, y) for x, y in zip(a.offset, b.offset))
    end = tuple(min(x + n, y + m) for x, n, y, m in zip(a.offset, a.shape, b.offset, b.shape))
    if any(e <= o for o, e in zip(offset, end)):
        return None
    return Box(offset, tuple(e - o for o, e in zip(offset, end)))


def complete_steps(sealed: dict[str, list[int]], failed: dict[str, list[int]]) -> list[int]:
    """Steps every node listed in ``sealed`` holds sealed and none failed, oldest first.

    >>> complete_steps({"a": [1, 2, 3], "b": [2, 3]}, {"b": [1]})
    [2, 3]
    """
    if not sealed:
        return []
    steps = set.intersection(*(set(s) for s in sealed.values()))
    steps -= {s for f in failed.values() for s in f}
    return sorted(steps)


def incomplete_reason(step: int, nodes: dict[str, dict[str, list[int]]], down: dict[str, str]) -> str:
    """Why ``step`` is not complete, naming the nodes (for NO_VERSION errors and status).

    >>> incomplete_reason(4, {"a": {"sealed": [4]}, "b": {"failed": [4]}, "c": {"staging": [4]}}, {"d": "gone"})
    'node b failed it; node c is still staging it; node d does not answer (gone)'
    """
    parts = []
    for node, kinds in nodes.items():
        if step in kinds.get("failed", ()):
            parts.append(f"node {node} failed it")
        elif step in kinds.get("sealed", ()):
            continue
        elif step in kinds.get("staging", ()):
            parts.append(f"node {node} is still staging it")
        else:
            parts.append(f"node {node} does not hold it")
    parts += [f"node {node} does not answer ({why})" for node, why in down.items()]
    return "; ".join(parts) or "every node holds it"
