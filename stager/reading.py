"""Read-side requests of the daemon: leasing sealed versions to readers and releasing them.

A lease pins a version: retention and memory reclaim skip leased versions, and a lease ends
on Release, or when the reader's process dies (the daemon drops its peer).
"""

from __future__ import annotations

from stager.protocol import Acquire, AcquireReply, ErrorCode, Message, Ok, Release, StagerError
from stager.versions import Version


MAX_LEASES_PER_PEER = 64


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
            lease=lease, step=v.step, segment=v.segment.name, size=v.segment.size,
            tensors=v.record.wire_tensors,
            objects=v.objects, model_info=v.model_info, partial=v.layout.partial)

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
