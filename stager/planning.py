"""Pure shard planning: from each rank's plan to one node layout (no sockets, no shared memory).

A rank's plan lists, per tensor it holds, ``[fqn, dtype, global_shape, global_offset,
local_shape]``: the box of the global tensor its local shard covers. :func:`build_layout`
merges the plans of all ranks of a node into a :class:`NodeLayout`: where every tensor
lives in the node's snapshot segment, and which rank writes which region. It checks that
ranks agree on dtype and global shape, that boxes stay in bounds and never partly overlap,
and that together they cover every element (unless the job spans nodes, in which case the
version is marked partial). Identical boxes on several ranks are replicas: only the lowest
rank writes them, so every region crosses into the snapshot once per node.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Iterable, Sequence

import msgpack

from stager.protocol import ErrorCode, ProtocolError
from stager.protocol.dtypes import dtype_from_name

ALIGN = 64  # byte alignment of every block in a segment (cache line; fine for any dtype)


@dataclasses.dataclass(frozen=True)
class Box:
    """A dense box of a tensor: per-dimension start offsets and sizes."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def intersects(self, other: "Box") -> bool:
        return all(
            a0 < b0 + bn and b0 < a0 + an
            for a0, an, b0, bn in zip(self.offset, self.shape, other.offset, other.shape)
        ) and self.numel > 0 and other.numel > 0

    def within(self, shape: Sequence[int]) -> bool:
        return len(self.offset) == len(shape) and all(
            o >= 0 and n >= 0 and o + n <= s for o, n, s in zip(self.offset, self.shape, shape)
        )


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One tensor as one rank holds it."""

    fqn: str
    dtype: str
    global_shape: tuple[int, ...]
    box: Box


@dataclasses.dataclass(frozen=True)
class Block:
    """A dense box of one tensor stored contiguously (row-major) at ``byte_offset`` in the segment."""

    byte_offset: int
    box: Box


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    fqn: str
    dtype: str
    shape: tuple[int, ...]
    blocks: tuple[Block, ...]  # one block spanning the tensor unless the node holds only part

    @property
    def complete(self) -> bool:
        return len(self.blocks) == 1 and self.blocks[0].box.shape == self.shape

    def to_wire(self) -> list:
        return [self.fqn, self.dtype, list(self.shape),
                [[b.byte_offset, list(b.box.offset), list(b.box.shape)] for b in self.blocks]]


@dataclasses.dataclass(frozen=True)
class NodeLayout:
    """Where each tensor lives in a snapshot segment and who writes what."""

    tensors: tuple[TensorLayout, ...]
    size: int  # bytes of the segment
    nbytes: int  # payload bytes (size minus alignment padding)
    # rank -> per plan entry: None (a replica written by another rank) or
    # (block byte offset, block shape, offset of the rank's box inside the block)
    assignments: dict[int, tuple]
    partial: bool
    written_bytes: dict[int, int] = dataclasses.field(default_factory=dict)  # rank -> bytes it writes

    def held_regions(self) -> dict[str, list]:
        """For partial layouts: ``{fqn: [[offset, shape], ...]}`` of the tensors held only in part."""
        return {t.fqn: [[list(b.box.offset), list(b.box.shape)] for b in t.blocks]
                for t in self.tensors if not t.complete}


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_PLAN, message)


def _int_tuple(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise _bad(f"{what} must be a list of ints, got {value!r}")
    return tuple(value)


def parse_plan(rank: int, plan: object) -> list[PlanEntry]:
    """Validate one rank's wire plan; raises ``ProtocolError(BAD_PLAN)`` naming the bad entry."""
    if not isinstance(plan, list):
        raise _bad(f"rank {rank}: plan must be a list")
    entries: list[PlanEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(plan):
        if not isinstance(item, (list, tuple)) or len(item) != 5:
            raise _bad(f"rank {rank}: plan entry {i} must be [fqn, dtype, global_shape, global_offset, local_shape]")
        fqn, dtype, gshape, offset, lshape = item
        if not isinstance(fqn, str) or not fqn:
            raise _bad(f"rank {rank}: plan entry {i} has no tensor name")
        if fqn in seen:
            raise _bad(f"rank {rank}: tensor {fqn!r} appears twice in the plan; each name may appear once")
        seen.add(fqn)
        if not isinstance(dtype, str):
            raise _bad(f"rank {rank}: {fqn}: dtype must be a string")
        try:
            dtype_from_name(dtype)
        except ProtocolError as exc:
            raise _bad(f"rank {rank}: {fqn}: {exc.message}") from None
        gshape = _int_tuple(gshape, f"rank {rank}: {fqn}: global_shape")
        box = Box(_int_tuple(offset, f"rank {rank}: {fqn}: global_offset"),
                  _int_tuple(lshape, f"rank {rank}: {fqn}: local_shape"))
        if not len(gshape) == len(box.offset) == len(box.shape):
            raise _bad(f"rank {rank}: {fqn}: global_shape, global_offset and local_shape must have one entry "
                       f"per dimension, got {len(gshape)}, {len(box.offset)} and {len(box.shape)}")
        if any(s < 0 for s in gshape):
            raise _bad(f"rank {rank}: {fqn}: negative global shape {list(gshape)}")
        if not box.within(gshape):
            raise _bad(
                f"rank {rank}: {fqn}: shard at offset {list(box.offset)} with shape {list(box.shape)} "
                f"lies outside the global shape {list(gshape)}; check the DTensor's placements and mesh"
            )
        entries.append(PlanEntry(fqn, dtype, gshape, box))
    return entries


def plan_digest(plan: list) -> str:
    """The digest that names a rank's plan: blake2b-128 of its msgpack encoding (clients and daemon agree)."""
    return hashlib.blake2b(msgpack.packb(plan), digest_size=16).hexdigest()


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _covered_fraction(boxes: Iterable[Box]) -> int:
    return sum(b.numel for b in boxes)


def build_layout(plans: dict[int, list[PlanEntry]], *, full_world: bool = True) -> NodeLayout:
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
            for b in distinct[i + 1:]:
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
            block = next(b for b in blocks if _contains(b.box, entry.box))
            inner = tuple(o - bo for o, bo in zip(entry.box.offset, block.box.offset))
            assignments[rank][index] = (block.byte_offset, block.box.shape, inner)
            written[rank] += entry.box.numel * itemsize
    return NodeLayout(
        tensors=tuple(tensors),
        size=max(offset, ALIGN),
        nbytes=nbytes,
        assignments={r: tuple(a) for r, a in assignments.items()},
        partial=partial,
        written_bytes=written,
    )


def _contains(outer: Box, inner: Box) -> bool:
    return all(
        o <= i and i + n <= o + m for o, m, i, n in zip(outer.offset, outer.shape, inner.offset, inner.shape)
    )


def assignment_to_wire(assignment: tuple) -> list:
    return [None if a is None else [a[0], list(a[1]), list(a[2])] for a in assignment]


# ----------------------------------------------------------------------------- read boxes


def check_box(fqn: str, shape: tuple[int, ...], offsets, sizes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(offsets, sizes)`` of a box read from a tensor of ``shape`` (None, None: all of it),
    raising BAD_VALUE when the box does not fit."""
    if offsets is None:
        return (0,) * len(shape), tuple(shape)
    offsets, sizes = tuple(offsets), tuple(sizes)
    if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
            o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)):
        raise ProtocolError(ErrorCode.BAD_VALUE, f"{fqn}: box at {list(offsets)} of size {list(sizes)} does not fit "
                                                 f"shape {list(shape)}; give one offset and size per dimension")
    return offsets, sizes


def shard_box(shape: tuple[int, ...], dim: int, rank: int, world: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The box of ``rank``'s shard when ``shape`` is split ``world`` ways along ``dim``, in
    ``torch.chunk`` order (as DTensor ``Shard(dim)``): chunks of ceil(n / world), the last smaller.

    >>> shard_box((10, 4), 0, 3, 4)
    ((9, 0), (1, 4))
    """
    if not 0 <= dim < len(shape) or not 0 <= rank < world:
        raise ProtocolError(ErrorCode.BAD_VALUE, f"shard=(dim={dim}, rank={rank}, world={world}) does not fit a "
                                                 f"tensor of shape {list(shape)}; need 0 <= dim < ndim, 0 <= rank < world")
    chunk = -(-shape[dim] // world)
    start = min(rank * chunk, shape[dim])
    length = min(chunk, shape[dim] - start)
    offsets = tuple(start if d == dim else 0 for d in range(len(shape)))
    sizes = tuple(length if d == dim else n for d, n in enumerate(shape))
    return offsets, sizes


def contiguous_span(shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[int, int] | None:
    """``(first element, element count)`` when the box is one contiguous run of the row-major
    tensor (a slice of leading rows, or of one row, ...), else None.

    >>> contiguous_span((4, 3), (1, 0), (2, 3)), contiguous_span((4, 3), (0, 1), (2, 2))
    ((3, 6), None)
    """
    count = math.prod(sizes)
    if count == 0:
        return 0, 0
    # the box is contiguous iff, past its first dimension of size > 1, every dimension is whole
    dims = [d for d, s in enumerate(sizes) if s != 1]
    if dims and any(sizes[d] != shape[d] for d in range(dims[0] + 1, len(shape))):
        return None
    start, stride = 0, 1
    for d in reversed(range(len(shape))):
        start += offsets[d] * stride
        stride *= shape[d]
    return start, count
