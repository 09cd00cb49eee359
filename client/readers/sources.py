"""Where a leased version's bytes come from: the daemon's shared memory, or frames over the socket.

Both sources give ``full(fqn)`` and ``box(fqn, offsets, sizes)`` as tensors of the staged dtype.
Same-host reads are views of the segment (no copy). Remote reads ask the daemon for exactly the
box's bytes, large ones in row ranges, and ``stream`` keeps a few requests in flight so the
socket never idles while the reader converts what arrived: memory stays bounded by one tensor
plus the requests in flight.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Iterator

import torch

from stager.protocol import ErrorCode, Read, ReadItem, ReadReply, StagerError, TensorLayout
from stager.protocol.layout import check_box, narrow_box
from stager.protocol.shm import block_view

CHUNK_BYTES = 64 << 20  # per Read request: big enough to stream at socket speed, small enough to bound memory
WINDOW = 4  # Read requests in flight


class LocalSource:
    """Zero-copy views of a mapped segment."""

    remote = False

    def __init__(self, seg: torch.Tensor, tensors: tuple[TensorLayout, ...]):
        self.meta: dict[str, TensorLayout] = {t.fqn: t for t in tensors}
        self.regions: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = {
            t.fqn: [(b.box.offset, block_view(seg, t.torch_dtype, b.byte_offset, b.box.shape)) for b in t.blocks]
            for t in tensors}

    def full(self, fqn: str) -> torch.Tensor:
        if not self.meta[fqn].complete:
            raise StagerError(ErrorCode.PARTIAL, f"{fqn}: this node holds only part of it; use regions({fqn!r})")
        return self.regions[fqn][0][1]

    def part(self, fqn: str, box) -> torch.Tensor:
        """A view of ``box`` (global coordinates), which must lie in one block this segment holds."""
        for offset, view in self.regions[fqn]:
            inner = tuple(o - bo for o, bo in zip(box.offset, offset))
            if all(i >= 0 and i + n <= m for i, n, m in zip(inner, box.shape, view.shape)):
                return narrow_box(view, inner, box.shape)
        raise StagerError(ErrorCode.PARTIAL, f"{fqn}: this node does not hold box offset {list(box.offset)} "
                                             f"shape {list(box.shape)}")

    def box(self, fqn: str, offsets, sizes) -> torch.Tensor:
        t = self.full(fqn)
        return narrow_box(t, *check_box(fqn, tuple(t.shape), offsets, sizes))

    def stream(self, fqns: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return ((f, self.full(f)) for f in fqns)

    def close(self) -> None:
        self.regions.clear()


class RemoteSource:
    """Bytes as ZeroMQ frames from the daemon (readers on another host, or ``remote=True``)."""

    remote = True

    def __init__(self, conn, lease: int, tensors: tuple[TensorLayout, ...], timeout: float):
        self.conn, self.lease, self.timeout = conn, lease, timeout
        self.meta: dict[str, TensorLayout] = {t.fqn: t for t in tensors}
        self.regions: dict = {}

    def read_requests(self, fqn: str, offsets, sizes) -> tuple[torch.dtype, tuple, list[tuple]]:
        """The dtype, box sizes and the Read items (one box each, split along dimension 0 into
        CHUNK_BYTES parts) that make up box ``(offsets, sizes)`` (global coordinates; on a node of
        a multi-node job, the box must lie in one region that node holds)."""
        if fqn not in self.meta:
            raise KeyError(fqn)
        t = self.meta[fqn]
        dtype, shape = t.torch_dtype, t.shape
        offsets, sizes = check_box(fqn, shape, offsets, sizes)
        nbytes = math.prod(sizes) * dtype.itemsize
        if nbytes <= CHUNK_BYTES or not sizes or sizes[0] <= 1:
            return dtype, sizes, [(list(offsets), list(sizes))]
        rows = max(1, CHUNK_BYTES // (nbytes // sizes[0]))
        parts = []
        for start in range(0, sizes[0], rows):
            n = min(rows, sizes[0] - start)
            parts.append(([offsets[0] + start, *offsets[1:]], [n, *sizes[1:]]))
        return dtype, sizes, parts

    def send_read(self, fqn: str, box: tuple) -> int:
        """Ask for one box of :meth:`read_requests`; returns the request id for :meth:`recv_read`."""
        return self.conn.send(Read(lease=self.lease, items=(ReadItem(fqn, tuple(box[0]), tuple(box[1])),)))

    def recv_read(self, rid: int, dtype: torch.dtype, shape) -> torch.Tensor:
        """The box asked for by request ``rid``, as a tensor over the received frame (no copy)."""
        frame = self.conn.wait_reply(rid, self.timeout, "read", ReadReply).frames[0]
        return _tensor(frame.buffer if hasattr(frame, "buffer") else memoryview(frame), dtype, shape)

    def box(self, fqn: str, offsets=None, sizes=None) -> torch.Tensor:
        return next(self._pipeline(iter([(fqn, *self.read_requests(fqn, offsets, sizes))])))[1]

    def full(self, fqn: str) -> torch.Tensor:
        return self.box(fqn)

    def stream(self, fqns: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Whole tensors in order, with the next ones' requests already in flight."""
        return self._pipeline((f, *self.read_requests(f, None, None)) for f in fqns)

    def _pipeline(self, jobs: Iterator[tuple]) -> Iterator[tuple[str, torch.Tensor]]:
        # The daemon answers one connection's requests in order, so a tensor is complete when
        # its last part arrives, and tensors complete in the order they were asked for.
        inflight: list[tuple[int, str, tuple]] = []  # (request id, fqn, box)
        todo: list[tuple[str, tuple]] = []
        current: dict[str, tuple] = {}  # fqn -> (dtype, shape, parts left, destination, next row)
        while True:
            while len(inflight) < WINDOW:
                if not todo:
                    job = next(jobs, None)
                    if job is None:
                        break
                    fqn, dtype, shape, parts = job
                    current[fqn] = (dtype, shape, len(parts), None, 0)
                    todo = [(fqn, part) for part in parts]
                fqn, part = todo.pop(0)
                inflight.append((self.send_read(fqn, part), fqn, part))
            if not inflight:
                return
            rid, fqn, part = inflight.pop(0)
            dtype, shape, left, out, row = current[fqn]
            block = self.recv_read(rid, dtype, part[1])
            if left == 1 and out is None:  # one part: the frame is the tensor
                del current[fqn]
                yield fqn, block
                continue
            if out is None:
                out = torch.empty(shape, dtype=dtype)
            out[row:row + part[1][0]].copy_(block)
            if left == 1:
                del current[fqn]
                yield fqn, out
            else:
                current[fqn] = (dtype, shape, left - 1, out, row + part[1][0])

    def close(self) -> None:
        pass


def _tensor(buffer: memoryview, dtype: torch.dtype, shape) -> torch.Tensor:
    if not buffer.nbytes:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frames are read-only buffers: the tensor is the reader's alone
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(list(shape))
