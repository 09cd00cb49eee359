"""Pure shard planning: from each rank's plan to one node layout (no sockets, no shared memory).

A rank's plan lists a :class:`~stager.protocol.layout.PlanEntry` per tensor it holds: the box
of the global tensor its local shard covers. :func:`build_layout`
merges the plans of all ranks of a node into a :class:`NodeLayout`: where every tensor
lives in the node's snapshot segment, and which rank writes which region. It checks that
ranks agree on dtype and global shape, that boxes stay in bounds and never partly overlap,
and that together they cover every element (unless the job spans nodes, in which case the
version is marked partial). Identical boxes on several ranks are replicas: only the lowest
rank writes them, so every region crosses into the snapshot once per node.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from stager.protocol import ErrorCode, ProtocolError
from stager.protocol.dtypes import dtype_from_name
from stager.protocol.layout import Assignment, Block, Box, Placement, PlanEntry, TensorLayout

ALIGN = 64  # byte alignment of every block in a segment (cache line; fine for any dtype)


@dataclasses.dataclass(frozen=True)
class NodeLayout:
    """Where each tensor lives in a snapshot segment and who writes what."""

    tensors: tuple[TensorLayout, ...]
    size: int  # bytes of the segment
    nbytes: int  # payload bytes (size minus alignment padding)
    # rank -> per plan entry: None (a replica written by another rank) or where the rank writes it
    assignments: dict[int, Assignment]
    partial: bool
    written_bytes: dict[int, int] = dataclasses.field(default_factory=dict)  # rank -> bytes it writes

    def held_regions(self) -> dict[str, list]:
        """For partial layouts: ``{fqn: [[offset, shape], ...]}`` of the tensors held only in part."""
        return {
            t.fqn: [[list(b.box.offset), list(b.box.shape)] for b in t.blocks] for t in self.tensors if not t.complete
        }


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_PLAN, message)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _covered_fraction(boxes: Iterable[Box]) -> int:
    return sum(b.numel for b in boxes)


def build_layout(plans: dict[int, tuple[PlanEntry, ...]], *, full_world: bool = True) -> NodeLayout:
    """Merge the plans of every rank of a node into a :class:`NodeLayout`.

    ``full_world``: every rank of the job is on this node, so the plans must cover every tensor
    exactly; otherwise tensors may be held in part and the layout is marked partial.

    >>> p = {0: [PlanEntry("w", "f32", (4,), Box((0,), (2,)))], 1: [PlanEntry("w", "f32", (4,), Box((2,), (2,)))]}
    >>> build_layout(p).tensors[0].blocks[0].box
    Box(offset=(0,), shape=(4,))
    """
    by_fqn: dict[str, list[tuple[int, int, PlanEntry]]] = {}
    for rank in sorted(plans):
        for index, entry in enumerate(plans[rank]):
            by_fqn.setdefault(entry.fqn, []).append((rank, index, entry))

    tensors: list[TensorLayout] = []
    assignments: dict[int, list] = {rank: [None] * len(plans[rank]) for rank in plans}
    written = dict.fromkeys(plans, 0)
    offset = nbytes = 0
    partial = False
    for fqn, holders in by_fqn.items():
        first_rank, _, first = holders[0]
        for rank, _, entry in holders[1:]:
            if entry.dtype != first.dtype or entry.global_shape != first.global_shape:
                raise _bad(
                    f"{fqn}: rank {first_rank} stages {first.dtype}{list(first.global_shape)} but rank {rank} "
                    f"stages {entry.dtype}{list(entry.global_shape)}; every rank must agree on dtype and global shape"
                )
        writers: dict[Box, int] = {}  # distinct box -> lowest rank holding it (replicas dedup here)
        for rank, _, entry in holders:
            if entry.box.numel and entry.box not in writers:
                writers[entry.box] = rank
        distinct = list(writers)
        for i, a in enumerate(distinct):
            for b in distinct[i + 1 :]:
                if a.intersects(b):
                    raise _bad(
                        f"{fqn}: rank {writers[a]} holds offset {list(a.offset)} shape {list(a.shape)} and rank "
                        f"{writers[b]} holds offset {list(b.offset)} shape {list(b.shape)}: they overlap without being "
                        "replicas; shards of one tensor must tile it"
                    )
        itemsize = dtype_from_name(first.dtype).itemsize
        total = math.prod(first.global_shape)
        covered = _covered_fraction(distinct)
        if covered == total:
            block_boxes = [Box((0,) * len(first.global_shape), first.global_shape)]
        elif full_world:
            raise _bad(
                f"{fqn}: the node's ranks cover {covered} of {total} elements of shape {list(first.global_shape)} "
                f"(boxes: {[(list(b.offset), list(b.shape)) for b in distinct]}); some rank's shard is missing. "
                "If the job spans several nodes, stage with a world size larger than the local world size."
            )
        else:
            partial = True
            block_boxes = sorted(distinct, key=lambda b: b.offset)
        blocks = []
        for box in block_boxes:
            blocks.append(Block(offset, box))
            size = box.numel * itemsize
            nbytes += size
            offset += _align(size)
        if not blocks:  # an empty tensor (numel 0) still gets an entry
            blocks.append(Block(offset, Box((0,) * len(first.global_shape), first.global_shape)))
        tensors.append(TensorLayout(fqn, first.dtype, first.global_shape, tuple(blocks)))
        for rank, index, entry in holders:
            if not entry.box.numel or writers[entry.box] != rank:
                continue
            block = next(b for b in blocks if b.box.contains(entry.box))
            inner = tuple(o - bo for o, bo in zip(entry.box.offset, block.box.offset))
            assignments[rank][index] = Placement(block.byte_offset, block.box.shape, inner)
            written[rank] += entry.box.numel * itemsize
    return NodeLayout(
        tensors=tuple(tensors),
        size=max(offset, ALIGN),
        nbytes=nbytes,
        assignments={r: tuple(a) for r, a in assignments.items()},
        partial=partial,
        written_bytes=written,
    )
