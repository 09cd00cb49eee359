"""Reading sealed versions: ``Subscriber(endpoint).latest()`` -> a read-only, zero-copy snapshot."""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping
from typing import Iterator

import torch

from stager.protocol import Acquire, AcquireReply, ErrorCode, Release, StagerError
from stager.protocol.dtypes import DTYPES
from stager.shm import SHM_DIR, block_view, map_segment

from .connection import Connection

log = logging.getLogger("stager.client")


class Snapshot(Mapping):
    """A leased, sealed version: ``{fqn: tensor}``, read-only views of the daemon's shared memory.

    ``step``, ``objects`` (non-tensor leaves), ``model_info`` and ``partial`` describe it. The lease
    (and the memory behind the tensors) is held until :meth:`release`, the end of a ``with`` block,
    or the reader's exit; tensors must not be used after that.

    >>> with Subscriber().latest() as snap:  # doctest: +SKIP
    ...     w = snap["layers.0.weight"].clone()
    """

    def __init__(self, subscriber: "Subscriber", reply: AcquireReply, seg: torch.Tensor):
        self._subscriber, self.lease = subscriber, reply.lease
        self.step, self.objects, self.model_info = reply.step, reply.objects, reply.model_info
        self.partial = reply.partial
        self._tensors: dict[str, torch.Tensor] = {}
        self._regions: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = {}
        for fqn, dtype, shape, blocks in reply.tensors:
            regions = [(tuple(off), block_view(seg, DTYPES[dtype], byte_offset, block_shape))
                       for byte_offset, off, block_shape in blocks]
            self._regions[fqn] = regions
            if len(regions) == 1 and list(regions[0][1].shape) == list(shape):
                self._tensors[fqn] = regions[0][1]
        self._released = False

    def __getitem__(self, fqn: str) -> torch.Tensor:
        self._check()
        try:
            return self._tensors[fqn]
        except KeyError:
            if fqn in self._regions:
                raise StagerError(ErrorCode.PARTIAL, f"{fqn}: this node holds only part of it; use regions({fqn!r})") from None
            raise

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def regions(self, fqn: str) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        """``[(global_offset, tensor)]`` of the parts of ``fqn`` this version holds."""
        self._check()
        return list(self._regions[fqn])

    def _check(self) -> None:
        if self._released:
            raise StagerError(ErrorCode.UNKNOWN_LEASE, f"snapshot of step {self.step} was released")

    def release(self) -> None:
        """End the lease: the daemon may reuse the memory, so drop the tensors first."""
        if not self._released:
            self._released = True
            self._tensors.clear()
            self._regions.clear()
            self._subscriber._release(self.lease)

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Snapshot(step={self.step}, tensors={len(self._regions)}, partial={self.partial})"


class Subscriber:
    """Reads sealed versions from the node's daemon.

    >>> sub = Subscriber()  # doctest: +SKIP
    >>> snap = sub.latest(); print(snap.step, list(snap)[:3]); snap.release()  # doctest: +SKIP
    """

    def __init__(self, endpoint: str | None = None, *, timeout: float = 10.0):
        self.timeout = timeout
        self._conn = Connection(endpoint, role="reader")
        self._segments: dict[str, torch.Tensor] = {}
        self._leases: set[int] = set()
        self._finalizer = weakref.finalize(self, Connection.close, self._conn)

    def latest(self, view: str = "native", *, allow_partial: bool = False) -> Snapshot:
        """Lease the newest sealed version."""
        return self._acquire(None, view, allow_partial)

    def at(self, step: int, view: str = "native", *, allow_partial: bool = False) -> Snapshot:
        """Lease the sealed version of ``step``."""
        return self._acquire(step, view, allow_partial)

    def _acquire(self, step: int | None, view: str, allow_partial: bool) -> Snapshot:
        if view != "native":
            raise ValueError(f"view {view!r} is not available; this release serves view='native'")
        reply = self._conn.request(Acquire(step=step), self.timeout)
        if not isinstance(reply, AcquireReply):
            raise StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {reply.TYPE} reply to acquire")
        if reply.partial and not allow_partial:
            self._release(reply.lease)
            raise StagerError(
                ErrorCode.PARTIAL,
                f"step {reply.step} holds only part of some tensors (the job spans nodes); pass "
                "allow_partial=True and read them with Snapshot.regions()",
            )
        # mappings of segments the daemon unlinked would keep their memory alive: drop them
        for name in [n for n in self._segments if not os.path.exists(os.path.join(SHM_DIR, n))]:
            del self._segments[name]
        seg = self._segments.get(reply.segment)
        if seg is None or seg.numel() != reply.size:
            seg = self._segments[reply.segment] = map_segment(reply.segment, reply.size, writable=False)
        self._leases.add(reply.lease)
        return Snapshot(self, reply, seg)

    def _release(self, lease: int) -> None:
        self._leases.discard(lease)
        try:
            self._conn.request(Release(lease=lease), self.timeout)
        except StagerError as exc:
            log.warning("release of lease %d failed: %s", lease, exc)

    def close(self) -> None:
        """Release the leases still held, then disconnect (the daemon also ends them on bye)."""
        for lease in list(self._leases):
            self._release(lease)
        self._segments.clear()
        self._finalizer()

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
