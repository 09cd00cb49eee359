"""The READ descriptors of a box: runs of elements contiguous both in the staged block and in the
destination, so a strided box (a column shard) or a strided destination (a view of a larger
tensor, the assembler's segment) is one descriptor per run, never a temporary.

>>> paired_runs((4, 6), (1, 2), (2, 3), (3, 1))  # rows 1-2, columns 2-4 of a 4x6 block, into a dense 2x3
([8, 14], [0, 3], 3)
"""

from __future__ import annotations

import math

import torch

MAX_RUNS = 4096  # descriptors of one box; beyond, it is read into a dense temporary, or as frames


def paired_runs(
    shape: tuple[int, ...], at: tuple[int, ...], sizes: tuple[int, ...], dest_strides: tuple[int, ...]
) -> tuple[list[int], list[int], int] | None:
    """The contiguous runs of box ``(at, sizes)`` in a row-major block of ``shape`` paired with
    those of a destination of ``sizes`` with element strides ``dest_strides``: (the runs' start
    elements in the block, their start elements in the destination, in the same order, and their
    common length), or None when there are more than MAX_RUNS."""
    block_strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    k = max(_whole_from(block_strides, sizes), _whole_from(dest_strides, sizes))  # dims k.. are one run on both
    if math.prod(sizes[:k]) > MAX_RUNS:
        return None
    first = sum(a * st for a, st in zip(at, block_strides))
    return _starts(block_strides, sizes, k, first), _starts(dest_strides, sizes, k, 0), math.prod(sizes[k:])


def _whole_from(strides: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    """The first dimension from which the box's elements (of ``sizes``, laid out with ``strides``)
    are one contiguous run of memory."""
    k, expect = len(sizes), 1
    while k > 0 and (sizes[k - 1] == 1 or strides[k - 1] == expect):
        expect *= sizes[k - 1]
        k -= 1
    return k


def _starts(strides: tuple[int, ...], sizes: tuple[int, ...], k: int, first: int) -> list[int]:
    """The start elements of the runs over dimensions ``:k`` (row-major order of the box)."""
    starts = torch.zeros((), dtype=torch.int64)
    for i in range(k):
        starts = starts.unsqueeze(-1) + torch.arange(sizes[i], dtype=torch.int64) * strides[i]
    return (starts.reshape(-1) + first).tolist()
