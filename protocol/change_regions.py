"""Change maps of a tensor held in blocks by several nodes: one map, in flat indices of the whole tensor, from
the blocks' maps, kept to the boxes a reader reads (:func:`regional`), and whether a node's blocks hold a box
(:func:`covers`). Pure functions over :mod:`.changes`' maps; split from it (the daemon answers a job's ``changes``
requests with them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy
import torch

from .changes import DENSE, INDICES, MAX_INDEXED, WHOLE, Change, encode, whole

BoxLike = tuple[Sequence[int], Sequence[int]]  # (offset, shape) in the tensor's coordinates


def regional(
    blocks: Sequence[tuple[BoxLike, Change]],
    shape: Sequence[int],
    boxes: Sequence[BoxLike] | None = None,
    dense: float = DENSE,
    limit: int | None = None,
) -> tuple[Change, list[tuple[int, torch.Tensor]], torch.Tensor | None]:
    """One map, in flat indices of the whole tensor of ``shape``, from the maps of blocks a node
    holds of it (block-local flat indices; a job spanning nodes), only the changes inside ``boxes``
    (None: all; the caller checks that the blocks cover them: :func:`covers`). Returns the map (its
    ``numel``: the elements asked for), per block with kept changes its position in ``blocks`` and
    the block-local indices kept (to gather values from), and the order that sorts their
    concatenation (None: it is sorted). ``limit``: the most changes worth sending; when the changes
    that may lie inside the boxes (counted from each box's flat range, before any is looked at) are
    more, the map is whole. No coordinates are made: a box's changes are a range of the ascending
    indices, filtered one dimension at a time, and only the kept ones get global indices.

    >>> block = ((2,), (8,)), Change(INDICES, 1, 8, torch.tensor([1], dtype=torch.int32))
    >>> c, parts, order = regional([block], (10,))
    >>> c.kind, c.indices.tolist(), parts[0][1].tolist()
    ('indices', [3], [1])
    """
    work = []  # (position, block, its change, the boxes' parts in block coordinates: None for all of it)
    asked = 0
    for i, ((offset, bshape), c) in enumerate(blocks):
        if boxes is None:
            parts = None
            asked += math.prod(bshape)
        else:
            parts = [_clip(offset, bshape, b) for b in boxes]
            parts = [q for q in parts if q is not None]
            if not parts:
                continue
            asked += sum(math.prod(n for n in q[1]) for q in parts)
            if len(parts) == 1 and parts[0] == ((0,) * len(bshape), tuple(bshape)):
                parts = None
        work.append((i, offset, bshape, c, parts))
    if any(c.kind == WHOLE for *_, c, _ in work):
        return whole(asked), [], None
    if limit is not None:
        bound = sum(_ranged(c.indices, bshape, parts)[1] for _, _, bshape, c, parts in work if c.kind == INDICES)
        if bound > limit:
            return whole(asked), [], None
    found: list[torch.Tensor] = []
    kept: list[tuple[int, torch.Tensor]] = []
    for i, offset, bshape, c, parts in work:
        if c.kind != INDICES or not c.count:
            continue
        local = c.indices if parts is None else _inside(c.indices, bshape, parts)
        if local.numel():
            kept.append((i, local))
            found.append(_globals(local, offset, bshape, shape))
    if math.prod(shape) > MAX_INDEXED and found:
        return whole(asked), [], None
    flat = torch.cat(found) if found else torch.empty(0, dtype=torch.int64)
    order = None
    if len(found) > 1:
        flat, order = torch.sort(flat)
    c = encode(flat, asked, dense)
    return (c, kept, order) if c.kind == INDICES else (c, [], None)


def covers(held: Sequence[BoxLike], box: BoxLike) -> bool:
    """Whether the disjoint boxes ``held`` (a node's blocks of a tensor) hold all of ``box``."""
    return sum(_overlap(o, s, box) for o, s in held) == math.prod(box[1])


def _clip(offset: Sequence[int], shape: Sequence[int], box: BoxLike) -> tuple[tuple, tuple] | None:
    """The part of ``box`` inside the block at ``offset`` of ``shape``, in the block's coordinates."""
    lo = [max(o, bo) for o, bo in zip(offset, box[0])]
    hi = [min(o + s, bo + bs) for o, s, bo, bs in zip(offset, shape, box[0], box[1])]
    if any(a >= b for a, b in zip(lo, hi)):
        return None
    return tuple(a - o for a, o in zip(lo, offset)), tuple(b - a for a, b in zip(lo, hi))


def _span(bshape: Sequence[int], part: tuple) -> tuple[int, int]:
    """The flat range of the block that holds its box ``part`` (first element, one past the last)."""
    first = last = 0
    for n, o, s in zip(bshape, *part):
        first, last = first * n + o, last * n + o + s - 1
    return first, last + 1


def _ranged(indices: torch.Tensor, bshape: Sequence[int], parts: list | None) -> tuple[list[tuple[int, int]], int]:
    """Per box part, the range of the ascending ``indices`` inside its flat span; their total."""
    if parts is None:
        return [(0, indices.numel())], indices.numel()
    idx = indices.numpy()
    # one search for every bound, in the indices' own dtype (a Python int would cast the whole array)
    bounds = numpy.searchsorted(idx, numpy.array([_span(bshape, part) for part in parts], dtype=idx.dtype))
    out = [(int(a), int(b)) for a, b in bounds.tolist()]
    return out, sum(b - a for a, b in out)


def _inside(indices: torch.Tensor, bshape: Sequence[int], parts: list) -> torch.Tensor:
    """The block-local ``indices`` (ascending) inside any of the box ``parts``, ascending, once each."""
    idx = indices.numpy()
    keep = numpy.zeros(idx.size, dtype=bool)
    strides = [math.prod(bshape[d + 1 :]) for d in range(len(bshape))]
    for (a, b), part in zip(_ranged(indices, bshape, parts)[0], parts):
        if a == b:
            continue
        sub = idx[a:b].astype(numpy.int64)
        hit = numpy.ones(b - a, dtype=bool)
        for d, (n, o, s) in enumerate(zip(bshape, *part)):
            if d and (o, s) != (0, n):  # the range bounds dimension 0 already; a full dimension passes
                at = sub // strides[d] % n
                hit &= (at >= o) & (at < o + s)
        keep[a:b] |= hit
    return indices[torch.from_numpy(keep)] if not keep.all() else indices


def _globals(local: torch.Tensor, offset: Sequence[int], bshape: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Block-local flat indices as flat indices of the whole tensor (int64)."""
    local = local.to(torch.int64)
    if tuple(bshape[1:]) == tuple(shape[1:]):  # whole rows of the tensor: one shift
        return local + (offset[0] * math.prod(shape[1:]) if shape else 0)
    out = torch.zeros_like(local)
    rest = local
    for d in range(len(shape)):
        inner = math.prod(bshape[d + 1 :])
        out = out * shape[d] + (rest // inner + offset[d])
        rest = rest % inner
    return out


def _overlap(offset: Sequence[int], shape: Sequence[int], box: BoxLike) -> int:
    """Elements the box at ``offset`` of ``shape`` shares with ``box``."""
    n = 1
    for o, s, bo, bs in zip(offset, shape, box[0], box[1]):
        n *= max(0, min(o + s, bo + bs) - max(o, bo))
    return n
