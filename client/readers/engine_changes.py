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
from stager.protocol.changes import INDICES, WHOLE, gather
from stager.protocol.dtypes import dtype_name

from .change_replies import batches, delta_source, hf_indices, parse, session

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
    held = session(snap)
    if held is None or snap._version.members != 1:
        return None
    return snap.step, snap.seq, held


def changes_since(
    snap: Any, names: list[str], base: tuple[int, int, str], dtype: torch.dtype, values: bool
) -> dict[str, TensorChange] | None:
    """Per view name of ``names``, what changed since ``base`` (from :func:`base_of`) for a reader of
    ``dtype``: for a caller that holds the base in tensors it tracks itself (an inference engine),
    not through :meth:`Snapshot.load_into`'s ledger. ``values``: also the changed elements' indices
    and values (gathered from shared memory on the daemon's host; from elsewhere only they and their
    indices cross the wire) for names seen through a rename or the adapter's row order (the rotary
    permutation: indices mapped to the view's rows, :func:`.change_replies.hf_indices`); those seen
    through another transform get their kind only, as do all with ``values`` false. A tensor no map
    holds is ``whole``. None when the daemon has no map from ``base`` (read in full)."""
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
        direct = values and delta_source(snap, entry) is not None
        (exact if direct else counted).setdefault(source, []).append(name)
    conn, lease = next(iter(version.leases.values()))
    timeout = version._reader.timeout
    for want_values, names_of in ((False, counted), (True, exact)):
        fqns = list(names_of)
        if not fqns:
            continue
        mapped = want_values and all(version.mapped(f) is not None for f in fqns)
        want = "counts" if not want_values else "indices" if mapped else "values"
        shapes = {f: tuple(version.merged[f].shape) for f in fqns}
        queue = batches(fqns, [math.prod(shapes[f]) for f in fqns])
        while queue:
            part = queue.pop(0)
            ask = Changes(lease=lease, since=base[0], since_seq=base[1], dtype=dtype_name(dtype), want=want, fqns=part)
            try:
                reply = conn.request(ask, timeout, expect=ChangesReply)
            except StagerError as exc:
                if exc.code != ErrorCode.UNKNOWN_BASE:
                    raise
                log.debug("changes of step %d since %d: %s", snap.step, base[0], exc.message)
                return None
            answers = parse(reply, part, [shapes[f] for f in part], dtype, want)
            if len(answers) < len(part):  # a prefix: the rest would pass the daemon's reply bound
                queue.insert(0, part[len(answers) :])
            for fqn, a in zip(part, answers):
                if a.kind == INDICES and a.indices is not None:
                    vals = gather(version.mapped(fqn), a.indices, dtype) if want == "indices" else a.values
                    for name in names_of[fqn]:
                        out[name] = TensorChange(a.kind, a.count, hf_indices(snap._entry(name), a.indices), vals)
                    continue
                for name in names_of[fqn]:
                    out[name] = TensorChange(a.kind, a.count)
    return out
