"""Change maps' segment work: which tensors of two versions one compare pass covers (runs of one
dtype laid out alike in both segments), and the values a Changes reply sends, gathered per run of
one dtype in one take (:mod:`.changes` owns the maps; this module only reads segments).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import torch

from stager.protocol.changes import gather_many
from stager.protocol.shm import block_view

from .planning import NodeLayout
from .versions import Version

GAP = 1 << 16  # bytes between two tensors that one compared region may span (alignment padding is far less)
PAUSE_EVERY = 256  # tensors looked at between two calls of runs()' pause (~0.5 ms of Python here)


def boxes_of(t) -> list:
    return [b.box for b in t.blocks]


@dataclasses.dataclass(eq=False)
class Run:
    """Tensors of one stored dtype compared in one pass: ``prev`` and ``new`` are the same flat
    region of the two versions' segments, ``spans`` each tensor's (start, numel) in it."""

    dtype: torch.dtype
    fqns: list
    spans: list
    prev: torch.Tensor | None = None
    new: torch.Tensor | None = None


def runs(
    prev: NodeLayout,
    new: NodeLayout,
    prev_bytes: torch.Tensor,
    new_bytes: torch.Tensor,
    pause: Callable[[], bool] | None = None,
) -> tuple[list[Run] | None, list]:
    """The tensors of ``new`` that ``prev`` holds too (same shape and dtype), grouped into runs that
    one flat view of each segment covers: same dtype, laid out in the same order at the same
    distances in both (as one layout always is), at most GAP bytes apart. Besides, the tensors
    that are new or changed shape or dtype: (fqn, numel, dtype), read whole. ``pause``: called
    every PAUSE_EVERY tensors (the map thread waits there while a step is in flight); True stops
    the work (runs None)."""
    old = {t.fqn: t for t in prev.tensors}
    fresh, items = [], []
    for n, t in enumerate(new.tensors):
        if pause is not None and n % PAUSE_EVERY == 0 and pause():
            return None, fresh
        p = old.get(t.fqn)
        if t.complete and len(t.blocks) == 1:  # keyed by its name
            same = p is not None and p.complete and len(p.blocks) == 1 and p.shape == t.shape and p.dtype == t.dtype
            pairs = [(t.fqn, t.blocks[0], p.blocks[0] if same else None)]
        else:  # this node's part of a tensor of a job spanning nodes: a map per block, keyed (fqn, block)
            same = p is not None and p.shape == t.shape and p.dtype == t.dtype and boxes_of(p) == boxes_of(t)
            pairs = [((t.fqn, i), b, p.blocks[i] if same else None) for i, b in enumerate(t.blocks)]
        for key, block, was in pairs:
            numel = block.box.numel
            if was is None:
                fresh.append((key, numel, t.torch_dtype))
            elif numel:  # empty tensors never change (no map: unchanged)
                items.append((block.byte_offset, was.byte_offset - block.byte_offset, key, numel, t.torch_dtype))
            else:
                fresh.append((key, 0, t.torch_dtype))  # nothing to move: unchanged
    runs: list[Run] = []
    base = end = shift = 0
    for n, (off, moved, key, numel, dtype) in enumerate(sorted(items, key=lambda item: item[0])):
        if pause is not None and n % PAUSE_EVERY == PAUSE_EVERY - 1 and pause():
            return None, fresh
        run = runs[-1] if runs else None
        if run is None or run.dtype != dtype or moved != shift or not end <= off <= end + GAP:
            if run is not None:
                _seal(run, prev_bytes, new_bytes, base, end, shift)
            run = Run(dtype, [], [])
            runs.append(run)
            base, shift = off, moved
        run.fqns.append(key)
        run.spans.append(((off - base) // dtype.itemsize, numel))
        end = off + numel * dtype.itemsize
    if runs:
        _seal(runs[-1], prev_bytes, new_bytes, base, end, shift)
    return runs, fresh


def _seal(run: Run, prev_bytes: torch.Tensor, new_bytes: torch.Tensor, base: int, end: int, shift: int) -> None:
    count = (end - base) // run.dtype.itemsize
    run.new = block_view(new_bytes, run.dtype, base, (count,))
    run.prev = block_view(prev_bytes, run.dtype, base + shift, (count,))


def values(v: Version, picked: list, indices: torch.Tensor | None) -> torch.Tensor | None:
    """The values of ``picked`` (layout, indices, the dtype they go in, where: see ``_tensor``), one
    after the other as bytes, at ``indices`` (theirs, concatenated): per run of one stored dtype and
    one cast, one take over the whole segment and one cast (:func:`gather_many`)."""
    if not picked:
        return None
    out = torch.empty(sum(idx.numel() * cast.itemsize for _, idx, cast, _ in picked), dtype=torch.uint8)
    seg = v.segment.as_bytes()
    at = byte = 0
    for (stored, cast), run in itertools.groupby(picked, key=lambda p: (p[0].torch_dtype, p[2])):
        run = list(run)
        count = sum(idx.numel() for _, idx, _, _ in run)
        base = seg[: seg.numel() // stored.itemsize * stored.itemsize].view(stored)
        dst = out[byte : byte + count * cast.itemsize].view(cast)
        if all(src is None for *_, src in run):  # tensors held whole in one block: their indices are local
            offsets = [t.blocks[0].byte_offset // stored.itemsize for t, *_ in run]
            gather_many(base, offsets, [idx.numel() for _, idx, _, _ in run], indices[at : at + count], dst)
        else:  # parts of tensors (a job spanning nodes, or boxes asked): block-local positions of their own
            offsets, counts, local = [], [], []
            for t, idx, _, src in run:
                src = src or ([t.blocks[0].byte_offset // stored.itemsize], [idx.numel()], idx.to(torch.int64))
                offsets += src[0]
                counts += src[1]
                local.append(src[2])
            gather_many(base, offsets, counts, torch.cat(local), dst)
        at += count
        byte += count * cast.itemsize
    return out


def frame(flat: torch.Tensor | None) -> memoryview | bytes:
    """A reply frame of ``flat``'s bytes, without a copy (ZeroMQ holds the buffer until it is sent)."""
    if flat is None or not flat.numel():
        return b""
    return memoryview(flat.view(torch.uint8).numpy())
