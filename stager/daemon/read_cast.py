"""Remote reads in the reader's dtype: a box cast where its bytes are, before the wire.

A reader on another host that wants bf16 from an fp32 version would otherwise receive the fp32
bytes and cast them itself: twice the bytes on the wire. A :class:`~stager.protocol.ReadItem`
with a ``dtype`` is answered with the box cast to it, per request, into a buffer of the reply's
size. Why per request and not once per version and dtype, shared by readers: the cast runs at
memory speed (~4 ms per 64 MiB of fp32 on one core here, less than the gather copy of a strided
box today's reads already make on the loop), so a cache would save little CPU but hold half a
version's bytes per dtype for as long as the version lives. The buffer is the reply's frame: it is
counted in the reader's bytes in flight (MAX_READ_IN_FLIGHT), like a gathered box, and freed once
ZeroMQ sent it. torch's cast rounds to nearest even, as the reader's own ``.to()`` does: the
bytes are identical to a read-then-cast.
"""

from __future__ import annotations

import math

import torch

from stager.protocol.layout import narrow_box
from stager.protocol.shm import block_view


def cast_box(segment: torch.Tensor, t, block, offsets: tuple[int, ...], sizes: tuple[int, ...],
             to: torch.dtype) -> bytearray:
    """The box ``(offsets, sizes)`` of ``block`` (offsets inside the block) of tensor ``t`` in
    ``segment``, cast to ``to``, row-major."""
    out = bytearray(math.prod(sizes) * to.itemsize)
    if out:
        src = narrow_box(block_view(segment, t.torch_dtype, block.byte_offset, block.box.shape), offsets, sizes)
        torch.frombuffer(out, dtype=torch.uint8).view(to).view(sizes).copy_(src)
    return out
