"""Remote reads FP8 block-quantized where the bytes are: e4m3 plus scales cross the wire, not fp32.

A :class:`~stager.protocol.ReadItem` with a ``block`` is answered with its box quantized by
:func:`~stager.protocol.fp8_block.quantize_block_fp8` (the reference quantizer the readers and
``export-hf --quantize fp8-block`` use: the same bytes as a read-then-quantize), into a reply buffer of
:class:`~.read_cast.CastBuffers`, per request, as a cast read is: within ``--read-cast-memory`` and each
reader's share of it. One frame: the fp32 scales first (aligned for a float view), then the e4m3 box.
Each read is bounded (:func:`~stager.protocol.read_checks.check_read_fp8`): blocks of 16 x 16 or more, so the reply
stays near a byte per element; at most MAX_FP8_READ_ELEMENTS (16 Mi) elements padded to whole blocks, 0.062 CPU s
of the loop here for bf16 in 128 x 128 blocks (time.process_time around quantize_block_fp8 of a [2048, 8192]
bf16 weight, one thread, best of three; a [1, 1]-block 256 MiB read took 2.4 s); the reply, by its real
size, within half of ``--read-cast-memory`` (larger reads are refused: the reader asks ~8 MiB replies).

Per request, not once per version shared by its readers. Measured on this 2-core VM, one thread, CPU time
(``time.process_time`` around ``quantize_block_fp8`` of a 4096 x 4096 weight, three times): quantizing costs
0.86 CPU s per GiB of fp32 (2.05 per GiB of bf16), against 0.14 (0.21) for a plain cast, and it replaces
sending 4x (2x) the bytes, which over CURVE tcp cost the daemon 1.86 CPU s per GiB (BENCHMARKS.md, NIXL):
for an fp32 version a remote FP8 reader costs the daemon less CPU than before, and the reader no longer
quantizes. A per-version copy would hold a quarter (bf16: half) of each version for as long as it lives,
counted against ``--memory-limit``, written into fresh pages each step (~110 ms per 50 MiB here) whether or
not an FP8 reader comes, to save the quantization of the second and later FP8 readers of one version: worth
it only with several remote FP8 readers per version (left for when such a deployment is measured).
"""

from __future__ import annotations

import math

import torch

from stager.protocol.fp8_block import CHUNK_BYTES, E4M3, quantize_block_fp8, scale_shape
from stager.protocol.layout import narrow_box
from stager.protocol.shm import block_view


def fp8_nbytes(sizes: tuple[int, ...], block: tuple[int, int]) -> int:
    """Bytes of the reply frame of a box of ``sizes`` quantized in ``block``\\ s: scales, then e4m3 data."""
    return 4 * math.prod(scale_shape(sizes, block)) + math.prod(sizes)


def quantize_box(
    segment: torch.Tensor,
    t,
    held,
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    block,
    out: memoryview,
    rows: tuple[int, ...] | None = None,
) -> memoryview:
    """Write box ``(offsets, sizes)`` of ``held`` (a block of tensor ``t`` in ``segment``; offsets inside
    it), FP8 block-quantized in ``block``\\ s, into ``out`` (of :func:`fp8_nbytes`): returns ``out``.
    ``rows``: the box's rows are these rows of the tensor (``held`` holds them all), in this order
    (``offsets[0]`` unused): an HF view's rotary permutation, whose blocks are of the reordered rows. They
    are gathered a few MiB at a time, on whole rows of blocks (each quantized as a whole-box quantization
    does it: the same bytes)."""
    grid = scale_shape(sizes, block)
    split = 4 * math.prod(grid)
    raw = torch.frombuffer(out, dtype=torch.uint8) if len(out) else torch.empty(0, dtype=torch.uint8)
    scale_inv = raw[:split].view(torch.float32).view(grid)
    data = raw[split:].view(E4M3).view(sizes)
    whole = block_view(segment, t.torch_dtype, held.byte_offset, held.box.shape)
    if rows is None:
        quantize_block_fp8(narrow_box(whole, offsets, sizes), tuple(block), out=(data, scale_inv))
        return out
    cols = whole.narrow(1, offsets[1], sizes[1])
    order = torch.tensor(rows, dtype=torch.int64) - held.box.offset[0]  # tensor rows -> rows of the block
    # rows of blocks per gather: CHUNK_BYTES of staged bytes, one row of blocks at least (check_read_fp8
    # bounds that by MAX_FP8_WORK)
    per = max(1, CHUNK_BYTES // max(1, block[0] * sizes[1] * whole.element_size())) * block[0]
    for r in range(0, sizes[0], per):
        n = min(per, sizes[0] - r)
        part = cols.index_select(0, order[r : r + n])
        quantize_block_fp8(
            part, tuple(block), out=(data[r : r + n], scale_inv[r // block[0] : -(-(r + n) // block[0])])
        )
    return out
