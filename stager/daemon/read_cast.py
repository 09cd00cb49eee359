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
bytes in flight (MAX_READ_IN_FLIGHT) until ZeroMQ sent it, and with every reader's, in flight and
idle, within ``--read-cast-memory`` (heap, beyond ``--memory-limit``: a cast read past it waits).
torch's cast rounds to nearest even, as the reader's own ``.to()`` does: the bytes are identical to
a read-then-cast.
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
    """Reply buffers for cast reads, reused once ZeroMQ sent them (their pages stay mapped), all of them
    (in flight and idle) within ``limit`` bytes (``--read-cast-memory``): the daemon's heap, beyond
    ``--memory-limit``. Idle buffers are a cache and go first; a reply whose buffers would take those
    in flight past the limit waits (:meth:`room_for`, the caller defers the read)."""

    def __init__(self, limit: int = 1 << 30) -> None:
        self.limit = limit
        self._idle: list[tuple[bytearray, float]] = []  # (buffer, when it became idle)
        self._busy: list[tuple[bytearray, object, object]] = []  # (buffer, its frame's tracker, its reader)

    @staticmethod
    def footprint(nbytes: int) -> int:
        """Bytes a buffer for a cast of ``nbytes`` holds (small ones exactly, others in whole GRAINs)."""
        return nbytes if nbytes < SMALL else -(-nbytes // GRAIN) * GRAIN

    def busy(self, owner: object = None) -> int:
        """Bytes of buffers whose frames ZeroMQ still holds (``owner``: only those of that reader)."""
        return sum(len(b) for b, _, o in self._busy if owner is None or o == owner)

    def owners(self) -> set:
        """The readers (connections) with buffers in flight."""
        return {o for _, _, o in self._busy}

    def max_reply(self) -> int:
        """The largest footprint one reply may need: half the limit. A larger read is refused (the reader
        splits it), so a reader that stops receiving a reply of the largest size still leaves room for
        another's reply of any allowed size (the caller refuses, :meth:`room_for` does not check)."""
        return self.limit // 2

    def room_for(self, footprint: int) -> bool:
        """Whether a reply needing ``footprint`` bytes of buffers may be cast now: with those in flight,
        within the limit (a read that does not fit is made to wait, never refused for it)."""
        self.reclaim()
        return self.busy() + footprint <= self.limit

    def share(self, readers: int) -> int:
        """The bytes one reader's cast replies may hold in flight while ``readers`` readers cast (those with
        buffers in flight or reads waiting for room, the asking one included): the limit over one more than
        them, so a reader that stops receiving its replies keeps at most that share, and another (a newcomer
        too) always finds room beside it. A reader alone keeps half the limit: a window of several replies
        of the size readers ask (client/readers/sources.py, CAST_CHUNK_BYTES). A reader with none in flight
        may send one reply up to :meth:`max_reply` (:meth:`within_share`): the floor."""
        return self.limit // (max(readers, 1) + 1)

    def within_share(self, owner: object, footprint: int, readers: int) -> bool:
        """Whether reader ``owner`` may have a reply needing ``footprint`` bytes more in flight (its own share;
        the limit over all readers is :meth:`room_for`'s)."""
        self.reclaim()
        own = self.busy(owner)
        if not own:  # the floor: one reply, at most half the limit, so a stalled one never fills it alone
            return footprint <= self.max_reply()
        return own + footprint <= self.share(readers)

    def take(self, sizes: list[int]) -> list[tuple[memoryview, bytearray]]:
        """A writable buffer per cast item of one reply (``sizes`` bytes each) and the buffer behind it;
        hand each of the latter to :meth:`sent` with its frame's tracker. Reuses idle buffers that fit
        (the smallest) as long as the reply stays within what :meth:`room_for` allowed."""
        self.reclaim()
        footprints = [self.footprint(n) for n in sizes]
        busy = self.busy()
        rest = sum(footprints)
        taken = 0
        room = max(rest, self.limit - busy)  # what this reply's buffers may hold together
        out = []
        for nbytes, size in zip(sizes, footprints):
            rest -= size  # what the items after this one need at least
            fits = [i for i, (b, _) in enumerate(self._idle) if size <= len(b) <= room - taken - rest]
            if size >= SMALL and fits:
                buf = self._idle.pop(min(fits, key=lambda i: len(self._idle[i][0])))[0]
            else:  # a new one: the idle cache makes its room first
                self._trim_idle(self.limit - busy - taken - size - rest)
                buf = bytearray(size)
            taken += len(buf)
            out.append((memoryview(buf)[:nbytes], buf))
        return out

    def sent(self, buf: bytearray, tracker: object | None, owner: object = None) -> None:
        """``buf`` is a frame ZeroMQ holds until ``tracker`` is done (None: the reply was dropped), sent to
        reader ``owner`` (its connection: what :meth:`busy` counts per reader)."""
        if tracker is not None:
            self._busy.append((buf, tracker, owner))
        elif len(buf) >= SMALL:
            self._idle.append((buf, time.monotonic()))

    def reclaim(self) -> None:
        """Buffers whose frames left become idle (small ones are dropped); idle ones unused for IDLE_S,
        or past IDLE_MAX or the limit (newest kept), are freed (every tick)."""
        if not self._busy and not self._idle:  # the usual tick: no cast reply since the buffers were freed
            return
        now = time.monotonic()
        done = [b for b, t, _ in self._busy if t.done]  # type: ignore[attr-defined]
        if done:
            self._busy = [e for e in self._busy if not e[1].done]  # type: ignore[attr-defined]
            self._idle += [(b, now) for b in done if len(b) >= SMALL]
        self._idle = [(b, at) for b, at in self._idle if now - at < IDLE_S]
        self._trim_idle(min(IDLE_MAX, self.limit - self.busy()))

    def _trim_idle(self, keep: int) -> None:
        """Free idle buffers, oldest first, until at most ``keep`` bytes of them are left."""
        kept, total = [], 0
        for b, at in sorted(self._idle, key=lambda e: -e[1]):
            if total + len(b) <= keep:
                kept.append((b, at))
                total += len(b)
        self._idle = kept

    def nbytes(self) -> int:
        """Bytes held: buffers in flight and idle ones."""
        return self.busy() + sum(len(b) for b, _ in self._idle)


def cast_box(
    segment: torch.Tensor, t, block, offsets: tuple[int, ...], sizes: tuple[int, ...], to: torch.dtype, out: memoryview
) -> memoryview:
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
        dst[start : start + PIECE].copy_(flat[start : start + PIECE])
    return out
