"""What both change readers share (:mod:`.delta`, the ledger path of ``load_into``, and
:mod:`.engine_changes`, an engine tracking its own base): which tensors a map holds for element for
element, how requests are batched, and one parser of :class:`~stager.protocol.ChangesReply` that
checks everything a reply says before anything is written (names, kinds, frame lengths, every
index in range and, for part of a tensor, inside the boxes asked), so a bad reply is a typed
error and never a partial write.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy
import torch

from stager.protocol import ChangesReply, ErrorCode, StagerError
from stager.protocol.changes import INDICES, KINDS
from stager.protocol.dtypes import DTYPES, FLOAT8_DTYPES
from stager.protocol.reads import MAX_CHANGE_BOXES, MAX_CHANGE_TENSORS

from ..adapters import hf_flat_indices
from .views import ViewEntry

PIPELINE = 4  # Changes requests in flight per node: the daemon gathers one while the reader applies another
MIN_BATCH = 1 << 23  # elements per request at least: a small model's delta is one request (each costs ~1 ms)


@dataclasses.dataclass
class Answer:
    """One tensor of a reply: its kind and count; for ``indices`` (with indices or values asked) the
    int32 flat indices, checked, and the values when the daemon sent them."""

    kind: str
    count: int
    indices: torch.Tensor | None = None
    values: torch.Tensor | None = None


def delta_source(snap: Any, entry: ViewEntry) -> str | None:
    """The native tensor whose change map holds for ``entry`` element for element, or None (read in full):
    floating data that is not float8, seen through a rename or a reordering of its rows (``entry.rows``:
    the rotary permutation; its indices are mapped with :func:`hf_indices`), no other transform."""
    fqn = entry.source
    if not fqn or fqn in snap.quant or fqn not in snap._version.merged:
        return None
    m = snap._version.merged[fqn]
    stored = DTYPES[m.dtype]
    if not stored.is_floating_point or stored in FLOAT8_DTYPES or not m.complete:
        return None
    return fqn if entry.whole_native(tuple(m.shape)) else None


def hf_indices(entry: ViewEntry, indices: torch.Tensor) -> torch.Tensor:
    """Flat indices of ``entry``'s native tensor (a change map's, checked in range) as the view's: the
    same for a rename, through the adapter's row order for a permuted tensor (not ascending then)."""
    return view_indices(indices, entry.rows, entry.shape)


def view_indices(indices: torch.Tensor, rows: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor:
    """:func:`hf_indices` for a tensor of ``shape`` whose rows are reordered by ``rows`` (None: not reordered)."""
    if rows is None:
        return indices
    return hf_flat_indices(indices, rows, math.prod(shape[1:]))


def session(snap: Any) -> str | None:
    """The daemon session of a one-node version's connection (None: several nodes, or none)."""
    leases = snap._version.leases
    if len(leases) != 1:
        return None
    conn, _ = next(iter(leases.values()))
    return conn.session


def batches(items: list, sizes: list[int], boxes: list[int] | None = None) -> list[list]:
    """``items`` (``sizes`` elements each, ``boxes`` boxes each) per request: up to PIPELINE requests
    of about equal element counts (none below MIN_BATCH elements unless it is the last), so that the
    first reply comes early and the daemon gathers the next while this process applies one, within
    a request's bounds on names and boxes. Reply sizes are the daemon's to bound: it answers a
    prefix of the tensors asked for when they would not fit, and the reader asks again."""
    target = max(math.ceil(sum(sizes) / PIPELINE), MIN_BATCH)
    out, cur, size, held = [], [], 0, 0
    for i, (item, n) in enumerate(zip(items, sizes)):
        more = boxes[i] if boxes is not None else 0
        if cur and held + more > MAX_CHANGE_BOXES:
            out.append(cur)
            cur, size, held = [], 0, 0
        cur.append(item)
        size += n
        held += more
        if size >= target or len(cur) == MAX_CHANGE_TENSORS:
            out.append(cur)
            cur, size, held = [], 0, 0
    return out + ([cur] if cur else [])


def parse(
    reply: ChangesReply,
    fqns: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype,
    want: str,
    boxes: Sequence[list | None] | None = None,
) -> list[Answer]:
    """The answers of ``reply`` to a request for ``fqns`` (a prefix of them: at least one), each
    checked against its tensor's ``shapes`` and, where ``boxes`` gives them (a list of
    ``(offset, shape)``; None: the whole tensor), the boxes asked; raises BAD_MESSAGE otherwise."""
    n = len(reply.tensors)
    if not 0 < n <= len(fqns):
        raise StagerError(ErrorCode.BAD_MESSAGE, f"changes reply answers {n} of {len(fqns)} tensors")
    frames = reply.frames if want != "counts" else []
    if len(frames) > (2 if want == "values" else 1):
        raise StagerError(ErrorCode.BAD_MESSAGE, f"changes reply has {len(frames)} frames for want={want!r}")
    indices = frame_tensor(frames[0], torch.int32) if frames else torch.empty(0, dtype=torch.int32)
    values = frame_tensor(frames[1], dtype) if len(frames) > 1 else torch.empty(0, dtype=dtype)
    out, at = [], 0
    for i, (got, kind, count) in enumerate(reply.tensors):
        fqn = fqns[i]
        if got != fqn:
            raise StagerError(ErrorCode.BAD_MESSAGE, f"changes reply names {got!r} where {fqn!r} was asked")
        if kind not in KINDS:
            raise StagerError(ErrorCode.BAD_MESSAGE, f"{fqn}: changes reply kind {kind!r} is not one of {KINDS}")
        if kind != INDICES or want == "counts":
            out.append(Answer(kind, count))
            continue
        idx = indices[at : at + count]
        if idx.numel() != count or (want == "values" and values.numel() < at + count):
            raise StagerError(ErrorCode.BAD_MESSAGE, f"{fqn}: changes reply is short of its {count} elements")
        _check(fqn, idx, shapes[i], boxes[i] if boxes is not None else None)
        out.append(Answer(kind, count, idx, values[at : at + count] if want == "values" else None))
        at += count
    if at != indices.numel() or (want == "values" and at != values.numel()):
        raise StagerError(ErrorCode.BAD_MESSAGE, f"changes reply frames hold more than its {at} elements")
    return out


def _check(fqn: str, idx: torch.Tensor, shape: tuple[int, ...], boxes: list | None) -> None:
    """Every index in range (any order: min and max, not first and last) and inside ``boxes``."""
    if not idx.numel():
        return
    numel = math.prod(shape)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0:  # numpy's put would wrap it
        raise StagerError(ErrorCode.BAD_MESSAGE, f"{fqn}: changes reply holds a negative index ({lo})")
    if hi >= numel:
        raise StagerError(ErrorCode.BAD_MESSAGE, f"{fqn}: changes reply index {hi} does not fit its {numel} elements")
    if boxes is None:
        return
    flat = idx.numpy().astype(numpy.int64)
    hit = numpy.zeros(flat.size, dtype=bool)
    for offset, size in boxes:
        keep = numpy.ones(flat.size, dtype=bool)
        rest = flat
        for d in range(len(shape) - 1, -1, -1):
            at = rest % shape[d]
            rest = rest // shape[d]
            keep &= (at >= offset[d]) & (at < offset[d] + size[d])
        hit |= keep
    if not hit.all():
        raise StagerError(ErrorCode.BAD_MESSAGE, f"{fqn}: changes reply holds an index outside the boxes asked")


def frame_tensor(frame: Any, dtype: torch.dtype) -> torch.Tensor:
    """A reply frame as a flat tensor of ``dtype`` (no copy); a length that is not a whole number of
    elements is BAD_MESSAGE."""
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    if not buf.nbytes:
        return torch.empty(0, dtype=dtype)
    if buf.nbytes % dtype.itemsize:
        raise StagerError(
            ErrorCode.BAD_MESSAGE, f"changes reply frame of {buf.nbytes} bytes is not whole {dtype} elements"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only frames: only read here
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype)
