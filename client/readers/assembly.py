"""Pure assembly of a multi-node version: which node serves which region of each tensor.

Each node of a job seals the regions its ranks hold (blocks of its layout). :func:`merge_layouts`
puts the nodes' layouts of one step together: it checks that the nodes agree on each tensor's
dtype and shape, keeps one copy of each region (a region several nodes hold, e.g. HSDP
replicas across nodes, is read once, from the first holder in the caller's order of
preference: the reader's own node first), and refuses a step whose regions leave a hole.
No sockets, no bytes: table-tested in ``tests/test_job_assembly.py``.
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
    fqn: str
    dtype: str
    shape: tuple[int, ...]
    regions: tuple[Region, ...]  # disjoint, covering the tensor
    # the reader's most preferred node, when it holds the tensor in one block (an assembled copy):
    # whole reads then come from there in one piece (zero-copy on its host)
    nearest_whole: str | None = None

    def layout(self) -> TensorLayout:
        """A whole-tensor layout (what a reader's view is planned from; no segment behind it)."""
        return TensorLayout(self.fqn, self.dtype, self.shape, (Block(0, Box((0,) * len(self.shape), self.shape)),))


def merge_layouts(parts: dict[str, tuple[TensorLayout, ...]], prefer: list[str], step: int) -> dict[str, MergedTensor]:
    """``{fqn: MergedTensor}`` from each node's layout of ``step`` (``parts``: node -> tensors,
    in node order), regions read from nodes in ``prefer`` order. Raises PARTIAL naming the tensor
    when the nodes' regions do not cover it, BAD_PLAN when they contradict each other.

    >>> a = (TensorLayout("w", "f32", (4,), (Block(0, Box((0,), (3,))),)),)
    >>> b = (TensorLayout("w", "f32", (4,), (Block(0, Box((3,), (1,))),)),)
    >>> [(r.box.offset, r.holders[0][0]) for r in merge_layouts({"a": a, "b": b}, ["b", "a"], 1)["w"].regions]
    [((0,), 'a'), ((3,), 'b')]
    """
    rank = {node: i for i, node in enumerate(prefer)}
    seen: dict[str, tuple[str, TensorLayout]] = {}
    candidates: dict[str, list[tuple[Box, str, Block]]] = {}
    for node, tensors in parts.items():
        for t in tensors:
            first = seen.setdefault(t.fqn, (node, t))
            if (first[1].dtype, first[1].shape) != (t.dtype, t.shape):
                raise StagerError(ErrorCode.BAD_PLAN, f"step {step}: {t.fqn} is {first[1].dtype}"
                                                      f"{list(first[1].shape)} on node {first[0]} but {t.dtype}"
                                                      f"{list(t.shape)} on node {node}; the nodes staged different "
                                                      "models under one step")
            candidates.setdefault(t.fqn, []).extend((b.box, node, b) for b in t.blocks if b.box.numel)
    out = {}
    for fqn, (_, t) in seen.items():
        boxes = candidates.get(fqn, [])
        whole = Box((0,) * len(t.shape), t.shape)
        nearest = prefer[0] if prefer and any(n == prefer[0] and b == whole for b, n, _ in boxes) else None
        out[fqn] = MergedTensor(fqn, t.dtype, t.shape, _cover(fqn, t.shape, boxes, rank, step), nearest)
    return out


def _cover(fqn: str, shape: tuple[int, ...], boxes: list[tuple[Box, str, Block]], rank: dict[str, int],
           step: int) -> tuple[Region, ...]:
    """Disjoint regions covering ``shape``, the same whatever the reader's preference (per-node
    writers plan from them): the smallest boxes first; a box equal to a kept one is another holder
    of it; one that contains kept ones (a node holding the tensor whole, ``serve --assemble-full``)
    holds them too, and the rest of it becomes new regions; one that partly overlaps a kept one
    without covering it contradicts it. Holders are sorted by preference."""
    kept: list[tuple[Box, list[tuple[str, Block]]]] = []
    for box, node, block in sorted(boxes, key=lambda c: (c[0].numel, c[0].offset, rank.get(c[1], len(rank)))):
        hits = [(kbox, holders) for kbox, holders in kept if kbox.intersects(box)]
        same = next((holders for kbox, holders in hits if kbox == box), None)
        if same is not None:
            same.append((node, block))
            continue
        for kbox, _ in hits:
            if not box.contains(kbox):
                raise StagerError(ErrorCode.BAD_PLAN, f"step {step}: {fqn}: a region at {list(box.offset)} of shape "
                                                      f"{list(box.shape)} on node {node} partly overlaps one at "
                                                      f"{list(kbox.offset)} of shape {list(kbox.shape)}; the nodes' "
                                                      "shards do not tile the tensor")
        for _, holders in hits:
            holders.append((node, block))
        kept += [(piece, [(node, block)]) for piece in subtract(box, [kbox for kbox, _ in hits])]
    total, covered = math.prod(shape), sum(b.numel for b, _ in kept)
    if covered != total:
        raise StagerError(ErrorCode.PARTIAL, f"step {step}: the nodes that answered hold {covered} of {total} "
                                             f"elements of {fqn} {list(shape)}; a node holding the rest is missing")
    regions = [Region(box, tuple(sorted(h, key=lambda nb: rank.get(nb[0], len(rank))))) for box, h in kept]
    return tuple(sorted(regions, key=lambda r: r.box.offset))


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
                    out.append(Box(tuple(offset), tuple(size[:d] + [lo - offset[d]] + size[d + 1:])))
                if hi < offset[d] + size[d]:  # and above it
                    out.append(Box(tuple(offset[:d] + [hi] + offset[d + 1:]),
                                   tuple(size[:d] + [offset[d] + size[d] - hi] + size[d + 1:])))
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
