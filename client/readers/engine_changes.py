"""Changes since a base, for a reader that tracks its base itself (an inference engine), not through
:meth:`~stager.client.Snapshot.load_into`'s ledger (:mod:`.delta`).

:func:`base_of` names the version a snapshot holds as a later base; :func:`changes_since` asks the daemon, in one
or a few :class:`~stager.protocol.Changes` requests, what changed since that base in the reader's dtype: per name,
unchanged / indices / whole, and for indices (when asked) the changed elements' flat indices and new values
(gathered from shared memory on the daemon's host; from elsewhere only they and their indices cross the wire).
One-node versions only: a multi-node version reads in full here (the ledger path of :mod:`.delta` covers those).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch

from stager.protocol import Changes, ChangesReply, ErrorCode, StagerError
from stager.protocol.changes import DENSE, INDICES, WHOLE, gather
from stager.protocol.dtypes import dtype_name
from stager.protocol.reads import MAX_CHANGE_TENSORS

from .delta import BATCH_BYTES, _delta_source, _frame

log = logging.getLogger("stager.client")


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
