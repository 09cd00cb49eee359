"""Delta reads: bring tensors a reader holds at step N up to the leased step M, moving only what changed.

``Snapshot.load_into(out, since=N)`` plans each tensor's reads as a full read would
(:func:`.planner.plan_box`: which node serves which box; one node for a single daemon's version)
and asks each node for the change map N->M of the boxes it serves, in the destination's dtype
(:class:`~stager.protocol.Changes`; every daemon keeps maps of its own blocks, the union over the
chain). Only the changed elements are written: from a node on the reader's host they are gathered
from its mapped segment (index_select, cast as a copy casts); from another host the node gathers
them in the reader's dtype and only indices plus values cross the wire. Maps, boxes and checksums
are the staged tensor's: a tensor the adapter reorders the rows of (the rotary permutation of q and
k) has its indices, whole boxes and checksummed rows mapped through the adapter's row order here.
A box a node cannot give changes for (a dense or reshaped tensor, no map for N: restarted, maps
dropped, layout changed) is read whole from that node through the mover; a tensor no node can is
left to the caller's full read.

The reader must prove it holds N, per node. By default through this module's process-wide ledger
of what each destination tensor was last loaded with (step, each node's seq and daemon session,
view and name) and the tensor's version counter just after (``Tensor._version``, which every
in-place write bumps, through any view). Where the ledger cannot (a tensor loaded from disk, by
another process, written through ``.data`` or numpy, or a node whose daemon restarted since) and
``verify_base`` is not False, by checksums: the reader sends the crc32 of its copy in the map's
dtype (per block of the node's layout) and the node compares them with N's, which it recorded
with its maps; a mismatch reads that tensor's boxes from the node whole. ``verify_base=True``
checksums even what the ledger proves (the ledger does not see writes that bypass the counter).
Checksums cost ~0.3 s of one CPU core per GiB of destination (zlib 1.2.13's crc32 here; ``checksum``).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from stager.protocol import Box, Changes, ChangesReply, ErrorCode, StagerError
from stager.protocol.changes import INDICES, UNCHANGED, apply, checksum, gather, inside, unravel
from stager.protocol.dtypes import dtype_from_name, dtype_name
from stager.protocol.layout import narrow_box

from .change_replies import PIPELINE, batches, delta_source, parse, view_indices
from .mover import Want, move
from .planner import Read, plan_box
from .sources import SharedMemorySource
from .views import ViewEntry

log = logging.getLogger("stager.client")


@dataclasses.dataclass(frozen=True)
class _Held:
    ref: weakref.ref
    version: int  # the tensor's version counter right after the load
    step: int
    view: str
    name: str
    bases: dict  # node -> (its daemon's seq of the step, its session)


_LEDGER: dict[int, _Held] = {}  # id(tensor) -> what it holds
SUM_BYTES = 4 << 20  # rows of a permuted copy gathered per checksum step: bounded memory, few Python calls


@dataclasses.dataclass
class _Plan:
    """One destination tensor: the boxes each node serves of it, and the base's proof per node:
    (seq of N there, 0: unknown; the crc32 of the destination per block of the node, or None)."""

    name: str
    fqn: str
    dst: torch.Tensor
    boxes: dict[str, list[Box]]
    proofs: dict[str, tuple[int, list[int] | None]]
    whole: list[tuple[str, Box]] = dataclasses.field(default_factory=list)  # (node, box) to read whole
    # the adapter's row order (the rotary permutation): native row r is dst's row rows[r]; None: the same rows.
    # Boxes, maps and checksums are the native tensor's; indices and rows are mapped where dst is written
    rows: torch.Tensor | None = None

    @property
    def dst_box(self) -> Box:
        return Box((0,) * self.dst.dim(), tuple(self.dst.shape))


def forget(tensors: Iterable[torch.Tensor]) -> None:
    """Before a load writes them: a load that fails midway leaves them unproven."""
    for t in tensors:
        _LEDGER.pop(id(t), None)


def note_loaded(snap: Any, out: Mapping[str, torch.Tensor], names: list[str]) -> None:
    """``out[name]`` now holds ``name`` of the snapshot's step (after a successful load)."""
    version = snap._version
    bases = {
        node: (version.seqs.get(node, snap.seq), conn.session)
        for node, (conn, _) in version.leases.items()
        if conn.session is not None
    }
    if not bases:
        return
    for name in names:
        t = out[name]
        _LEDGER[id(t)] = _Held(weakref.ref(t, _dropper(id(t))), t._version, snap.step, snap.view, name, bases)
    if len(_LEDGER) > 1 << 20:  # tensors dropped without their weakref firing (never expected): bound it
        for key in [k for k, h in _LEDGER.items() if h.ref() is None]:
            del _LEDGER[key]


def _dropper(key: int):
    """The weakref callback forgetting tensor ``key`` when it is freed (its id may then be reused)."""
    return lambda _: _LEDGER.pop(key, None)


def held(t: torch.Tensor, view: str, name: str) -> _Held | None:
    """What ``t`` provably holds (None: unknown, or written since it was loaded)."""
    rec = _LEDGER.get(id(t))
    if rec is None or rec.ref() is not t or rec.version != t._version or rec.view != view or rec.name != name:
        return None
    return rec


def load_changes(
    snap: Any,
    entries: Mapping[str, ViewEntry],
    out: Mapping[str, torch.Tensor],
    since: int | None,
    verify_base: bool | None = None,
) -> set[str]:
    """Bring what it can of ``out`` (``{name: tensor}``, shapes checked) from step ``since`` to the
    snapshot's step by change maps; returns the names done (the caller reads the rest in full).
    Every tensor of ``out`` is forgotten by the ledger first: until the load succeeds, it proves nothing."""
    plans = _plan(snap, entries, out, since, verify_base) if since is not None else []
    forget(out[name] for name in entries)  # after the checksums: they are of the base
    if not plans:
        return set()
    version = snap._version
    _ask(version, plans, since)
    return _finish(snap, plans)


def _plan(
    snap: Any, entries: Mapping[str, ViewEntry], out: Mapping[str, torch.Tensor], since: int, verify: bool | None
) -> list[_Plan]:
    """The tensors of ``out`` a delta can bring up: their reads per node and the base's proofs."""
    version = snap._version
    plans = []
    for name, entry in entries.items():
        fqn = delta_source(snap, entry)
        if fqn is None:
            continue
        dst, m = out[name], version.merged[fqn]
        boxes: dict[str, list[Box]] = {}
        for read in plan_box(m, m.box):
            boxes.setdefault(read.node, []).append(read.box)
        rec = _LEDGER.get(id(dst))
        if rec is not None and (rec.ref() is not dst or (rec.step, rec.view, rec.name) != (since, snap.view, name)):
            rec = None  # another tensor's, another step's: nothing known of this one's base
        proven = verify is not True and rec is not None and rec.version == dst._version
        proofs = {}
        for node in boxes:
            base = rec.bases.get(node) if rec is not None else None
            seq = base[0] if base is not None and base[1] == version.leases[node][0].session else 0
            layout = version.parts.get(node, {}).get(fqn)
            if proven and seq:
                proofs[node] = (seq, None)
            elif verify is not False and layout is not None:  # the checksums of what dst holds now
                proofs[node] = (seq, [_box_sum(dst, b.box, entry.rows) for b in layout.blocks])
        plan = _Plan(name, fqn, dst, boxes, proofs, rows=entry.rows)
        plan.whole = [(n, b) for n, bs in boxes.items() if n not in proofs for b in bs]
        if len(plan.whole) < sum(len(bs) for bs in boxes.values()):
            plans.append(plan)
    return plans


def _ask(version: Any, plans: list[_Plan], since: int) -> None:
    """Ask every node for the changes of the boxes it serves (up to PIPELINE requests in flight per
    node, every node at once) and write them; what a node cannot give goes to each plan's ``whole``.
    A reply answers a prefix of its batch (the rest would pass the node's reply bound): the rest is
    asked for again."""
    groups: dict[tuple, list[_Plan]] = {}
    for plan in plans:
        for node, (seq, _) in plan.proofs.items():
            mapped = isinstance(version.sources[node], SharedMemorySource)
            groups.setdefault((node, plan.dst.dtype, seq, mapped), []).append(plan)
    queues: dict[str, deque] = {}
    for key, members in groups.items():
        node = key[0]
        sizes = [sum(b.numel for b in plan.boxes[node]) for plan in members]
        for batch in batches(members, sizes, [len(plan.boxes[node]) for plan in members]):
            queues.setdefault(node, deque()).append((key, batch))
    broken: set[tuple] = set()  # groups whose base the node does not know: the rest of them is read whole
    timeout = version._reader.timeout
    while any(queues.values()):
        sent = []
        for node, queue in queues.items():
            window = 0
            while queue and window < PIPELINE:
                key, batch = queue.popleft()
                if key in broken:
                    _read_whole(node, batch)
                    continue
                conn, lease = version.leases[node]
                try:
                    sent.append((key, batch, conn.send(_request(lease, since, key, node, batch))))
                except StagerError as exc:
                    raise version._failed(node, exc, batch[0].fqn) from None
                window += 1
        for key, batch, rid in sent:  # every reply is taken, even after a failure: none is left on a connection
            node, dtype, _, mapped = key
            try:
                reply = version.leases[node][0].wait_reply(rid, timeout, "changes", ChangesReply)
            except StagerError as exc:
                if exc.code != ErrorCode.UNKNOWN_BASE:
                    raise version._failed(node, exc, batch[0].fqn) from None
                log.debug("delta read of step %d from %d on node %s: %s", version.step, since, node, exc.message)
                broken.add(key)
                _read_whole(node, batch)
                continue
            n = _apply(version, node, batch, reply, dtype, mapped)
            if n < len(batch):
                queues[node].appendleft((key, batch[n:]))


def _request(lease: int, since: int, key: tuple, node: str, batch: list[_Plan]) -> Changes:
    _, dtype, seq, mapped = key
    msg = Changes(
        lease=lease,
        since=since,
        since_seq=seq,
        dtype=dtype_name(dtype),
        want="indices" if mapped else "values",
        fqns=[p.fqn for p in batch],
    )
    boxes = [
        [] if p.boxes[node] == [p.dst_box] else [[list(b.offset), list(b.shape)] for b in p.boxes[node]] for p in batch
    ]
    if any(boxes):  # only where a node serves part of a tensor: a one-node reader's request is as before
        msg.boxes = boxes
    sums = [p.proofs[node][1] for p in batch]
    if any(s is not None for s in sums):
        msg.sums = sums
    return msg


def _read_whole(node: str, batch: list[_Plan]) -> None:
    for plan in batch:
        plan.whole.extend((node, b) for b in plan.boxes[node])


def _finish(snap: Any, plans: list[_Plan]) -> set[str]:
    """Read whole the boxes no change map covered (of tensors not read whole by the caller); the names done."""
    version = snap._version
    done: set[str] = set()
    wants, into = [], []
    for plan in plans:
        if len(plan.whole) == sum(len(bs) for bs in plan.boxes.values()):
            continue  # no node gave changes: the caller reads it whole, in one piece
        m = version.merged[plan.fqn]
        cast = snap._wire_cast(plan.fqn, plan.dst.dtype)
        for node, box in plan.whole:
            wants.append(
                Want(plan.fqn, box, dtype_from_name(m.dtype), [Read(node, box, (0,) * len(box.shape))], None, cast)
            )
            into.append((plan, box))
        done.add(plan.name)
    for (plan, box), (_, t) in zip(into, move(wants, version.sources, version._failed)):
        _put(plan, box, t)
    return done


def _put(plan: _Plan, box: Box, t: torch.Tensor) -> None:
    """Write box ``box`` of the native tensor (``t``, read whole) where ``plan.dst`` holds it."""
    if plan.rows is None:
        narrow_box(plan.dst, box.offset, box.shape).copy_(t)
        return
    cols, rows = _native_rows(plan.dst, box, plan.rows)
    cols[rows] = t.to(device=plan.dst.device, dtype=plan.dst.dtype)


def _native_rows(dst: torch.Tensor, box: Box, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dst``'s columns of native box ``box`` (all its rows), and the rows of ``dst`` that hold the box's
    native rows, in order (native row r is dst's row rows[r])."""
    cols = narrow_box(dst, (0, *box.offset[1:]), (dst.shape[0], *box.shape[1:]))
    return cols, rows[box.offset[0] : box.offset[0] + box.shape[0]].to(dst.device)


def _box_sum(dst: torch.Tensor, box: Box, rows: torch.Tensor | None) -> int:
    """The crc32 of box ``box`` of the native tensor as ``dst`` holds it, in the native layout (what the
    daemon's checksums are of): through the row order ``rows`` (native row r is dst's row rows[r]) a few
    MiB of rows at a time, so a permuted copy is proven as a renamed one is, with no copy of the tensor."""
    if rows is None:
        return checksum(narrow_box(dst, box.offset, box.shape))
    cols, order = _native_rows(dst, box, rows)
    per = max(1, SUM_BYTES // max(1, cols[0].numel() * cols.element_size()))
    crc = 0
    for r in range(0, order.numel(), per):  # only the box's columns are gathered, the bytes in native order
        crc = checksum(cols.index_select(0, order[r : r + per]), crc)
    return crc


def _apply(version: Any, node: str, batch: list[_Plan], reply: ChangesReply, dtype: torch.dtype, mapped: bool) -> int:
    """Write the changed elements of the tensors of ``batch`` the reply answers (a prefix; their
    count returned) from ``node``, all of it checked first (:func:`.change_replies.parse`); a tensor
    the node answers ``whole`` (too dense, reshaped, unproven base) has its boxes there read whole."""
    boxes = [None if p.boxes[node] == [p.dst_box] else [(b.offset, b.shape) for b in p.boxes[node]] for p in batch]
    want = "indices" if mapped else "values"
    answers = parse(reply, [p.fqn for p in batch], [tuple(p.dst.shape) for p in batch], dtype, want, boxes)
    for plan, answer in zip(batch, answers):
        if plan.proofs.get(node, (0, None))[1] is not None and not reply.checked:
            # a daemon that predates sums dropped them unread: its delta holds only for the base its
            # seq names, which this copy may not be (written since): read whole
            plan.whole.extend((node, b) for b in plan.boxes[node])
        elif answer.kind == INDICES:
            vals = _gathered(version, node, plan, answer.indices, plan.dst) if mapped else answer.values
            apply(plan.dst, view_indices(answer.indices, plan.rows, plan.dst.shape), vals)
        elif answer.kind != UNCHANGED:  # whole: read from this node in full
            plan.whole.extend((node, b) for b in plan.boxes[node])
    return len(answers)


def _gathered(version: Any, node: str, plan: _Plan, idx: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The values at flat ``idx`` of the boxes ``node`` serves of the tensor, from its mapped segment."""
    src, boxes = version.sources[node], plan.boxes[node]
    if boxes == [plan.dst_box]:
        return gather(src.map(plan.fqn, boxes[0]), idx, dst.dtype)
    coords = unravel(idx, dst.shape)
    out = torch.empty(idx.numel(), dtype=dst.dtype)
    seen = torch.zeros(idx.numel(), dtype=torch.bool)
    for box in boxes:
        hit = inside(coords, box.offset, box.shape)
        local = coords[hit] - torch.tensor(box.offset, dtype=torch.int64)
        out[hit] = src.map(plan.fqn, box)[tuple(local.unbind(1))].to(dst.dtype)
        seen |= hit
    if not bool(seen.all()):
        raise StagerError(ErrorCode.BAD_MESSAGE, f"{plan.fqn}: changes reply holds an index outside the boxes asked")
    return out
