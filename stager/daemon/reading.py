"""Read side: leases, subscriptions, announcements, and bytes for remote readers.

A lease pins a version: retention and memory reclaim skip leased versions, and a lease ends
on Release, or when the reader's process dies (the daemon drops its peer). Subscribers are
pushed an Announce per sealed version without blocking: a reader that does not drain its
socket loses announcements (ZeroMQ drops at the high-water mark), never delays the loop.
Remote readers get bytes as frames that point into the segment (no copy) when the box is
contiguous, else gathered into one buffer per item.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import torch

from stager.protocol import (
    Acquire,
    AcquireReply,
    Announce,
    ErrorCode,
    ErrorReply,
    Message,
    Ok,
    Read,
    ReadReply,
    Release,
    StagerError,
    Subscribe,
    SubscribeReply,
)
from stager.protocol.layout import Box, check_box, contiguous_span, narrow_box
from stager.protocol.read_checks import check_read_cast, check_read_fp8, check_read_rows
from stager.protocol.shm import block_view

from .memory import Retention
from .peers import PeerDirectory
from .read_cast import CastBuffers, cast_box
from .read_fp8 import fp8_nbytes, quantize_box
from .state import DaemonState, Outbox
from .status import ReadingStatus
from .versions import Version

MAX_LEASES_PER_PEER = 64
MAX_READ_BYTES = 256 << 20  # per Read reply: readers split larger tensors into row ranges
MAX_READ_IN_FLIGHT = 512 << 20  # reply bytes queued for one reader before its next reads wait
MAX_DEFERRED_READS = 64  # reads one reader may have waiting; more are refused
MIB = 1 << 20


def _reply_bytes(sizes: tuple[int, ...], to) -> int:
    """Bytes of a cast box's frame: ``to`` a dtype, or an FP8 block (scales and e4m3 data)."""
    return fp8_nbytes(sizes, to) if isinstance(to, tuple) else math.prod(sizes) * to.itemsize


class Subscriptions:
    """Owns subscriptions: who is pushed an Announce per sealed version."""

    def __init__(self, state: DaemonState, directory: PeerDirectory, outbox: Outbox):
        self.state = state
        self.directory = directory
        self.outbox = outbox

    def on_subscribe(self, identity: bytes, msg: Subscribe) -> Message:
        self.directory.get(identity)
        self.state.subscribers.add(identity)
        v = self.state.latest()
        return SubscribeReply(step=v.step if v else None, seq=self.state.seq)

    def announce(self, v: Version) -> None:
        state = self.state
        if not state.subscribers:
            return
        msg = Announce(
            step=v.step,
            seq=v.seq,
            tensors=len(v.layout.tensors),
            nbytes=v.layout.nbytes,
            model_info=v.model_info,
            partial=v.layout.partial,
        )
        for identity in list(state.subscribers):
            if not self.outbox.send(identity, msg):
                state.counters["announcements_dropped"] += 1

    def status(self) -> int:
        return len(self.state.subscribers)


class Reading:
    """Owns leases, and answers remote readers' byte requests. ``memory_freed`` is called when a
    lease ends and retention ran (steps waiting for memory may go on)."""

    def __init__(
        self,
        state: DaemonState,
        directory: PeerDirectory,
        memory: Retention,
        outbox: Outbox,
        *,
        memory_freed: Callable[[], None],
        cast_limit: int = 1 << 30,
    ):
        self.state = state
        self.directory = directory
        self.memory = memory
        self.outbox = outbox
        self._memory_freed = memory_freed
        self.cast_buffers = CastBuffers(cast_limit)  # --read-cast-memory: all readers' cast replies together
        self._cast_turns: deque[bytes] = deque()  # readers whose cast reads wait for buffer room, first first
        self._cast_blocked = False  # in this resume pass, a reader's turn came and its reply did not fit
        state.counters.setdefault("read_cast_waits", 0)

    def on_acquire(self, identity: bytes, msg: Acquire) -> Message:
        state = self.state
        peer = self.directory.get(identity)
        if msg.step is None:
            v = state.latest()
            if v is None:
                raise StagerError(ErrorCode.NO_VERSION, "no version is sealed yet; stage one, or wait for it")
        else:
            v = state.sealed.get(msg.step)
            if v is None:
                raise StagerError(
                    ErrorCode.NO_VERSION, f"step {msg.step} is not held; sealed steps: {list(state.sealed)[-32:]}"
                )
        if len(peer.leases) >= MAX_LEASES_PER_PEER:
            raise StagerError(
                ErrorCode.MEMORY_LIMIT,
                f"this connection holds {len(peer.leases)} leases; release "
                "snapshots (Snapshot.release()) before acquiring more",
            )
        lease = next(state.lease_ids)
        state.leases[lease] = (identity, v)
        v.leases.add(lease)
        peer.leases.add(lease)
        return AcquireReply(
            lease=lease,
            step=v.step,
            seq=v.seq,
            segment=v.segment.name,
            size=v.segment.size,
            tensors=v.layout.tensors,
            objects=v.objects,
            model_info=v.model_info,
            quant=v.quant,
            partial=v.layout.partial,
        )

    def on_read(self, identity: bytes, msg: Read) -> Message | None:
        """Reply with one frame per item. Contiguous boxes are frames pointing into the segment
        (tracked: the segment is not reused until ZeroMQ sent them). A reader with more than
        MAX_READ_IN_FLIGHT bytes of replies still queued (it does not read them) waits: its
        requests are answered in order once they drained, so one slow reader never grows the daemon."""
        peer = self.directory.get(identity)
        resumed = bool(peer.deferred_reads) and peer.deferred_reads[0] is msg
        if peer.deferred_reads and not resumed:
            return self._defer(peer, msg)  # behind earlier held-back reads: keep the order
        if msg.lease not in peer.leases:
            raise StagerError(
                ErrorCode.UNKNOWN_LEASE, f"lease {msg.lease} is not held by this connection; acquire the version first"
            )
        v = self.state.leases[msg.lease][1]
        by_name = v.record.by_name
        if not by_name:
            by_name.update((t.fqn, t) for t in v.layout.tensors)
        # reply bytes, of them cast, segment bytes read
        total = 0
        cast = 0
        scanned = 0
        boxes = []
        for item in msg.items:
            t = by_name.get(item.fqn)
            if t is None:
                raise StagerError(ErrorCode.BAD_VALUE, f"{item.fqn[:200]}: no such tensor in step {v.step}")
            offsets, sizes = check_box(t.fqn, t.shape, item.offsets, item.sizes)
            rows = item.rows
            if rows is not None:  # a box of the tensor with its rows reordered: the rows' span must be held
                held = t.block_holding(check_read_rows(t.fqn, t.shape, offsets, sizes, rows))
            else:
                held = t.block_holding(Box(offsets, sizes))
            if held is None:
                raise StagerError(
                    ErrorCode.PARTIAL,
                    f"{t.fqn}: this node holds only part of it, not all of box "
                    f"offset {list(offsets)} sizes {list(sizes)}; read each part "
                    "from the node holding it (JobInfo names them)",
                )
            if item.block is not None:  # FP8 block-quantized: scales and e4m3 data in one frame
                check_read_fp8(t.fqn, t.torch_dtype, t.shape, offsets, sizes, item.block)
                to = item.block
                nbytes = fp8_nbytes(sizes, item.block)
            else:
                to = None if item.dtype is None else check_read_cast(t.fqn, t.torch_dtype, item.dtype)
                nbytes = math.prod(sizes) * (to or t.torch_dtype).itemsize
            total, cast = total + nbytes, cast + (nbytes if to is not None else 0)
            # casts only narrow: the bytes read from the segment bound both the reply and the loop's work
            scanned += math.prod(sizes) * t.torch_dtype.itemsize
            if scanned > MAX_READ_BYTES:
                raise StagerError(
                    ErrorCode.BAD_VALUE,
                    f"read of {scanned >> 20} MiB is over the "
                    f"{MAX_READ_BYTES >> 20} MiB a reply may carry; read fewer or "
                    "smaller boxes",
                )
            boxes.append((t, held[0], held[1], sizes, to, rows))
        cast_sizes = [_reply_bytes(sizes, to) for *_, sizes, to, _ in boxes if to is not None]
        self._check_reply(total, sum(map(self.cast_buffers.footprint, cast_sizes)))
        queued = peer.read_bytes_in_flight()
        if queued and queued + total > MAX_READ_IN_FLIGHT:
            return None if resumed else self._defer(peer, msg)
        if cast_sizes and not self._cast_turn(identity, cast_sizes, resumed):
            if resumed:
                return None
            deferred = self._defer(peer, msg)
            self.state.counters["read_cast_waits"] += 1
            return deferred
        if resumed:
            peer.deferred_reads.pop(0)
        reply = ReadReply(id=msg.id, count=len(boxes))
        buffers = iter(self.cast_buffers.take(cast_sizes) if cast_sizes else ())
        pooled = {}  # frame index -> the buffer behind it
        for t, block, offsets, sizes, to, rows in boxes:
            if to is None:
                reply.frames.append(self._box_bytes(v, t, block, offsets, sizes))
                continue
            out, pooled[len(reply.frames)] = next(buffers)
            if isinstance(to, tuple):  # FP8 block-quantized (rows: only with a block)
                reply.frames.append(quantize_box(v.segment.as_bytes(), t, block, offsets, sizes, to, out, rows))
            else:
                reply.frames.append(cast_box(v.segment.as_bytes(), t, block, offsets, sizes, to, out))
        trackers = self.outbox.send_tracked(identity, reply)
        for i, buf in pooled.items():
            self.cast_buffers.sent(buf, None if trackers is None else trackers[i], identity)
        if trackers is not None:
            v.segment.inflight.extend(trackers)
            peer.reads_in_flight.append((trackers, total))
            self.state.counters["read_bytes"] += total
            self.state.counters["read_cast_bytes"] += cast
        return None

    def _check_reply(self, total: int, footprint: int) -> None:
        """Refuse a reply that could never be sent within the bounds, by its real size (an FP8 reply is
        e4m3 plus scales, a cast one the narrower dtype's bytes): over MAX_READ_IN_FLIGHT, or needing
        more cast buffers than one reply may hold (:meth:`CastBuffers.max_reply`, so that a reader that
        stops receiving it leaves room for the others). BAD_VALUE: the reader splits the read. A reply of
        the staged bytes only is bounded by MAX_READ_BYTES already, and goes alone when nothing else of
        its reader is in flight (deferred otherwise), as before casts."""
        most = self.cast_buffers.max_reply()
        if footprint > most or (footprint and total > MAX_READ_IN_FLIGHT):
            raise StagerError(
                ErrorCode.BAD_VALUE,
                f"a reply of {total / MIB:.1f} MiB ({footprint / MIB:.1f} MiB of cast buffers: cast or FP8-quantized) "
                f"is over the {most / MIB:.1f} MiB of cast buffers one reply may take (half of --read-cast-memory "
                f"{self.cast_buffers.limit / MIB:.1f} MiB) or the {MAX_READ_IN_FLIGHT >> 20} MiB a reader may have "
                "in flight: split the read into smaller boxes",
            )

    def _cast_turn(self, identity: bytes, sizes: list[int], resumed: bool) -> bool:
        """Whether a cast reply of ``sizes`` may be made for this reader now: its own cast replies in
        flight stay within its fair share of ``--read-cast-memory`` (:meth:`CastBuffers.share`), its
        buffers fit beside all readers' within the limit, and it passes no reader that waited for that
        room (waiting reads are resumed in turn, :meth:`resume_deferred`, and none after one that did
        not fit: a large reply is not starved by smaller ones). Else the reader queues for its turn
        (or, past its share, waits for its own replies to drain) and the caller defers the read."""
        turns = self._cast_turns
        while turns and not getattr(self.state.peers.get(turns[0]), "deferred_reads", None):
            turns.popleft()  # gone, or nothing left waiting
        buffers = self.cast_buffers
        readers = len(buffers.owners() | set(turns) | {identity})
        if not buffers.within_share(identity, sum(map(buffers.footprint, sizes)), readers):
            # past its fair share: it waits for its own replies to go out, and holds no turn meanwhile (a
            # reader that stopped receiving would otherwise keep every other reader's cast reads waiting)
            if identity in turns:
                turns.remove(identity)
            return False
        in_turn = not turns or (resumed and not self._cast_blocked)
        fits = in_turn and self.cast_buffers.room_for(sum(map(self.cast_buffers.footprint, sizes)))
        if in_turn and not fits:
            self._cast_blocked = True
        if fits:
            if identity in turns:
                turns.remove(identity)
        elif identity not in turns:
            turns.append(identity)
        return fits

    def _defer(self, peer, msg: Read) -> None:
        if len(peer.deferred_reads) >= MAX_DEFERRED_READS:
            raise StagerError(
                ErrorCode.MEMORY_LIMIT,
                f"{len(peer.deferred_reads)} reads are waiting while "
                f"{peer.read_bytes_in_flight() >> 20} MiB of replies are unread "
                f"(and {self.cast_buffers.busy() >> 20} MiB of cast replies to "
                "all readers are in flight, --read-cast-memory "
                f"{self.cast_buffers.limit >> 20} MiB); receive replies "
                "before sending more reads",
            )
        peer.deferred_reads.append(msg)
        return None

    def resume_deferred(self) -> None:
        """Answer held-back reads of readers whose queued replies drained (called every tick)."""
        self.cast_buffers.reclaim()
        self._cast_blocked = False
        for identity in list(dict.fromkeys([*self._cast_turns, *self.state.peers])):  # waiting for room: in turn
            peer = self.state.peers.get(identity)
            while peer is not None and peer.deferred_reads:
                head = peer.deferred_reads[0]
                try:
                    self.on_read(identity, head)
                except StagerError as exc:
                    if peer.deferred_reads and peer.deferred_reads[0] is head:
                        peer.deferred_reads.pop(0)
                    self.outbox.send(identity, ErrorReply(id=head.id, code=exc.code.value, message=exc.message))
                    continue
                if peer.deferred_reads and peer.deferred_reads[0] is head:
                    break  # still over the cap: wait for the next tick

    @staticmethod
    def _box_bytes(v: Version, t, block, offsets, sizes):
        """The bytes of box ``(offsets, sizes)`` of ``block`` (offsets inside the block)."""
        itemsize = t.torch_dtype.itemsize
        base, shape = block.byte_offset, block.box.shape
        span = contiguous_span(shape, offsets, sizes)
        if span is not None:  # zero-copy: the frame points into the segment
            return v.segment.buffer()[base + span[0] * itemsize : base + (span[0] + span[1]) * itemsize]
        src = narrow_box(block_view(v.segment.as_bytes(), t.torch_dtype, base, shape), offsets, sizes)
        gathered = bytearray(math.prod(sizes) * itemsize)
        torch.frombuffer(gathered, dtype=torch.uint8).view(t.torch_dtype).view(sizes).copy_(src)
        return gathered

    def on_release(self, identity: bytes, msg: Release) -> Message:
        peer = self.directory.get(identity)
        if msg.lease not in peer.leases:
            raise StagerError(ErrorCode.UNKNOWN_LEASE, f"lease {msg.lease} is not held by this connection")
        self.end_lease(msg.lease)
        return Ok()

    def end_lease(self, lease: int) -> None:
        state = self.state
        identity, v = state.leases.pop(lease, (None, None))
        if v is None:
            return
        v.leases.discard(lease)
        peer = state.peers.get(identity)
        if peer is not None:
            peer.leases.discard(lease)
        if not v.leases and v in state.orphans:
            state.orphans.discard(v)
            self.memory.free(v, reuse=True)
        self.memory.enforce()
        self._memory_freed()

    def status(self) -> ReadingStatus:
        peers = self.state.peers.values()
        return {
            "reads": {
                "bytes_in_flight": sum(p.read_bytes_in_flight() for p in peers),
                "deferred": sum(len(p.deferred_reads) for p in peers),
                "cast_buffers": self.cast_buffers.nbytes(),
            },
            "leases": len(self.state.leases),
        }
