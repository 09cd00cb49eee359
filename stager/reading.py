"""Read-side requests of the daemon: leases, subscriptions, and bytes for remote readers.

A lease pins a version: retention and memory reclaim skip leased versions, and a lease ends
on Release, or when the reader's process dies (the daemon drops its peer). Subscribers are
pushed an Announce per sealed version without blocking: a reader that does not drain its
socket loses announcements (ZeroMQ drops at the high-water mark), never delays the loop.
Remote readers get bytes as frames that point into the segment (no copy) when the box is
contiguous, else gathered into one buffer per item.
"""

from __future__ import annotations

import math

import torch

from stager.planning import check_box, contiguous_span
from stager.protocol import (
    Acquire, AcquireReply, Announce, ErrorCode, Message, Ok, Read, ReadReply, Release, StagerError, Subscribe,
    SubscribeReply,
)
from stager.protocol.dtypes import DTYPES
from stager.shm import block_view
from stager.versions import Version


MAX_LEASES_PER_PEER = 64
MAX_READ_BYTES = 256 << 20  # per Read reply: readers split larger tensors into row ranges


class ReadingHandlers:
    """Mixed into :class:`stager.handlers.StagingState`, whose state these methods use."""

    def latest(self) -> Version | None:
        return self.sealed[next(reversed(self.sealed))] if self.sealed else None

    def on_acquire(self, identity: bytes, msg: Acquire) -> Message:
        peer = self._peer(identity)
        if msg.step is None:
            v = self.latest()
            if v is None:
                raise StagerError(ErrorCode.NO_VERSION, "no version is sealed yet; stage one, or wait for it")
        else:
            v = self.sealed.get(msg.step)
            if v is None:
                raise StagerError(
                    ErrorCode.NO_VERSION, f"step {msg.step} is not held; sealed steps: {list(self.sealed)}")
        if len(peer.leases) >= MAX_LEASES_PER_PEER:
            raise StagerError(ErrorCode.MEMORY_LIMIT, f"this connection holds {len(peer.leases)} leases; release "
                                                      "snapshots (Snapshot.release()) before acquiring more")
        lease = next(self._lease_ids)
        self.leases[lease] = (identity, v)
        v.leases.add(lease)
        peer.leases.add(lease)
        return AcquireReply(
            lease=lease, step=v.step, seq=v.seq, segment=v.segment.name, size=v.segment.size,
            tensors=v.record.wire_tensors, objects=v.objects, model_info=v.model_info, quant=v.quant,
            partial=v.layout.partial)

    def on_subscribe(self, identity: bytes, msg: Subscribe) -> Message:
        self._peer(identity)
        self.subscribers.add(identity)
        v = self.latest()
        return SubscribeReply(step=v.step if v else None, seq=self.seq)

    def announce(self, v: Version) -> None:
        if not self.subscribers:
            return
        msg = Announce(step=v.step, seq=v.seq, tensors=len(v.layout.tensors), nbytes=v.layout.nbytes,
                       model_info=v.model_info, partial=v.layout.partial)
        for identity in list(self.subscribers):
            if not self.send(identity, msg):
                self.counters["announcements_dropped"] += 1

    def on_read(self, identity: bytes, msg: Read) -> Message:
        peer = self._peer(identity)
        if msg.lease not in peer.leases:
            raise StagerError(ErrorCode.UNKNOWN_LEASE, f"lease {msg.lease} is not held by this connection; "
                                                       "acquire the version first")
        v = self.leases[msg.lease][1]
        by_name = v.record.by_name
        if not by_name:
            by_name.update((t.fqn, t) for t in v.layout.tensors)
        total, frames = 0, []
        for fqn, offsets, sizes in msg.items:
            t = by_name.get(fqn)
            if t is None:
                raise StagerError(ErrorCode.BAD_VALUE, f"{fqn}: no such tensor in step {v.step}")
            if not t.complete:
                raise StagerError(ErrorCode.PARTIAL, f"{fqn}: this node holds only part of it")
            offsets, sizes = check_box(fqn, t.shape, offsets, sizes)
            itemsize = DTYPES[t.dtype].itemsize
            total += math.prod(sizes) * itemsize
            if total > MAX_READ_BYTES:
                raise StagerError(ErrorCode.BAD_VALUE, f"read of {total >> 20} MiB is over the {MAX_READ_BYTES >> 20} "
                                                       "MiB a reply may carry; read fewer or smaller boxes")
            frames.append((t, offsets, sizes, itemsize))
        buffer = v.segment.buffer()
        out = []
        for t, offsets, sizes, itemsize in frames:
            base = t.blocks[0].byte_offset
            span = contiguous_span(t.shape, offsets, sizes)
            if span is not None:  # zero-copy: the frame points into the segment
                out.append(buffer[base + span[0] * itemsize:base + (span[0] + span[1]) * itemsize])
                continue
            dtype = DTYPES[t.dtype]
            src = block_view(v.segment.as_bytes(), dtype, base, t.shape)
            for dim, (o, s) in enumerate(zip(offsets, sizes)):
                src = src.narrow(dim, o, s)
            gathered = bytearray(math.prod(sizes) * itemsize)
            torch.frombuffer(gathered, dtype=torch.uint8).view(dtype).view(sizes).copy_(src)
            out.append(gathered)
        self.counters["read_bytes"] += total
        reply = ReadReply(count=len(out))
        reply.frames = out
        return reply

    def on_release(self, identity: bytes, msg: Release) -> Message:
        peer = self._peer(identity)
        if msg.lease not in peer.leases:
            raise StagerError(ErrorCode.UNKNOWN_LEASE, f"lease {msg.lease} is not held by this connection")
        self._end_lease(msg.lease)
        return Ok()

    def _end_lease(self, lease: int) -> None:
        identity, v = self.leases.pop(lease, (None, None))
        if v is None:
            return
        v.leases.discard(lease)
        peer = self.peers.get(identity)
        if peer is not None:
            peer.leases.discard(lease)
        if not v.leases and v in self.orphans:
            self.orphans.discard(v)
            self._free(v, reuse=True)
        self.enforce_retention()
