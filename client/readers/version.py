"""A leased version: the regions of one step, the byte source of each node holding part of it, its leases.

What a :class:`~.snapshot.Snapshot` reads through, whether one daemon holds the version or several
nodes of a job each hold a part: reads are planned (:mod:`.planner`) and moved (:mod:`.mover`)
the same way for both. Built by :class:`~.job_reader.JobReader`, the only thing that takes leases.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from itertools import chain
from typing import Any

import torch

from stager.protocol import Box, ErrorCode, StagerError, TensorLayout
from stager.protocol.dtypes import dtype_from_name
from stager.protocol.fp8_block import E4M3, scale_shape
from stager.protocol.layout import MAX_FP8_READ_ELEMENTS, MIN_FP8_BLOCK
from stager.protocol.quant import QuantSpec

from .mover import Want, move, read_one
from .planner import MergedTensor, placement, plan_box
from .sources import ByteSource


class LeasedVersion:
    """Step ``step`` leased on every node holding part of it (``leases``: node -> (connection, lease id)).
    ``lease``, ``seq``, ``model_info``: the reader's own daemon's; ``objects``: the first node's."""

    def __init__(
        self,
        reader: Any,
        step: int,
        seq: int,
        lease: int,
        objects: dict,
        model_info: dict | None,
        quant: dict[str, QuantSpec],
        merged: dict[str, MergedTensor],
        sources: dict[str, ByteSource],
        leases: dict[str, tuple[Any, int]],
        seqs: dict[str, int] | None = None,
        parts: dict[str, tuple[TensorLayout, ...]] | None = None,
    ):
        self._reader = reader  # the JobReader: releases the leases, names a node that does not answer
        self.step = step
        self.seq = seq
        self.lease = lease
        self.objects = objects
        self.model_info = model_info
        self.quant = quant
        self.merged = merged
        self.sources = sources
        self.leases = leases
        self.seqs = seqs or {}  # node -> that daemon's seq of this step (delta reads name their base by it)
        # node -> {fqn: its layout on that node}: the blocks whose checksums prove a delta read's base
        self.parts = {n: {t.fqn: t for t in tensors} for n, tensors in (parts or {}).items()}
        self.partial = not all(m.complete for m in merged.values())
        self.members = len(reader.nodes)
        self._mapped: dict[str, torch.Tensor | None] = {}  # fqn -> the whole tensor mapped (None: it is not)

    def layouts(self) -> tuple[TensorLayout, ...]:
        """Each tensor's layout as the reader's view sees it (whole, or the regions of a partial one)."""
        return tuple(m.layout() for m in self.merged.values())

    def read(
        self, fqn: str, box: Box | None = None, out: torch.Tensor | None = None, cast: torch.dtype | None = None
    ) -> torch.Tensor:
        """Box ``box`` (None: all) of ``fqn``: a view of mapped memory when one mapped block holds it
        (and no ``out`` is given), else the bytes fetched (into ``out`` when given). ``cast``: the
        dtype the caller turns it into; fetched bytes come in it (cast by their daemon), mapped ones
        as they are: the caller's ``.to(cast)`` is then a no-op or the cast itself."""
        if box is None:
            view = self.mapped(fqn)
            if view is not None:
                return view if out is None else out.copy_(view)
        m = self.merged[fqn]
        return read_one(self._want(m, m.box if box is None else box, out, cast), self.sources, self._failed)

    def stream(
        self,
        fqns: Iterable[str],
        outs: Mapping[str, torch.Tensor] | None = None,
        casts: Mapping[str, torch.dtype] | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Whole tensors in order (into ``outs[fqn]`` where given), the next ones' requests in flight;
        ``casts[fqn]``: as :meth:`read`'s ``cast``."""
        outs, casts = outs or {}, casts or {}
        fqns = iter(fqns)
        for fqn in fqns:  # mapped tensors at once; from the first that is not on, all through the mover
            view = self.mapped(fqn)
            if view is None:
                wants = (
                    self._want(self.merged[f], self.merged[f].box, outs.get(f), casts.get(f))
                    for f in chain([fqn], fqns)
                )
                yield from ((w.fqn, t) for w, t in move(wants, self.sources, self._failed))
                return
            out = outs.get(fqn)
            yield fqn, view if out is None else out.copy_(view)

    def read_fp8(
        self, fqn: str, block: tuple[int, int], rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(e4m3 data, fp32 scale_inv)`` of the whole of ``fqn`` FP8 block-quantized by the daemon that
        holds it (:meth:`.sources.FramesSource.fetch_fp8`, in row ranges on whole blocks, a few in flight):
        e4m3 and scales cross the wire, not the staged bytes. None where that cannot be: the tensor is
        mapped (quantized here, reading costs no wire), split across nodes, its source has no daemon that
        quantizes, or the daemon refused (one that predates FP8 reads: its source is not asked again);
        then the caller reads and quantizes it itself, as :func:`~stager.protocol.fp8_block.quantize_block_fp8`
        does here: the same bytes. ``rows``: the tensor is quantized with its rows reordered, row ``rows[r]``
        being its row r (an adapter's row order: the rotary permutation of q and k), blocks of the reordered
        rows: the daemon gathers them in that order first (``ReadItem.rows``)."""
        m = self.merged[fqn]
        if not m.complete or len(m.shape) != 2 or self.mapped(fqn) is not None:
            return None
        reads = plan_box(m, m.box)
        src = self.sources[reads[0].node] if len(reads) == 1 else None
        if src is None or not getattr(src, "quantizes", False):
            return None
        held = None  # the tensor's row each row of the reordered one holds
        if rows is not None:
            if not getattr(src, "gathers", False) or tuple(rows.shape) != (m.shape[0],):
                return None
            held = torch.argsort(rows)  # the inverse permutation
        if min(block) < MIN_FP8_BLOCK:  # the daemon refuses such blocks: quantized here
            return None
        rows, cols = m.shape
        row_bytes = max(1, cols * dtype_from_name(m.dtype).itemsize)  # staged bytes: what bounds the daemon's work
        grid_cols = -(-cols // block[1])
        # rows of blocks per request: the staged bytes, the reply (e4m3 and scales) within what the daemon's cast
        # buffers serve several of at once, the elements it quantizes per read (padded) within its bound
        per = min(
            src.max_read_bytes // (row_bytes * block[0]),
            getattr(src, "max_cast_bytes", src.max_read_bytes) // max(1, block[0] * cols + 4 * grid_cols),
            MAX_FP8_READ_ELEMENTS // max(1, block[0] * grid_cols * block[1]),
        )
        per = max(1, per) * block[0]
        data: torch.Tensor | None = torch.empty((rows, cols), dtype=E4M3)
        scale_inv = torch.empty(scale_shape((rows, cols), block), dtype=torch.float32)
        boxes = [Box((r, 0), (min(per, rows - r), cols)) for r in range(0, rows, per)]
        if len(boxes) == 1:  # one frame: its tensors are the result (no copy)
            data = scale_inv = None  # type: ignore[assignment]
        pending = iter(boxes)
        flight: deque = deque()
        refused = None
        while True:
            while refused is None and len(flight) < src.max_in_flight:
                box = next(pending, None)
                if box is None:
                    break
                order = None if held is None else tuple(held[box.offset[0] : box.offset[0] + box.shape[0]].tolist())
                try:
                    flight.append((box, src.fetch_fp8(fqn, box, block, order)))
                except StagerError as exc:
                    raise self._failed(reads[0].node, exc, fqn) from None
            if not flight:
                break
            box, fetch = flight.popleft()
            try:
                part, scales = fetch.wait()
            except StagerError as exc:  # the others in flight are still waited for: their replies come
                if exc.code not in (ErrorCode.BAD_MESSAGE, ErrorCode.BAD_DTYPE, ErrorCode.BAD_VALUE):
                    raise self._failed(reads[0].node, exc, fqn) from None
                refused = exc
                continue
            if data is None:
                data, scale_inv = part, scales
                continue
            r0 = box.offset[0]
            data[r0 : r0 + box.shape[0]] = part
            scale_inv[r0 // block[0] : r0 // block[0] + scales.shape[0]] = scales
        if refused is None and data is not None:
            return data, scale_inv
        if refused.code != ErrorCode.BAD_VALUE:  # a daemon that predates FP8 reads (or rows): not asked again
            if held is not None:
                src.gathers = False
            else:
                src.quantizes = False
        return None

    def mapped(self, fqn: str) -> torch.Tensor | None:
        """The whole of ``fqn`` as a view of mapped memory (one node near the reader holds it whole), else None."""
        if fqn in self._mapped:
            return self._mapped[fqn]
        m = self.merged[fqn]
        view = None
        if m.nearest_whole is not None:
            try:
                view = self.sources[m.nearest_whole].map(fqn, m.box)
            except StagerError as exc:
                raise self._failed(m.nearest_whole, exc, fqn) from None
        self._mapped[fqn] = view
        return view

    def regions(self, fqn: str) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        """``[(global offset, tensor)]``: the whole tensor, or each region a partial version holds of it."""
        m = self.merged[fqn]
        if m.complete:
            return [((0,) * len(m.shape), self.read(fqn))]
        wants = [self._want(m, r.box, None) for r in m.regions]
        return [(w.box.offset, t) for w, t in move(wants, self.sources, self._failed)]

    def placement(self) -> dict[str, list[tuple[tuple[int, ...], tuple[int, ...], list[str]]]] | None:
        """Per tensor its regions and the nodes holding each; None when the job has one node."""
        return placement(self.merged) if self.members > 1 else None

    def shares(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a view of mapped memory of this version (valid only while it is leased)."""
        return any(src.shares(t) for src in self.sources.values())

    def _want(self, m: MergedTensor, box: Box, out: torch.Tensor | None, cast: torch.dtype | None = None) -> Want:
        return Want(m.fqn, box, dtype_from_name(m.dtype), plan_box(m, box), out, cast)

    def _failed(self, node: str, exc: StagerError, fqn: str) -> StagerError:
        return self._reader.node_failed(node, exc, f"reading {fqn} of step {self.step}")

    def close(self) -> None:
        """Drop the sources and release every lease (once)."""
        for src in self.sources.values():
            src.close()  # a read after this is refused by the source (UNKNOWN_LEASE)
        self._mapped = {}
        self._reader.release(self)
