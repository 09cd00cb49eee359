"""Delta reads: bring tensors a reader loaded from step N up to the leased step M, moving only what changed.

``Snapshot.load_into(out, since=N)`` asks the daemon for the change map N->M in each destination's
dtype (:class:`~stager.protocol.Changes`; the daemon keeps the union of its per-version maps) and
writes only the changed elements: on the daemon's host it gathers them from the mapped segment
itself (index_select, cast as a copy casts); from another host the daemon gathers them in the
reader's dtype and only indices plus values cross the wire. Tensors the map says are dense, new or
reshaped are read whole, as are those it cannot vouch for.

The reader must prove it holds N: this module keeps a process-wide ledger of what each
destination tensor was last loaded with (step, the daemon's seq and session, view and name) and
the tensor's version counter just after (``Tensor._version``, which every in-place write bumps,
through any view). A tensor written since, loaded from another step, another daemon session or
under another name is read in full. Writes that bypass the counter (``.data``, raw pointers,
another process) are not seen: do not pass ``since`` for tensors written that way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from stager.protocol import Changes, ChangesReply, ErrorCode, StagerError
from stager.protocol.changes import DENSE, INDICES, WHOLE, apply, gather
from stager.protocol.dtypes import DTYPES, FLOAT8_DTYPES, dtype_name
from stager.protocol.reads import MAX_CHANGE_TENSORS

from .views import ViewEntry

log = logging.getLogger("stager.client")
BATCH_BYTES = 64 << 20  # the most one Changes reply may carry (indices plus values, at the densest maps)


@dataclasses.dataclass(frozen=True)
class _Held:
    ref: weakref.ref
    version: int  # the tensor's version counter right after the load
    step: int
    seq: int
    session: str
    view: str
    name: str


_LEDGER: dict[int, _Held] = {}  # id(tensor) -> what it holds


def forget(tensors: Iterable[torch.Tensor]) -> None:
    """Before a load writes them: a load that fails midway leaves them unproven."""
    for t in tensors:
        _LEDGER.pop(id(t), None)


def note_loaded(snap: Any, out: Mapping[str, torch.Tensor], names: list[str]) -> None:
    """``out[name]`` now holds ``name`` of the snapshot's step (after a successful load)."""
    session = _session(snap)
    if session is None:
        return
    for name in names:
        t = out[name]
        _LEDGER[id(t)] = _Held(
            weakref.ref(t, _dropper(id(t))), t._version, snap.step, snap.seq, session, snap.view, name
        )
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
    snap: Any, entries: Mapping[str, ViewEntry], out: Mapping[str, torch.Tensor], since: int | None
) -> set[str]:
    """Bring what it can of ``out`` (``{name: tensor}``, shapes checked) from step ``since`` to the
    snapshot's step by change maps; returns the names done (the caller reads the rest in full).
    Every tensor of ``out`` is forgotten by the ledger first: until the load succeeds, it proves nothing."""
    groups = _provable(snap, entries, out, since) if since is not None else {}
    forget(out[name] for name in entries)
    done: set[str] = set()
    if not groups:
        return done
    conn, lease = next(iter(snap._version.leases.values()))
    timeout = snap._version._reader.timeout
    for (dtype, seq, mapped), members in groups.items():
        for batch in _batches(members, dtype, mapped):
            try:
                reply = conn.request(
                    Changes(
                        lease=lease,
                        since=since,
                        since_seq=seq,
                        dtype=dtype_name(dtype),
                        want="indices" if mapped else "values",
                        fqns=[fqn for _, fqn, _ in batch],
                    ),
                    timeout,
                )
            except StagerError as exc:
                if exc.code != ErrorCode.UNKNOWN_BASE:
                    raise
                log.debug("delta read of step %d from %d: %s", snap.step, since, exc.message)
                break  # this group is read in full
            if not isinstance(reply, ChangesReply) or len(reply.tensors) != len(batch):
                raise StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {reply.TYPE} reply to changes")
            done.update(_apply(snap._version, batch, reply, dtype, mapped))
    return done


def _provable(snap: Any, entries: Mapping[str, ViewEntry], out: Mapping[str, torch.Tensor], since: int) -> dict:
    """The tensors of ``out`` proven to hold step ``since``, grouped by (dtype, seq of since, same host)."""
    version = snap._version
    session = _session(snap)
    if session is None or version.members != 1:
        return {}  # multi-node versions: each node's map would be needed (read in full for now)
    groups: dict[tuple, list[tuple[str, str, torch.Tensor]]] = {}
    for name, entry in entries.items():
        dst = out[name]
        fqn = _delta_source(snap, entry)
        if fqn is None:
            continue
        rec = held(dst, snap.view, name)
        if rec is None or rec.step != since or rec.session != session:
            continue
        mapped = version.mapped(fqn) is not None
        groups.setdefault((dst.dtype, rec.seq, mapped), []).append((name, fqn, dst))
    return groups


def _delta_source(snap: Any, entry: ViewEntry) -> str | None:
    """The native tensor whose change map holds for ``entry`` element for element, or None (read in full):
    floating data that is not float8, seen through no transform (an HF rename is fine, a permutation is not)."""
    fqn = entry.source
    if not fqn or fqn in snap.quant or fqn not in snap._version.merged:
        return None
    m = snap._version.merged[fqn]
    stored = DTYPES[m.dtype]
    if not stored.is_floating_point or stored in FLOAT8_DTYPES or not m.complete:
        return None
    shape = tuple(m.shape)
    if entry.shape != shape or entry.strided != (shape, _strides(shape), 0):
        return None
    return fqn


def _batches(members: list, dtype: torch.dtype, mapped: bool) -> list[list]:
    """Tensors per request, so that a reply is at most BATCH_BYTES even if every map is at its densest."""
    per = 4 + (0 if mapped else dtype.itemsize)
    out = []
    cur = []
    size = 0
    for item in members:
        need = math.ceil(math.prod(item[2].shape) * DENSE) * per
        if cur and size + need > BATCH_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += need
    return out + ([cur] if cur else [])


def _apply(version: Any, batch: list, reply: ChangesReply, dtype: torch.dtype, mapped: bool) -> set[str]:
    """Write the changed elements of each tensor of ``batch``; returns the names done (not the whole ones)."""
    frames = reply.frames
    indices = _frame(frames[0], torch.int32) if frames else torch.empty(0, dtype=torch.int32)
    values = _frame(frames[1], dtype) if len(frames) > 1 else None
    at, done = 0, set()
    for (name, fqn, dst), (got, kind, count) in zip(batch, reply.tensors):
        if got != fqn:
            raise StagerError(ErrorCode.BAD_MESSAGE, f"changes reply names {got!r} where {fqn!r} was asked")
        if kind == INDICES:
            idx = indices[at : at + count]
            if idx.numel() != count or (not mapped and (values is None or values.numel() < at + count)):
                raise StagerError(ErrorCode.BAD_MESSAGE, f"{fqn}: changes reply is short of its {count} elements")
            if count and int(idx[0]) < 0:  # ascending: the first is the least (indexing would wrap a negative)
                raise StagerError(ErrorCode.BAD_MESSAGE, f"{fqn}: changes reply holds a negative index")
            try:  # indices out of range are refused by the indexing itself (IndexError), before any write
                vals = gather(version.mapped(fqn), idx, dst.dtype) if mapped else values[at : at + count]
                apply(dst, idx, vals)
            except (IndexError, RuntimeError) as exc:
                raise StagerError(
                    ErrorCode.BAD_MESSAGE, f"{fqn}: changes reply does not fit the tensor ({exc})"
                ) from None
            at += count
        elif kind != "unchanged":
            continue  # whole: read in full by the caller
        done.add(name)
    return done


def _frame(frame: Any, dtype: torch.dtype) -> torch.Tensor:
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    if not buf.nbytes:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only frames: only read here
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype)


@dataclasses.dataclass
class TensorChange:
    """What changed in one tensor of a view since a base (:func:`changes_since`): ``kind`` unchanged,
    indices or whole (:mod:`stager.protocol.changes`), ``count`` elements; for ``indices`` asked with
    values, the int32 flat ``indices`` and the new ``values`` in the asked dtype."""

    kind: str
    count: int
    indices: torch.Tensor | None = None
    values: torch.Tensor | None = None


def base_of(snap: Any) -> tuple[int, int, str] | None:
    """``(step, seq, daemon session)`` naming the snapshot's version as a later base of
    :func:`changes_since` (a step number may be staged again, a seq in one daemon session never);
    None for versions no change map can start from (several nodes, or no connection)."""
    session = _session(snap)
    if session is None or snap._version.members != 1:
        return None
    return snap.step, snap.seq, session


def changes_since(
    snap: Any, names: list[str], base: tuple[int, int, str], dtype: torch.dtype, values: bool
) -> dict[str, TensorChange] | None:
    """Per view name of ``names``, what changed since ``base`` (from :func:`base_of`) for a reader of
    ``dtype``: for a caller that holds the base in tensors it tracks itself (an inference engine),
    not through :meth:`Snapshot.load_into`'s ledger. ``values``: also the changed elements' indices
    and values (gathered from shared memory on the daemon's host; from elsewhere only they and their
    indices cross the wire) for names seen through a rename; those seen through a transform (a
    permutation) get their kind only, as do all with ``values`` false. A tensor no map holds is
    ``whole``. None when the daemon has no map from ``base`` (read in full)."""
    now = base_of(snap)
    if now is None or now[2] != base[2]:
        return None  # another daemon session: its seqs say nothing of the base's
    version = snap._version
    out: dict[str, TensorChange] = {}
    exact: dict[str, list[str]] = {}  # source fqn -> names it gives element for element
    counted: dict[str, list[str]] = {}
    for name in names:
        entry = snap._entry(name)
        source = entry.source
        if not source or source in snap.quant or source not in version.merged or not version.merged[source].complete:
            numel = math.prod(entry.shape)
            out[name] = TensorChange(WHOLE, numel)
            continue
        direct = values and _delta_source(snap, entry) is not None
        (exact if direct else counted).setdefault(source, []).append(name)
    conn, lease = next(iter(version.leases.values()))
    timeout = version._reader.timeout
    asks = [(False, list(counted))] if counted else []
    asks += [(True, batch) for batch in _fqn_batches(version, list(exact), dtype)]
    for want_values, fqns in asks:
        mapped = want_values and all(version.mapped(f) is not None for f in fqns)
        want = "counts" if not want_values else "indices" if mapped else "values"
        for at in range(0, len(fqns), MAX_CHANGE_TENSORS):
            part = fqns[at : at + MAX_CHANGE_TENSORS]
            try:
                reply = conn.request(
                    Changes(
                        lease=lease, since=base[0], since_seq=base[1], dtype=dtype_name(dtype), want=want, fqns=part
                    ),
                    timeout,
                )
            except StagerError as exc:
                if exc.code != ErrorCode.UNKNOWN_BASE:
                    raise
                log.debug("changes of step %d since %d: %s", snap.step, base[0], exc.message)
                return None
            if not isinstance(reply, ChangesReply) or len(reply.tensors) != len(part):
                raise StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {reply.TYPE} reply to changes")
            found = _parse(version, part, reply, dtype, want)
            for fqn, change in found.items():
                for name in (exact if want_values else counted)[fqn]:
                    out[name] = change
    return out


def _fqn_batches(version: Any, fqns: list[str], dtype: torch.dtype) -> list[list[str]]:
    """``fqns`` in requests whose replies stay under BATCH_BYTES at the densest maps."""
    per = 4 + dtype.itemsize
    out: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for fqn in fqns:
        need = math.ceil(math.prod(version.merged[fqn].shape) * DENSE) * per
        if cur and size + need > BATCH_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append(fqn)
        size += need
    return out + ([cur] if cur else [])


def _parse(version: Any, fqns: list[str], reply: ChangesReply, dtype: torch.dtype, want: str) -> dict:
    """``{fqn: TensorChange}`` of a reply, each index range checked (a bad reply is a typed error)."""
    frames = reply.frames
    indices = _frame(frames[0], torch.int32) if want != "counts" and frames else torch.empty(0, dtype=torch.int32)
    values = _frame(frames[1], dtype) if want == "values" and len(frames) > 1 else None
    at, out = 0, {}
    for fqn, (got, kind, count) in zip(fqns, reply.tensors):
        if got != fqn:
            raise StagerError(ErrorCode.BAD_MESSAGE, f"changes reply names {got!r} where {fqn!r} was asked")
        if kind != INDICES or want == "counts":
            out[fqn] = TensorChange(kind, count)
            continue
        idx = indices[at : at + count]
        numel = math.prod(version.merged[fqn].shape)
        short = idx.numel() != count or (want == "values" and (values is None or values.numel() < at + count))
        if short or (count and (int(idx[0]) < 0 or int(idx.max()) >= numel)):
            raise StagerError(ErrorCode.BAD_MESSAGE, f"{fqn}: changes reply does not fit its {numel} elements")
        vals = gather(version.mapped(fqn), idx, dtype) if want == "indices" else values[at : at + count]
        out[fqn] = TensorChange(kind, count, idx, vals)
        at += count
    return out


def _session(snap: Any) -> str | None:
    leases = snap._version.leases
    if len(leases) != 1:
        return None
    conn, _ = next(iter(leases.values()))
    return conn.session


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))
