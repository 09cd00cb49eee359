"""Where a leased version's bytes come from: the daemon's shared memory, or frames over the socket.

Both sources give ``full(fqn)`` and ``box(fqn, offsets, sizes)`` as tensors of the staged dtype.
Same-host reads are views of the segment (no copy). Remote reads ask the daemon for exactly the
box's bytes, large ones in row ranges, and ``stream`` keeps a few requests in flight so the
socket never idles while the reader converts what arrived: memory stays bounded by one tensor
plus the requests in flight.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Iterable, Iterator

import torch

from stager.planning import check_box
from stager.protocol import ErrorCode, ErrorReply, Read, ReadReply, StagerError
from stager.protocol.dtypes import DTYPES
from stager.shm import block_view

CHUNK_BYTES = 64 << 20  # per Read request: big enough to stream at socket speed, small enough to bound memory
WINDOW = 4  # Read requests in flight


class LocalSource:
    """Zero-copy views of a mapped segment."""

    remote = False

    def __init__(self, seg: torch.Tensor, tensors: list):
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.regions: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = {}
        for fqn, dtype, shape, blocks in tensors:
            self.meta[fqn] = (dtype, tuple(shape))
            self.regions[fqn] = [(tuple(off), block_view(seg, DTYPES[dtype], byte_offset, block_shape))
                                 for byte_offset, off, block_shape in blocks]

    def full(self, fqn: str) -> torch.Tensor:
        regions = self.regions[fqn]
        if len(regions) != 1 or tuple(regions[0][1].shape) != self.meta[fqn][1]:
            raise StagerError(ErrorCode.PARTIAL, f"{fqn}: this node holds only part of it; use regions({fqn!r})")
        return regions[0][1]

    def box(self, fqn: str, offsets, sizes) -> torch.Tensor:
        t = self.full(fqn)
        offsets, sizes = check_box(fqn, tuple(t.shape), offsets, sizes)
        for dim, (o, s) in enumerate(zip(offsets, sizes)):
            t = t.narrow(dim, o, s)
        return t

    def stream(self, fqns: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return ((f, self.full(f)) for f in fqns)

    def close(self) -> None:
        self.regions.clear()


class RemoteSource:
    """Bytes as ZeroMQ frames from the daemon (readers on another host, or ``remote=True``)."""

    remote = True

    def __init__(self, conn, lease: int, tensors: list, timeout: float):
        self.conn, self.lease, self.timeout = conn, lease, timeout
        self.meta = {fqn: (dtype, tuple(shape)) for fqn, dtype, shape, _ in tensors}
        self.regions: dict = {}
        self.partial = {fqn for fqn, _, shape, blocks in tensors
                        if len(blocks) != 1 or list(blocks[0][2]) != list(shape)}

    def _requests(self, fqn: str, offsets, sizes) -> tuple[torch.dtype, tuple, list[tuple]]:
        """The dtype, box sizes and the Read items (one box each) that make up this box."""
        if fqn not in self.meta:
            raise KeyError(fqn)
        if fqn in self.partial:
            raise StagerError(ErrorCode.PARTIAL, f"{fqn}: this node holds only part of it")
        dtype_name, shape = self.meta[fqn]
        dtype = DTYPES[dtype_name]
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

    def _send(self, fqn: str, box: tuple) -> int:
        return self.conn.send(Read(lease=self.lease, items=[[fqn, box[0], box[1]]]))

    def _recv(self, rid: int) -> memoryview:
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self.conn.recv(deadline - time.monotonic())
            if reply is None:
                if time.monotonic() >= deadline:
                    self.conn.reset()
                    raise StagerError(ErrorCode.TIMEOUT, f"no read reply from {self.conn.endpoint} within "
                                                         f"{self.timeout:.1f}s; the daemon is overloaded or gone")
                continue
            if reply.id != rid:
                self.conn.on_unsolicited(reply)
                continue
            if isinstance(reply, ErrorReply):
                raise reply.to_exception()
            if not isinstance(reply, ReadReply):
                raise StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {reply.TYPE} reply to read")
            frame = reply.frames[0]
            return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)

    def box(self, fqn: str, offsets=None, sizes=None) -> torch.Tensor:
        return next(self._pipeline(iter([(fqn, *self._requests(fqn, offsets, sizes))])))[1]

    def full(self, fqn: str) -> torch.Tensor:
        return self.box(fqn)

    def stream(self, fqns: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Whole tensors in order, with the next ones' requests already in flight."""
        return self._pipeline((f, *self._requests(f, None, None)) for f in fqns)

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
                inflight.append((self._send(fqn, part), fqn, part))
            if not inflight:
                return
            rid, fqn, part = inflight.pop(0)
            dtype, shape, left, out, row = current[fqn]
            block = _tensor(self._recv(rid), dtype, part[1])
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
