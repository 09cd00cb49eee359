"""The daemon's checks of a read item before it serves it: a cast to a narrower dtype, an FP8 block-quantized box,
the rows an FP8 read gathers. Pure functions over shapes and dtypes (no I/O); each raises BAD_VALUE saying what to
change. Split from :mod:`.layout`, which defines :class:`~.layout.ReadItem` itself."""

from __future__ import annotations

import torch

from .dtypes import dtype_from_name
from .errors import ErrorCode, ProtocolError
from .layout import MAX_FP8_READ_ELEMENTS, MAX_FP8_WORK, MIN_FP8_BLOCK, Box


def fp8_padded(sizes: tuple[int, ...], block) -> int:
    """Elements an FP8 read of a 2-D box of ``sizes`` quantizes: the box padded to whole blocks (what the
    quantizer's work and temporaries grow with)."""
    return -(-sizes[0] // block[0]) * block[0] * -(-sizes[1] // block[1]) * block[1]


def check_read_fp8(
    fqn: str, have: torch.dtype, shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...], block
) -> None:
    """A read of box ``(offsets, sizes)`` of ``fqn`` FP8 block-quantized in blocks of ``block``: a 2-D
    float16/bfloat16/float32/float64 tensor, the box on whole blocks (it starts on one, and ends on
    one or at the tensor's edge: each block's scale covers what a whole-tensor quantization's does), blocks
    of at least MIN_FP8_BLOCK rows and columns, the loop's work bounded (per row of blocks, MAX_FP8_WORK
    bytes of temporaries; per read, MAX_FP8_READ_ELEMENTS). BAD_VALUE otherwise."""
    plain = {torch.float64, torch.float32, torch.float16, torch.bfloat16}
    if have not in plain or len(shape) != 2:
        raise ProtocolError(
            ErrorCode.BAD_VALUE,
            f"{fqn[:200]}: cannot read a {len(shape)}-D {have} tensor FP8 block-quantized: the daemon "
            "quantizes 2-D float64/float32/float16/bfloat16 weights; read it without a block",
        )
    if min(block) < MIN_FP8_BLOCK:
        raise ProtocolError(
            ErrorCode.BAD_VALUE,
            f"{fqn[:200]}: FP8 blocks of {list(block)} are below the {MIN_FP8_BLOCK} rows and columns the daemon "
            "quantizes in (a scale per element or few would make the reply larger than the weight): use a block of "
            f"at least [{MIN_FP8_BLOCK}, {MIN_FP8_BLOCK}] (the FP8 checkpoints use [128, 128]), or quantize on read",
        )
    # temporaries per element of a row of blocks: the zero-padded copy of an edge block (the source dtype) and
    # the scaled product, promoted to float64 for a float64 weight (fp32 otherwise)
    work = block[0] * -(-sizes[1] // block[1]) * block[1] * (have.itemsize + max(4, have.itemsize))
    if work > MAX_FP8_WORK:
        raise ProtocolError(
            ErrorCode.BAD_VALUE,
            f"{fqn[:200]}: one row of {list(block)} blocks of a box {sizes[1]} columns wide needs "
            f"{work >> 20} MiB of temporaries, over the {MAX_FP8_WORK >> 20} MiB the daemon allows: "
            "read fewer columns per box, or a smaller block",
        )
    padded = fp8_padded(sizes, block)
    if padded > MAX_FP8_READ_ELEMENTS:
        raise ProtocolError(
            ErrorCode.BAD_VALUE,
            f"{fqn[:200]}: an FP8 read of a {list(sizes)} box in {list(block)} blocks quantizes {padded} elements "
            f"(padded to whole blocks), over the {MAX_FP8_READ_ELEMENTS} one read may: split the read into smaller "
            "boxes (fewer rows each)",
        )
    for o, s, n, b in zip(offsets, sizes, shape, block):
        if o % b or (s % b and o + s != n):
            raise ProtocolError(
                ErrorCode.BAD_VALUE,
                f"{fqn[:200]}: box at {list(offsets)} of size {list(sizes)} does not lie on whole "
                f"{list(block)} blocks of shape {list(shape)}: start it on a block and end it on one "
                "or at the tensor's edge",
            )


def check_read_rows(
    fqn: str, shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...], rows: tuple[int, ...]
) -> Box:
    """An FP8 read's ``rows`` (:class:`ReadItem`): one per row of the box, each a row of the tensor. Returns
    the box of the tensor the rows lie in, the box's columns (what the node must hold in one block).
    BAD_VALUE otherwise."""
    if len(shape) != 2:
        raise ProtocolError(
            ErrorCode.BAD_VALUE,
            f"{fqn[:200]}: rows are gathered only for an FP8 read of a 2-D tensor, this one is {len(shape)}-D: "
            "read it without rows",
        )
    first, last = (min(rows), max(rows)) if rows else (0, -1)
    if len(rows) != sizes[0] or last >= shape[0]:
        raise ProtocolError(
            ErrorCode.BAD_VALUE,
            f"{fqn[:200]}: an FP8 read of {sizes[0]} rows names {len(rows)} rows of the tensor's {shape[0]}"
            + (f", up to row {last}" if rows else "")
            + ": name one row of the tensor, each below its row count, per row of the box",
        )
    return Box((first, *offsets[1:]), (last + 1 - first, *sizes[1:]))


def check_read_cast(fqn: str, have: torch.dtype, want: str) -> torch.dtype:
    """The dtype a read of ``fqn`` (of dtype ``have``) asks its bytes in, by wire name: only a plain
    floating tensor cast to a narrower plain floating dtype (what saves bytes and is exactly what the
    reader's own ``.to()`` would give); float8 data needs its scale first. BAD_VALUE otherwise."""
    to = dtype_from_name(want)
    plain = {torch.float64, torch.float32, torch.float16, torch.bfloat16}
    if have not in plain or to not in plain or to.itemsize >= have.itemsize:
        raise ProtocolError(
            ErrorCode.BAD_VALUE,
            f"{fqn[:200]}: cannot read {have} as {to}: the daemon casts only "
            "float64/float32/float16/bfloat16 tensors to a narrower one of "
            "these; read it without a dtype and cast it yourself",
        )
    return to
