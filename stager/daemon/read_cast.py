"""Remote reads in the reader's dtype: a box cast where its bytes are, before the wire.

A reader on another host that wants bf16 from an fp32 version would otherwise receive the fp32
bytes and cast them itself: twice the bytes on the wire. A :class:`~stager.protocol.ReadItem`
with a ``dtype`` is answered with the box cast to it, per request, into a reply buffer.

Per request, not once per version and dtype shared by readers (measured: bench/bench_read_dtype.py,
a 104 MiB fp32 version read as bf16 by a remote reader on this 2-core VM): the cast costs the daemon
about what sending the fp32 frames did (0.034 s of CPU against 0.027 s over ipc; over CURVE tcp
0.077 s against 0.139 s, half the bytes to encrypt), once its output pages exist; what costs is
touching fresh memory (~110 ms per 50 MiB of new pages here, each page a host fault, against ~20 ms
for the cast itself). A per-version cache would pay that for every version (new bytes each step)
and hold half a version per dtype for as long as the version lives, to save a few ms per extra
reader; reply buffers reused from request to request (:class:`CastBuffers`) pay it once, hold only
what is in flight plus what was in the last seconds, and the loop's work per request stays bounded
as a gathered box's is (the reader splits reads into 64 MiB requests; the daemon refuses a cast read
of more than MAX_READ_BYTES of the segment). A buffer is the reply's frame: counted in the reader's
bytes in flight (MAX_READ_IN_FLIGHT) until ZeroMQ sent it. torch's cast rounds to nearest even, as
the reader's own ``.to()`` does: the bytes are identical to a read-then-cast.
"""

from __future__ import annotations

import math
import time

import torch

from stager.protocol.layout import narrow_box
from stager.protocol.shm import block_view

IDLE_S = 5.0  # a buffer no reply used for this long is freed
GRAIN = 1 << 20  # buffers are allocated in whole MiB, so the next request of about the same size fits
SMALL = 64 << 10  # below this a fresh buffer costs nothing worth keeping
IDLE_MAX = 256 << 20  # idle bytes kept at most (the newest idle buffers): a burst of readers leaves no more
# elements cast per call: under torch's parallel grain (32768), so each call runs on the loop's own thread. A
# cast of a whole 64 MiB request wakes torch's intra-op threads, whose idle spinning cost the daemon 4x the
# CPU of the cast itself here (bench/bench_read_dtype.py: 0.11-0.15 s against 0.03 s per 104 MiB read)
PIECE = 32768


class CastBuffers:
    """Reply buffers for cast reads, reused once ZeroMQ sent them (their pages stay mapped)."""

    def __init__(self) -> None:
        self._idle: list[tuple[bytearray, float]] = []  # (buffer, when it became idle)
        self._busy: list[tuple[bytearray, object]] = []  # (buffer, its frame's tracker, or None until sent)

    def take(self, nbytes: int) -> tuple[memoryview, bytearray | None]:
        """A writable buffer of ``nbytes`` and the pooled buffer behind it (None: a small one, not pooled);
        hand the latter to :meth:`sent` with its frame's tracker."""
        if nbytes < SMALL:
            return memoryview(bytearray(nbytes)), None
        self.reclaim()
        fits = [i for i, (b, _) in enumerate(self._idle) if len(b) >= nbytes]
        if fits:
            buf = self._idle.pop(min(fits, key=lambda i: len(self._idle[i][0])))[0]
        else:
            buf = bytearray(-(-nbytes // GRAIN) * GRAIN)
        return memoryview(buf)[:nbytes], buf

    def sent(self, buf: bytearray, tracker: object | None) -> None:
        """``buf`` is a frame ZeroMQ holds until ``tracker`` is done (None: the reply was dropped)."""
        if tracker is None:
            self._idle.append((buf, time.monotonic()))
        else:
            self._busy.append((buf, tracker))

    def reclaim(self) -> None:
        """Buffers whose frames left become idle; idle ones unused for IDLE_S are freed (every tick)."""
        now = time.monotonic()
        done = [(b, t) for b, t in self._busy if t.done]  # type: ignore[attr-defined]
        if done:
            self._busy = [(b, t) for b, t in self._busy if not t.done]  # type: ignore[attr-defined]
            self._idle += [(b, now) for b, _ in done]
        kept, total = [], 0
        for b, at in sorted(self._idle, key=lambda e: -e[1]):
            if now - at < IDLE_S and total + len(b) <= IDLE_MAX:
                kept.append((b, at))
                total += len(b)
        self._idle = kept

    def nbytes(self) -> int:
        """Bytes held: buffers in flight and idle ones."""
        return sum(len(b) for b, _ in self._busy) + sum(len(b) for b, _ in self._idle)


def cast_box(segment: torch.Tensor, t, block, offsets: tuple[int, ...], sizes: tuple[int, ...],
             to: torch.dtype, out: memoryview) -> memoryview:
    """Write the box ``(offsets, sizes)`` of ``block`` (offsets inside the block) of tensor ``t`` in
    ``segment``, cast to ``to``, row-major, into ``out`` (of its size); returns ``out``."""
    if not math.prod(sizes):
        return out
    src = narrow_box(block_view(segment, t.torch_dtype, block.byte_offset, block.box.shape), offsets, sizes)
    dst = torch.frombuffer(out, dtype=torch.uint8).view(to)
    if not src.is_contiguous():  # a box narrowed in an inner dimension (a column range): rare, cast at once
        dst.view(sizes).copy_(src)
        return out
    flat = src.reshape(-1)
    for start in range(0, flat.numel(), PIECE):
        dst[start:start + PIECE].copy_(flat[start:start + PIECE])
    return out
