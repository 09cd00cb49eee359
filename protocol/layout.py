"""Layout types both sides share: boxes, plan entries, placements, tensor layouts, read items.

A rank describes each tensor it holds as a :class:`PlanEntry`: the box of the global tensor its
local shard covers. The daemon answers with one :class:`Placement` per entry (where in the
snapshot segment the rank writes it, or None for a replica another rank writes) and serves
readers a :class:`TensorLayout` per tensor (where its blocks lie in the segment). Each type has
``to_wire()`` and ``from_wire()`` beside it; ``from_wire`` raises :class:`ProtocolError` naming
what was wrong, so nothing downstream sees a malformed value. Box arithmetic used by both sides
(:func:`check_box`, :func:`shard_box`, :func:`contiguous_span`, :func:`narrow_box`) is pure.

>>> e = PlanEntry("w", "f32", (4, 2), Box((2, 0), (2, 2)))
>>> PlanEntry.from_wire(e.to_wire()) == e
True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Iterable, Sequence

import msgpack
import torch

from .dtypes import dtype_from_name
from .errors import ErrorCode, ProtocolError, short_repr

MAX_DIMS = 64  # tensor rank accepted on the wire
FP8_READ = "f8e4m3"  # the dtype an FP8 block-quantized read (ReadItem.block) names
MAX_FP8_BLOCK = 1 << 16  # rows or columns one FP8 scale may cover
MAX_FP8_WORK = 64 << 20  # bytes of temporaries a daemon's FP8 read may need per row of blocks
# rows and columns one FP8 scale covers at least: a scale (4 bytes) per 256 elements or fewer keeps the reply
# near one byte per element (blocks of [1, 1] made it five) and the quantizer's per-block work amortized. The
# real formats (DeepSeek-V3, Qwen3-FP8) use [128, 128]; a reader wanting a smaller block quantizes itself
MIN_FP8_BLOCK = 16
# elements, padded to whole blocks, one FP8 read may quantize: ~65 ms of the daemon's loop here for bf16 (2.05
# CPU s per GiB, read_fp8.py), a 32 MiB bf16 box; readers ask ~8 MiB replies (client/readers/version.py)
MAX_FP8_READ_ELEMENTS = 1 << 24
MAX_FP8_READ_ROWS = MAX_FP8_READ_ELEMENTS // MIN_FP8_BLOCK  # rows one FP8 read may gather (each at least a block wide)


def _int_tuple(value: object, what: str, code: ErrorCode = ErrorCode.BAD_PLAN) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_DIMS or not all(type(v) is int for v in value):
        raise ProtocolError(code, f"{what} must be a list of ints (at most {MAX_DIMS}), got {short_repr(value)}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class Box:
    """A dense box of a tensor: per-dimension start offsets and sizes."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def intersects(self, other: Box) -> bool:
        return (
            all(
                a0 < b0 + bn and b0 < a0 + an
                for a0, an, b0, bn in zip(self.offset, self.shape, other.offset, other.shape)
            )
            and self.numel > 0
            and other.numel > 0
        )

    def within(self, shape: Sequence[int]) -> bool:
        return len(self.offset) == len(shape) and all(
            o >= 0 and n >= 0 and o + n <= s for o, n, s in zip(self.offset, self.shape, shape)
        )

    def contains(self, inner: Box) -> bool:
        return all(o <= i and i + n <= o + m for o, m, i, n in zip(self.offset, self.shape, inner.offset, inner.shape))


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One tensor as one rank holds it: name, wire dtype, global shape, and the box it holds."""

    fqn: str
    dtype: str
    global_shape: tuple[int, ...]
    box: Box

    def to_wire(self) -> list:
        return [self.fqn, self.dtype, list(self.global_shape), list(self.box.offset), list(self.box.shape)]

    @classmethod
    def from_wire(cls, item: object, index: int = 0) -> PlanEntry:
        if not isinstance(item, (list, tuple)) or len(item) != 5:
            raise _bad(f"plan entry {index} must be [fqn, dtype, global_shape, global_offset, local_shape]")
        fqn, dtype, gshape, offset, lshape = item
        if not isinstance(fqn, str) or not fqn:
            raise _bad(f"plan entry {index} has no tensor name")
        if not isinstance(dtype, str):
            raise _bad(f"{fqn}: dtype must be a string")
        try:
            dtype_from_name(dtype)
        except ProtocolError as exc:
            raise _bad(f"{fqn}: {exc.message}") from None
        gshape = _int_tuple(gshape, f"{fqn}: global_shape")
        box = Box(_int_tuple(offset, f"{fqn}: global_offset"), _int_tuple(lshape, f"{fqn}: local_shape"))
        if not len(gshape) == len(box.offset) == len(box.shape):
            raise _bad(
                f"{fqn}: global_shape, global_offset and local_shape must have one entry per dimension, "
                f"got {len(gshape)}, {len(box.offset)} and {len(box.shape)}"
            )
        if any(s < 0 for s in gshape):
            raise _bad(f"{fqn}: negative global shape {list(gshape)}")
        if not box.within(gshape):
            raise _bad(
                f"{fqn}: shard at offset {list(box.offset)} with shape {list(box.shape)} lies outside the "
                f"global shape {list(gshape)}; check the DTensor's placements and mesh"
            )
        return cls(fqn, dtype, gshape, box)


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_PLAN, message)


def plan_to_wire(plan: Iterable[PlanEntry]) -> list:
    return [e.to_wire() for e in plan]


def plan_from_wire(raw: object) -> tuple[PlanEntry, ...]:
    """Validate a rank's wire plan; raises ``ProtocolError(BAD_PLAN)`` naming the bad entry."""
    if not isinstance(raw, list):
        raise _bad("plan must be a list")
    entries, seen = [], set()
    for i, item in enumerate(raw):
        entry = PlanEntry.from_wire(item, i)
        if entry.fqn in seen:
            raise _bad(f"tensor {entry.fqn!r} appears twice in the plan; each name may appear once")
        seen.add(entry.fqn)
        entries.append(entry)
    return tuple(entries)


def plan_digest(plan: Iterable[PlanEntry]) -> str:
    """The digest that names a rank's plan: blake2b-128 of its msgpack wire form (both sides agree)."""
    return hashlib.blake2b(msgpack.packb(plan_to_wire(plan)), digest_size=16).hexdigest()


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a rank writes one plan entry: in the block at ``block_offset`` (bytes into the segment,
    row-major, shape ``block_shape``), starting at element offset ``inner`` of that block."""

    block_offset: int
    block_shape: tuple[int, ...]
    inner: tuple[int, ...]

    def to_wire(self) -> list:
        return [self.block_offset, list(self.block_shape), list(self.inner)]

    @classmethod
    def from_wire(cls, raw: object) -> Placement:
        if not isinstance(raw, list) or len(raw) != 3 or type(raw[0]) is not int or raw[0] < 0:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "a placement must be [block_offset, block_shape, inner]")
        shape = _int_tuple(raw[1], "placement block_shape", ErrorCode.BAD_MESSAGE)
        inner = _int_tuple(raw[2], "placement inner offset", ErrorCode.BAD_MESSAGE)
        if len(shape) != len(inner):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "placement block_shape and inner need one entry per dimension")
        return cls(raw[0], shape, inner)


Assignment = tuple  # tuple[Placement | None, ...], one per plan entry of the rank


def assignment_to_wire(assignment: Assignment) -> list:
    return [None if p is None else p.to_wire() for p in assignment]


def assignment_from_wire(raw: object) -> Assignment:
    if not isinstance(raw, list):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "an assignment must be a list of placements or None")
    return tuple(None if p is None else Placement.from_wire(p) for p in raw)


@dataclasses.dataclass(frozen=True)
class Block:
    """A dense box of one tensor stored contiguously (row-major) at ``byte_offset`` in the segment."""

    byte_offset: int
    box: Box


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """Where one tensor of a version lies in its segment: one block spanning the tensor unless the
    node holds only parts of it (the job spans nodes)."""

    fqn: str
    dtype: str
    shape: tuple[int, ...]
    blocks: tuple[Block, ...]

    @property
    def complete(self) -> bool:
        return len(self.blocks) == 1 and self.blocks[0].box.shape == self.shape

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    def block_holding(self, box: Box) -> tuple[Block, tuple[int, ...]] | None:
        """The block that holds all of ``box`` (global coordinates) and the box's offset inside
        it; None when no single block does (the box spans nodes, or this node lacks it).

        >>> t = TensorLayout("w", "f32", (4, 2), (Block(0, Box((0, 0), (2, 2))), Block(64, Box((2, 0), (2, 2)))))
        >>> t.block_holding(Box((3, 1), (1, 1)))
        (Block(byte_offset=64, box=Box(offset=(2, 0), shape=(2, 2))), (1, 1))
        """
        for b in self.blocks:
            if b.box.contains(box):
                return b, tuple(o - bo for o, bo in zip(box.offset, b.box.offset))
        return None

    @functools.cached_property
    def wire(self) -> list:  # encoded once: a layout is served to every reader of every version
        return [
            self.fqn,
            self.dtype,
            list(self.shape),
            [[b.byte_offset, list(b.box.offset), list(b.box.shape)] for b in self.blocks],
        ]

    def to_wire(self) -> list:
        return self.wire

    @classmethod
    def from_wire(cls, raw: object) -> TensorLayout:
        if not isinstance(raw, list) or len(raw) != 4 or not isinstance(raw[0], str) or not isinstance(raw[3], list):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "a tensor layout must be [fqn, dtype, shape, blocks]")
        fqn, dtype, shape, blocks = raw
        dtype_from_name(dtype)
        shape = _int_tuple(shape, f"{fqn}: shape", ErrorCode.BAD_MESSAGE)
        parsed = []
        for b in blocks:
            if not isinstance(b, list) or len(b) != 3 or type(b[0]) is not int:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{fqn}: a block must be [byte_offset, offset, shape]")
            parsed.append(
                Block(
                    b[0],
                    Box(
                        _int_tuple(b[1], f"{fqn}: block offset", ErrorCode.BAD_MESSAGE),
                        _int_tuple(b[2], f"{fqn}: block shape", ErrorCode.BAD_MESSAGE),
                    ),
                )
            )
        return cls(fqn, dtype, shape, tuple(parsed))


def layouts_to_wire(tensors: Iterable[TensorLayout]) -> list:
    return [t.wire for t in tensors]


def layouts_from_wire(raw: object) -> tuple[TensorLayout, ...]:
    if not isinstance(raw, list):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "tensors must be a list of tensor layouts")
    return tuple(TensorLayout.from_wire(t) for t in raw)


@dataclasses.dataclass(frozen=True)
class ReadItem:
    """One box of a leased tensor a remote reader asks for; ``offsets``/``sizes`` None: all of it.
    ``dtype`` (a wire name, None: the tensor's own): the bytes cast to it where they are, before the
    wire (float tensors to a narrower float: :func:`~.read_checks.check_read_cast`). Sent as a fourth element only
    when given, so an item without one encodes as before.

    ``block`` ``(rows, cols)``, with ``dtype`` ``"f8e4m3"``: the box FP8 block-quantized where it is
    (:func:`stager.protocol.fp8_block.quantize_block_fp8`, one fp32 scale per block of the box, which
    starts on a block and ends on one or at the tensor's edge: :func:`~.read_checks.check_read_fp8`); its frame holds
    the scales (row-major ``[ceil(rows / b0), ceil(cols / b1)]`` fp32) then the e4m3 box. Sent as a fifth
    element: a daemon that predates it refuses the item (BAD_MESSAGE), and the reader quantizes itself.

    ``rows`` (only with a ``block``): the box is of the tensor with its rows reordered (an HF view's rotary
    permutation of q and k), row ``i`` of the box being row ``rows[i]`` of the tensor; ``offsets``/``sizes``
    place the box in that reordered tensor (same shape), so its blocks are the reordered tensor's. The daemon
    gathers those rows, then quantizes (:func:`~.read_checks.check_read_rows`). Sent as a sixth element: a daemon that
    predates it refuses the item (BAD_MESSAGE), and the reader quantizes itself."""

    fqn: str
    offsets: tuple[int, ...] | None = None
    sizes: tuple[int, ...] | None = None
    dtype: str | None = None
    block: tuple[int, int] | None = None
    rows: tuple[int, ...] | None = None

    def to_wire(self) -> list:
        box = [
            self.fqn,
            None if self.offsets is None else list(self.offsets),
            None if self.sizes is None else list(self.sizes),
        ]
        if self.rows is not None:
            return [*box, self.dtype, list(self.block or ()), list(self.rows)]
        if self.block is not None:
            return [*box, self.dtype, list(self.block)]
        return box if self.dtype is None else [*box, self.dtype]

    @classmethod
    def from_wire(cls, item: object) -> ReadItem:
        ok = isinstance(item, list) and len(item) in (3, 4, 5, 6) and isinstance(item[0], str)
        if ok and len(item) >= 5:  # FP8: the dtype is e4m3, the block two sizes
            ok = (
                item[3] == FP8_READ
                and isinstance(item[4], list)
                and len(item[4]) == 2
                and all(type(b) is int and 0 < b <= MAX_FP8_BLOCK for b in item[4])
            )
        if ok and len(item) == 6:  # the rows gathered: ints >= 0 (their count and range: check_read_rows)
            # the count first: never walk a list longer than an FP8 read's rows can be
            ok = (
                isinstance(item[5], list)
                and len(item[5]) <= MAX_FP8_READ_ROWS
                and all(type(r) is int and r >= 0 for r in item[5])
            )
        if ok and (item[1] is None) != (item[2] is None):
            ok = False
        if ok and item[1] is not None:
            ok = (
                isinstance(item[1], list)
                and isinstance(item[2], list)
                and len(item[1]) == len(item[2]) <= MAX_DIMS
                and all(type(v) is int and v >= 0 for v in item[1] + item[2])
            )
        if not ok:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"read: item {short_repr(item)} must be [fqn, offsets, sizes] "
                "with equal-length lists of ints >= 0, or [fqn, None, None], "
                f"optionally followed by a dtype name, or by {FP8_READ!r} and an FP8 "
                f"block [rows, cols] of 1 to {MAX_FP8_BLOCK} (and optionally the box's rows, ints >= 0)",
            )
        dtype = item[3] if len(item) >= 4 else None
        if dtype is not None:
            dtype_from_name(dtype)  # the closed table: BAD_DTYPE naming the known ones
        block = (item[4][0], item[4][1]) if len(item) >= 5 else None
        rows = tuple(item[5]) if len(item) == 6 else None
        if item[1] is None:
            return cls(item[0], dtype=dtype, block=block, rows=rows)
        return cls(item[0], tuple(item[1]), tuple(item[2]), dtype, block, rows)


# ----------------------------------------------------------------------------- box arithmetic


def check_box(fqn: str, shape: tuple[int, ...], offsets, sizes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(offsets, sizes)`` of a box read from a tensor of ``shape`` (None, None: all of it),
    raising BAD_VALUE when the box does not fit."""
    if offsets is None:
        return (0,) * len(shape), tuple(shape)
    offsets, sizes = tuple(offsets), tuple(sizes)
    if (
        len(offsets) != len(shape)
        or len(sizes) != len(shape)
        or any(o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape))
    ):
        raise ProtocolError(
            ErrorCode.BAD_VALUE,
            f"{fqn}: box at {list(offsets)} of size {list(sizes)} does not fit "
            f"shape {list(shape)}; give one offset and size per dimension",
        )
    return offsets, sizes


def narrow_box(t: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    """The view of ``t`` covering the box ``offsets`` / ``sizes`` (no copy)."""
    for dim, (start, length) in enumerate(zip(offsets, sizes)):
        if start or length != t.shape[dim]:
            t = t.narrow(dim, start, length)
    return t


def shard_box(shape: tuple[int, ...], dim: int, rank: int, world: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The box of ``rank``'s shard when ``shape`` is split ``world`` ways along ``dim``, in
    ``torch.chunk`` order (as DTensor ``Shard(dim)``): chunks of ceil(n / world), the last smaller.

    >>> shard_box((10, 4), 0, 3, 4)
    ((9, 0), (1, 4))
    """
    if not 0 <= dim < len(shape) or not 0 <= rank < world:
        raise ProtocolError(
            ErrorCode.BAD_VALUE,
            f"shard=(dim={dim}, rank={rank}, world={world}) does not fit a "
            f"tensor of shape {list(shape)}; need 0 <= dim < ndim, 0 <= rank < world",
        )
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


def dense_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a contiguous (row-major) tensor of ``shape``."""
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
