"""Answering :class:`Changes`: a reader at step N asks what changed up to the version it leases.

The answer is the union of the kept maps N->...->M (:mod:`.changes` keeps them, as
:class:`~.change_table.Table`), per tensor asked, inside the boxes asked (a job spanning nodes: each
node answers for the blocks it holds), with the values from M gathered per run of one dtype
(:mod:`.change_runs`). A base the chain does not reach is ``unknown_base`` (the reader reads in
full); a reader's copy of N that no ledger vouches for is proven by the maps' checksums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from stager.protocol import ErrorCode, StagerError
from stager.protocol.change_regions import covers, regional
from stager.protocol.changes import INDICES, UNCHANGED, WHOLE, Change, compare_dtype, union, whole
from stager.protocol.dtypes import dtype_from_name, dtype_name
from stager.protocol.reads import Changes, ChangesReply

from . import change_runs
from .change_table import Key, Reading, Record
from .peers import PeerDirectory
from .state import DaemonState
from .versions import Version

# a reply answers the tensors asked for up to this many bytes of indices and values (at least one
# tensor; the reader asks again for the rest): with a reader's 4 requests in flight, ~256 MiB queued
MAX_REPLY_BYTES = 64 << 20
MAX_TENSOR_BYTES = 256 << 20  # one tensor's changes over this: answered whole (a full read of it)


class ChangeMaps(Protocol):
    """What a reply reads of :class:`~.changes.ChangeMaps` (which owns the maps and calls :func:`answer`)."""

    state: DaemonState
    directory: PeerDirectory
    dtypes: tuple
    records: Mapping[Key, Record]

    def pending(self) -> bool: ...


def answer(maps: ChangeMaps, identity: bytes, msg: Changes) -> ChangesReply:
    peer = maps.directory.get(identity)
    if msg.lease not in peer.leases:
        raise StagerError(
            ErrorCode.UNKNOWN_LEASE, f"lease {msg.lease} is not held by this connection; acquire the version first"
        )
    v = maps.state.leases[msg.lease][1]
    dtype = dtype_from_name(msg.dtype)
    by_name = {t.fqn: t for t in v.layout.tensors}
    fqns = msg.fqns or [t.fqn for t in v.layout.tensors if t.complete]
    missing = [f for f in fqns if f not in by_name]
    if missing:
        raise StagerError(ErrorCode.BAD_VALUE, f"{missing[0][:200]}: no such tensor in step {v.step}")
    records = _chain(maps, v, (msg.since, msg.since_seq), msg.dtype)
    chain = [Reading(r.maps[msg.dtype]) for r in records]
    base = _base_sums(maps, v, records, msg.dtype) if msg.sums else None
    reply = ChangesReply(step=v.step, since=msg.since, dtype=msg.dtype, checked=bool(msg.sums))
    picked = []  # (tensor layout, indices, the dtype its values go in, where they are: see _tensor)
    total = 0
    for i, fqn in enumerate(fqns):
        t = by_name[fqn]
        c, src = _tensor(
            v, t, chain, _asked(t, msg.boxes[i]) if msg.boxes else None, msg.sums[i] if msg.sums else None, base
        )
        if msg.since_seq == 0 and (not msg.sums or msg.sums[i] is None):
            c = whole(c.numel)  # a base named by its step alone is proven by checksums only
        if c.kind == INDICES and msg.want != "counts":
            cast = compare_dtype(t.torch_dtype, dtype)
            need = c.count * (4 + (cast.itemsize if msg.want == "values" else 0))
            if need > MAX_TENSOR_BYTES:
                c = Change(WHOLE, c.count, c.numel)  # more than a reply holds: a full read of it is as cheap
            elif picked and total + need > MAX_REPLY_BYTES:
                break  # the reply answers the tensors before this one; the reader asks again for the rest
            else:
                total += need
                picked.append((t, c.indices, cast, src))
        reply.tensors.append([fqn, c.kind, c.count])
    maps.state.counters["read_bytes"] += total  # bytes served to readers, as Read counts them
    if msg.want != "counts":
        indices = [idx for _, idx, _, _ in picked]
        indices = torch.cat(indices) if len(indices) > 1 else indices[0] if indices else None
        reply.frames = [change_runs.frame(indices)]
        if msg.want == "values":
            reply.frames.append(change_runs.frame(change_runs.values(v, picked, indices)))
    return reply


def _tensor(v: Version, t, chain: list, boxes: list | None, sums: list | None, base: Callable | None) -> tuple:
    """Tensor ``t``'s change over ``chain`` inside ``boxes`` (None: all this node holds), in flat
    indices of the whole tensor, and where its values are in the segment: None (its indices, in
    its one block), else ``(offsets, counts, positions)`` as :func:`gather_many` takes them.
    ``sums``: the reader's checksums of its copy of the base, one per block: not the base's, it is
    read whole (``base``: a key's checksum of the base)."""
    numel = math.prod(t.shape)
    one = t.complete and len(t.blocks) == 1
    keys = [t.fqn] if one else [(t.fqn, i) for i in range(len(t.blocks))]
    if sums is not None and (len(sums) != len(keys) or any(base(k) != s for k, s in zip(keys, sums))):
        return whole(numel), None

    def link(key, n: int) -> Change:
        return union([m.get(key) or whole(n) for m in chain], n) if chain else Change(UNCHANGED, 0, n)

    if one and boxes is None:  # the tensor whole, in one block: its map as it is
        return link(t.fqn, numel), None
    blocks = [((b.box.offset, b.box.shape), link(k, b.box.numel)) for k, b in zip(keys, t.blocks)]
    c, parts, order = regional(blocks, t.shape, boxes, limit=MAX_TENSOR_BYTES // 4)
    size = t.torch_dtype.itemsize
    offsets = [t.blocks[j].byte_offset // size for j, _ in parts]
    counts = [local.numel() for _, local in parts]
    if order is None:
        local = torch.cat([x.to(torch.int64) for _, x in parts]) if parts else torch.empty(0, dtype=torch.int64)
        return c, (offsets, counts, local)
    # several blocks' changes interleave in the tensor's flat order: positions in the segment, in that order
    at = torch.cat([x.to(torch.int64) + off for (_, x), off in zip(parts, offsets)])[order]
    return c, ([0], [at.numel()], at)


def _base_sums(maps: ChangeMaps, v: Version, records: list[Record], dtype: str) -> Callable:
    """Each tensor's (or block's) checksum in ``dtype`` of the base of ``records``' chain to ``v``,
    by key (None: none recorded)."""
    if records:
        table = records[-1].maps.get(dtype)
        return (lambda key: table.sum(key, 0)) if table is not None else (lambda key: None)
    rec = maps.records.get((v.step, v.seq))  # the reader claims ``v`` itself
    table = rec.maps.get(dtype) if rec is not None else None
    return (lambda key: table.sum(key, 1)) if table is not None else (lambda key: None)


def _chain(maps: ChangeMaps, v: Version, since: Key, dtype: str) -> list[Record]:
    """The records from ``since`` to ``v``, newest first (empty: ``v`` is ``since``); ``since``'s
    seq 0: the newest version of that step in the chain."""
    at, chain = (v.step, v.seq), []
    while at != since and not (since[1] == 0 and at[0] == since[0]):
        rec = maps.records.get(at)
        if rec is None or dtype not in rec.maps or at[1] <= since[1]:
            why = (
                "is still being computed"
                if at == (v.step, v.seq) and rec is None and maps.pending()
                else f"is not held (dtypes {[dtype_name(d) for d in maps.dtypes]}, {len(maps.records)} maps kept)"
            )
            raise StagerError(
                ErrorCode.UNKNOWN_BASE,
                f"no change map from step {since[0]} (seq {since[1]}) to "
                f"step {v.step} in {dtype}: the map of step {at[0]} {why}; "
                "read the version in full",
            )
        chain.append(rec)
        at = rec.base
    return chain


def _asked(t, entry: list) -> list | None:
    """The boxes of a Changes request's entry for ``t`` as (offset, shape); None: all the node holds.
    Each must lie in the tensor and be held by this node's blocks: a box held elsewhere is not
    "unchanged" here (PARTIAL, as a Read of it is)."""
    if not entry:
        return None
    out = []
    held = [(b.box.offset, b.box.shape) for b in t.blocks]
    for offset, shape in entry:
        if len(offset) != len(t.shape) or any(o + n > d for o, n, d in zip(offset, shape, t.shape)):
            raise StagerError(
                ErrorCode.BAD_VALUE,
                f"{t.fqn}: box at {offset} of shape {shape} does not fit its shape {list(t.shape)}",
            )
        box = (tuple(offset), tuple(shape))
        if not covers(held, box):
            raise StagerError(
                ErrorCode.PARTIAL,
                f"{t.fqn}: this node holds only part of it, not all of the box at {offset} of shape "
                f"{shape}; ask each node for the boxes it holds (JobInfo names them)",
            )
        out.append(box)
    return out
