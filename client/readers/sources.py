"""Byte sources: the one seam through which a node's bytes of a leased version reach a reader.

The job reader opens one :class:`ByteSource` per node of a leased version; the mover
(:mod:`.mover`) asks it for regions; nothing else looks inside. Three ship:

- :class:`SharedMemorySource`: the node's segment mapped (a reader on the daemon's host): a
  region is a view of it, no byte copied;
- :class:`FramesSource`: Read requests over the node's connection (a reader on another host, or
  ``remote=True``): a region comes back as a ZeroMQ frame, a few requests in flight.

- :class:`~.nixl_source.NixlSource`: one-sided NIXL (UCX/RDMA) READs of the node's segment, for
  a reader on another host when both sides have NIXL and the daemon serves it (``--transport nixl``):
  ``map`` gives None, ``fetch`` reads into the destination, the same lease keeping the segment alive.
"""

from __future__ import annotations

import collections
import os
import warnings
from typing import Protocol, runtime_checkable

import torch

from stager.protocol import Block, Box, ErrorCode, Read, ReadItem, ReadReply, StagerError, TensorLayout
from stager.protocol.dtypes import dtype_name
from stager.protocol.fp8_block import E4M3, scale_shape
from stager.protocol.layout import FP8_READ, narrow_box
from stager.protocol.shm import SHM_DIR, block_view, map_segment

# bytes remote sources moved in this process, by transport ("frames", "nixl"), NIXL reads retried as
# frames ("nixl_retried_as_frames"), and boxes a held agent could not READ into ("nixl_unregistered_as_frames":
# a destination outside the memory its owner registered): the reader's side of `stager status`'s bytes by transport
STATS: collections.Counter = collections.Counter()
CHUNK_BYTES = 64 << 20  # per Read request: big enough to stream at socket speed, small enough to bound memory
WINDOW = 4  # Read requests in flight per node
# reply bytes per Read the daemon casts or FP8-quantizes: its cast buffers (--read-cast-memory, 64 MiB at least by
# default) hold half their limit per reader alone, and never one reply over half: WINDOW of these fit that share
CAST_CHUNK_BYTES = 8 << 20


class Fetch(Protocol):
    """A region on its way: :meth:`wait` gives it (``out`` when one was given). A fetch that holds
    memory a transfer may still write (NIXL) also has ``drop()``: the caller will not wait for it
    (the mover stopped early), the fetch keeps its destination until the transfer ended."""

    def wait(self) -> torch.Tensor: ...


@runtime_checkable
class ByteSource(Protocol):
    """Moves one node's bytes of one leased version. Boxes are in the tensor's global coordinates
    and lie in one block the node holds; the tensor's dtype and the box's shape are the result's.

    ``max_in_flight``: fetches the mover keeps started at once (they complete in the order they
    were started: wait for them in that order). ``max_read_bytes``: the largest box one fetch
    moves (the planner splits larger ones into row ranges). A source with ``casts`` True also takes
    ``fetch(..., dtype=)``: the box arrives cast (where its bytes are, for frames); the mover asks
    the others for the tensor's own dtype."""

    max_in_flight: int
    max_read_bytes: int

    def map(self, fqn: str, box: Box) -> torch.Tensor | None:
        """A view of the box in memory this source maps (no copy), or None: fetch it instead."""
        ...

    def fetch(self, fqn: str, box: Box, out: torch.Tensor | None = None) -> Fetch:
        """Start moving the box into ``out`` (a tensor of the box's shape, of any dtype: the box is
        cast into it as ``out.copy_`` would, never its raw bytes written into memory of another
        dtype; None: into a tensor of the source's choosing, in the tensor's dtype). Raises
        StagerError: PARTIAL when the node does not hold the box, BAD_VALUE when it does not fit
        the tensor, UNKNOWN_LEASE once closed."""
        ...

    def shares(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a view of memory this source maps (valid only while the lease is held)."""
        ...

    def close(self) -> None:
        """Drop what the source holds of the version (mappings, requests); the lease is the reader's."""
        ...


class _Done:
    def __init__(self, t: torch.Tensor):
        self.t = t

    def wait(self) -> torch.Tensor:
        return self.t


class _Blocks:
    """The tensors of one node's layout, and which block holds a box."""

    def __init__(self, tensors: tuple[TensorLayout, ...]):
        self.meta: dict[str, TensorLayout] | None = {t.fqn: t for t in tensors}

    def layout(self, fqn: str, box: Box) -> TensorLayout:
        """``fqn``'s layout, once the box is known to fit it (KeyError: no such tensor)."""
        if self.meta is None:
            raise StagerError(ErrorCode.UNKNOWN_LEASE, f"{fqn}: the version was released; read before releasing")
        t = self.meta[fqn]
        if not box.within(t.shape):
            raise StagerError(
                ErrorCode.BAD_VALUE,
                f"{fqn}: box at {list(box.offset)} of size {list(box.shape)} does not fit shape {list(t.shape)}",
            )
        return t

    def find(self, fqn: str, box: Box) -> tuple[TensorLayout, Block, tuple[int, ...]]:
        """The layout, the block holding the box and the box's offset inside it."""
        t = self.layout(fqn, box)
        held = t.block_holding(box)
        if held is None:
            raise StagerError(
                ErrorCode.PARTIAL,
                f"{fqn}: this node does not hold box offset {list(box.offset)} shape {list(box.shape)}",
            )
        return t, held[0], held[1]


class SharedMemorySource:
    """Views of the node's segment, mapped (readers on the daemon's host)."""

    max_in_flight = 1  # a fetch is a copy, done when it returns
    max_read_bytes = 1 << 62
    casts = True  # a fetch copies anyway: into the dtype asked for

    def __init__(self, seg: torch.Tensor, tensors: tuple[TensorLayout, ...]):
        self._seg: torch.Tensor | None = seg
        self._blocks = _Blocks(tensors)

    def map(self, fqn: str, box: Box) -> torch.Tensor:
        t = self._blocks.meta.get(fqn) if self._blocks.meta is not None else None
        if t is not None and len(t.blocks) == 1 and (t.blocks[0].box is box or t.blocks[0].box == box):
            block, inner = t.blocks[0], None  # the whole block (a one-node version's tensor): nothing to check
        else:
            t, block, inner = self._blocks.find(fqn, box)
        view = block_view(self._seg, t.torch_dtype, block.byte_offset, block.box.shape)
        return view if inner is None or block.box == box else narrow_box(view, inner, box.shape)

    def fetch(self, fqn: str, box: Box, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> Fetch:
        view = self.map(fqn, box)
        if out is None:
            return _Done(view if dtype is None or dtype == view.dtype else view.to(dtype))
        return _Done(out.copy_(view))

    def shares(self, t: torch.Tensor) -> bool:
        return self._seg is not None and t.untyped_storage().data_ptr() == self._seg.untyped_storage().data_ptr()

    def close(self) -> None:
        self._seg, self._blocks.meta = None, None


class FramesSource:
    """Read requests over the node's connection; each region arrives as one frame (no copy). A
    fetch with a ``dtype`` asks the daemon for the box cast to it: the wire carries the reader's
    dtype's bytes (bf16 from an fp32 version: half), identical to a read-then-cast."""

    max_in_flight = WINDOW
    casts = True
    quantizes = True  # fetch_fp8: the daemon quantizes (False once a daemon that predates it refused)
    gathers = True  # fetch_fp8 with rows: it gathers reordered rows first (False once one that predates it refused)

    def __init__(self, conn, lease: int, tensors: tuple[TensorLayout, ...], timeout: float):
        self.conn = conn
        self.lease = lease
        self.timeout = timeout
        self._blocks = _Blocks(tensors)

    @property
    def max_read_bytes(self) -> int:
        return CHUNK_BYTES  # read at each use: tests lower it to make many requests

    @property
    def max_cast_bytes(self) -> int:
        """The largest reply one cast or FP8 read asks of the daemon (its reply buffers bound them)."""
        return min(CHUNK_BYTES, CAST_CHUNK_BYTES)

    def map(self, fqn: str, box: Box) -> None:
        return None

    def fetch(self, fqn: str, box: Box, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> Fetch:
        t = self._blocks.layout(fqn, box)  # the daemon checks that this node holds it (PARTIAL otherwise)
        if self.conn.sock is None:  # the reader closed it: disconnected, or the node left the job
            raise StagerError(
                ErrorCode.UNAVAILABLE,
                f"{fqn}: the connection to {self.conn.endpoint} is closed; lease the version again",
            )
        wire = t.torch_dtype if dtype is None or dtype == t.torch_dtype else dtype
        item = ReadItem(fqn, box.offset, box.shape, None if wire is t.torch_dtype else dtype_name(wire))
        rid = self.conn.send(Read(lease=self.lease, items=(item,)))
        return _FrameFetch(self, rid, wire, box.shape, out)

    def fetch_fp8(self, fqn: str, box: Box, block: tuple[int, int], rows: tuple[int, ...] | None = None) -> _Fp8Fetch:
        """Start moving the box FP8 block-quantized by the daemon (``ReadItem.block``): :meth:`_Fp8Fetch.wait`
        gives ``(e4m3 data, fp32 scale_inv)``, the bytes :func:`~stager.protocol.fp8_block.quantize_block_fp8`
        of the box gives. The box lies on whole blocks (starts on one, ends on one or at the edge). ``rows``:
        the box is of the tensor with its rows reordered, row i of it being row ``rows[i]`` (``ReadItem.rows``)."""
        self._blocks.layout(fqn, box)  # the reordered tensor has the tensor's shape
        if self.conn.sock is None:
            raise StagerError(
                ErrorCode.UNAVAILABLE,
                f"{fqn}: the connection to {self.conn.endpoint} is closed; lease the version again",
            )
        item = ReadItem(fqn, box.offset, box.shape, FP8_READ, tuple(block), rows)
        return _Fp8Fetch(self, self.conn.send(Read(lease=self.lease, items=(item,))), box.shape, block)

    def shares(self, t: torch.Tensor) -> bool:
        return False

    def close(self) -> None:
        self._blocks.meta = None


class _Fp8Fetch:
    def __init__(self, source: FramesSource, rid: int, shape: tuple[int, ...], block: tuple[int, int]):
        self.source, self.rid, self.shape, self.block = source, rid, shape, block

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        src = self.source
        frame = src.conn.wait_reply(self.rid, src.timeout, "read", ReadReply).frames[0]
        buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        grid = scale_shape(self.shape, self.block)
        split = 4 * grid[0] * grid[1]
        if buffer.nbytes != split + self.shape[0] * self.shape[1]:
            raise StagerError(
                ErrorCode.BAD_MESSAGE,
                f"an FP8 read of a {list(self.shape)} box came back as {buffer.nbytes} bytes, not its scales and "
                "e4m3 data: the daemon does not serve FP8 reads as this reader does; upgrade it",
            )
        STATS["frames"] += buffer.nbytes
        return _tensor(buffer[split:], E4M3, self.shape), _tensor(buffer[:split], torch.float32, grid)


class _FrameFetch:
    def __init__(
        self, source: FramesSource, rid: int, dtype: torch.dtype, shape: tuple[int, ...], out: torch.Tensor | None
    ):
        self.source = source
        self.rid = rid
        self.dtype = dtype
        self.shape = shape
        self.out = out

    def wait(self) -> torch.Tensor:
        src = self.source
        frame = src.conn.wait_reply(self.rid, src.timeout, "read", ReadReply).frames[0]
        t = _tensor(frame.buffer if hasattr(frame, "buffer") else memoryview(frame), self.dtype, self.shape)
        STATS["frames"] += t.numel() * t.element_size()
        return t if self.out is None else self.out.copy_(t)


class SegmentMaps:
    """A reader's mappings of segments, one per segment (reused by every lease of it)."""

    def __init__(self) -> None:
        self._maps: dict[str, torch.Tensor] = {}

    def get(self, name: str, size: int) -> torch.Tensor:
        # mappings of segments the daemon unlinked would keep their memory alive: drop them
        for gone in [n for n in self._maps if not os.path.exists(os.path.join(SHM_DIR, n))]:
            del self._maps[gone]
        seg = self._maps.get(name)
        if seg is None or seg.numel() != size:
            seg = self._maps[name] = map_segment(name, size, writable=False)
        return seg

    def clear(self) -> None:
        self._maps.clear()


TRANSPORTS = ("auto", "nixl", "frames")
# transport -> its opener ``(conn, lease, tensors, timeout, required=) -> source | None``; .nixl_source adds
# "nixl" when the package is imported (it builds on this module: no import back from here)
REMOTE_OPENERS: dict = {}


def open_source(
    conn,
    lease: int,
    segment: str,
    size: int,
    tensors: tuple[TensorLayout, ...],
    *,
    remote: bool | None,
    maps: SegmentMaps,
    timeout: float,
    transport: str = "auto",
    nixl_agent=None,
) -> ByteSource:
    """The source of one node's lease: its segment mapped when the reader runs on the daemon's host
    and sees the segment (unless ``remote``), else NIXL READs where ``transport`` allows them and
    both sides have NIXL (``"nixl"``: required, UNSUPPORTED otherwise), else frames over ``conn``.
    ``nixl_agent``: the :class:`~.nixl_source.HeldAgent` to READ with, instead of this process's own."""
    if remote is None:
        remote = not (conn.same_host and os.path.exists(os.path.join(SHM_DIR, segment)))
    if remote:
        if transport != "frames":
            src = REMOTE_OPENERS["nixl"](conn, lease, tensors, timeout, required=transport == "nixl", agent=nixl_agent)
            if src is not None:
                return src
        return FramesSource(conn, lease, tensors, timeout)
    return SharedMemorySource(maps.get(segment, size), tensors)


def _tensor(buffer: memoryview, dtype: torch.dtype, shape) -> torch.Tensor:
    if not buffer.nbytes:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frames are read-only buffers: the tensor is the reader's alone
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(list(shape))
