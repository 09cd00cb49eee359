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
import functools
import logging
import math
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from stager.protocol import Changes, ChangesReply, ErrorCode, StagerError
from stager.protocol.changes import INDICES, apply, gather
from stager.protocol.dtypes import DTYPES, FLOAT8_DTYPES, dtype_name
from stager.protocol.reads import MAX_CHANGE_TENSORS

from .views import ViewEntry

log = logging.getLogger("stager.client")
PIPELINE = 4  # Changes requests in flight per delta read: the daemon gathers one while the reader applies another
MIN_BATCH = 1 << 23  # elements per request at least: a small model's delta is one request (each costs ~1 ms)


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
        ask = functools.partial(
            Changes,
            lease=lease,
            since=since,
            since_seq=seq,
            dtype=dtype_name(dtype),
            want="indices" if mapped else "values",
        )

        def applied(batch: list, reply: ChangesReply, dtype: torch.dtype = dtype, mapped: bool = mapped) -> None:
            done.update(_apply(snap._version, batch, reply, dtype, mapped))

        while members:
            members = _exchange(conn, ask, _batches(members), timeout, applied)
            if members is None:
                log.debug("delta read of step %d from %d: the daemon has no change map", snap.step, since)
                break  # the rest of this group is read in full
    return done


def _exchange(conn: Any, ask: Any, batches: list[list], timeout: float, applied: Any) -> list | None:
    """Send one Changes request per batch at once, then take the replies in order, each applied
    (``applied(batch, reply)``) as it comes: the daemon gathers the next batch meanwhile. A reply
    answers a prefix of its batch (the rest would pass its size bound): returns the tensors left,
    to ask for again; None when the daemon has no map from the reader's step (UNKNOWN_BASE)."""
    rids = [(conn.send(ask(fqns=[fqn for _, fqn, _ in batch])), batch) for batch in batches]
    rest, failed = [], False
    for rid, batch in rids:
        try:
            reply = conn.wait_reply(rid, timeout, "changes", ChangesReply)
        except StagerError as exc:
            if exc.code != ErrorCode.UNKNOWN_BASE:
                raise
            failed = True  # the other replies are taken still: none is left on the connection
            continue
        n = len(reply.tensors)
        if not 0 < n <= len(batch):
            raise StagerError(ErrorCode.BAD_MESSAGE, f"changes reply answers {n} of {len(batch)} tensors")
        if not failed:
            applied(batch[:n], reply)
            rest.extend(batch[n:])
    return None if failed else rest


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


def _batches(members: list) -> list[list]:
    """Tensors per request: up to PIPELINE requests of about equal element counts (none below
    MIN_BATCH elements unless it is the last), so that the first reply comes early and the daemon
    gathers the next while this process applies one. Their size is bounded by the daemon, whose
    reply answers a prefix of the tensors asked for when they would not fit."""
    total = sum(math.prod(item[2].shape) for item in members)
    target = max(math.ceil(total / PIPELINE), MIN_BATCH)
    out, cur, size = [], [], 0
    for item in members:
        cur.append(item)
        size += math.prod(item[2].shape)
        if size >= target or len(cur) == MAX_CHANGE_TENSORS:
            out.append(cur)
            cur, size = [], 0
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
