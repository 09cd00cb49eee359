"""A kept change map in a few arrays: one row per tensor (or block), not one Python object per tensor.

Why: the daemon keeps up to ``--change-maps-keep`` maps (64 by default) of thousands of tensors each.
As per-tensor :class:`~stager.protocol.changes.Change` objects and index tensors, a map of 1000
tensors held ~1200 GC-tracked objects: the kept maps grew the heap by ~80k objects, set off a full
collection every ~30 maps and made each one walk them (~100 ms of CPU holding the GIL, the loop
answering no Begin meanwhile). A :class:`Table` holds the same in numpy arrays (which the GC does
not track): its kinds, counts, numels, checksums and all its changed indices, one array each, so
that a map costs the GC a handful of objects whatever its tensor count (bench/gc_change_maps.py).
Rows are found by key through :class:`Keys`, shared by the maps of one layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy
import torch

from stager.protocol.changes import INDICES, KINDS, UNCHANGED, WHOLE, Change

_CODE = {kind: code for code, kind in enumerate(KINDS)}  # KINDS' order ranks them: unchanged < indices < whole
_UNCHANGED, _WHOLE = _CODE[UNCHANGED], _CODE[WHOLE]
NO_SUM = -1  # a row without checksums (a tensor read whole: new, or changed shape or dtype); a crc32 is >= 0
Key = tuple[int, int]  # a version's (step, seq): a step number may be staged again by a restarted job, a seq never


class Keys:
    """The keys of a map's rows in order (an fqn, or (fqn, block index): a job spanning nodes), their
    rows, and per row which tensor (by name) it is of. Immutable: maps of the same layout share one."""

    __slots__ = ("order", "rows", "groups", "tensors")

    def __init__(self, order: Sequence):
        self.order = tuple(order)
        self.rows = {key: row for row, key in enumerate(self.order)}
        names: dict = {}
        groups = [names.setdefault(k if isinstance(k, str) else k[0], len(names)) for k in self.order]
        self.groups = numpy.array(groups, dtype=numpy.int64)
        self.tensors = len(names)


class Table:
    """One reader dtype's map of one version: per row its kind, changed count, numel, checksums in
    that dtype (of the base and of the version; ``NO_SUM``: none), and where its changed indices lie
    in ``indices`` (all rows' int32 indices, one after the other)."""

    __slots__ = ("keys", "kinds", "counts", "numels", "starts", "indices", "sums")

    def __init__(self, keys: Keys, changes: Sequence[Change], sums: Sequence[tuple | None]):
        self.keys = keys
        self.kinds = numpy.array([_CODE[c.kind] for c in changes], dtype=numpy.int8)
        self.counts = numpy.array([c.count for c in changes], dtype=numpy.int64)
        self.numels = numpy.array([c.numel for c in changes], dtype=numpy.int64)
        held = [c.indices.numel() if c.indices is not None else 0 for c in changes]
        self.starts = numpy.zeros(len(changes) + 1, dtype=numpy.int64)
        numpy.cumsum(held, out=self.starts[1:])
        parts = [c.indices.numpy() for c in changes if c.indices is not None and c.indices.numel()]
        # a copy of their own: a view would keep the index tensors (tracked objects) alive with it
        self.indices = numpy.concatenate(parts) if parts else numpy.empty(0, dtype=numpy.int32)
        self.sums = numpy.array([s if s is not None else (NO_SUM, NO_SUM) for s in sums], dtype=numpy.int64)
        self.sums = self.sums.reshape(len(changes), 2)

    @property
    def nbytes(self) -> int:
        """Memory the map holds (its arrays; the keys are shared)."""
        return sum(a.nbytes for a in (self.kinds, self.counts, self.numels, self.starts, self.indices, self.sums))

    def sum(self, key, which: int) -> int | None:
        """``key``'s checksum of the base (``which`` 0) or of the version (1); None: none recorded."""
        row = self.keys.rows.get(key)
        if row is None:
            return None
        crc = int(self.sums[row, which])
        return None if crc == NO_SUM else crc

    def summary(self, base: int, sizes: Sequence[int]) -> dict:
        """The version's status entry for this dtype: what changed since step ``base``. ``sizes``: each
        row's element size in this dtype. ``bytes``: the changed elements' share of the version's bytes
        in that dtype; ``delta_bytes``: what a delta read moves (indices and values, plus the tensors
        read whole), against ``full_bytes``. A tensor mapped per block (a job spanning nodes) counts once."""
        size = numpy.asarray(sizes, dtype=numpy.int64)
        numel, count = int(self.numels.sum()), int(self.counts.sum())
        full, changed = int((self.numels * size).sum()), int((self.counts * size).sum())
        indexed, whole = self.kinds == _CODE[INDICES], self.kinds == _CODE[WHOLE]
        delta = int((self.counts * (4 + size))[indexed].sum() + (self.numels * size)[whole].sum())
        per = numpy.zeros(self.keys.tensors, dtype=numpy.int8)  # each tensor's kind: its blocks' highest
        numpy.maximum.at(per, self.keys.groups, self.kinds)
        return {
            "since": base,
            "elements": round(count / numel, 6) if numel else 0.0,
            "bytes": round(changed / full, 6) if full else 0.0,
            "tensors": [int((per != _CODE[UNCHANGED]).sum()), int(per.size)],
            "whole": int((per == _CODE[WHOLE]).sum()),
            "delta_bytes": delta,
            "full_bytes": full,
        }


class Reading:
    """A table read by one request: its columns as Python lists (one conversion each, then a key
    costs list lookups, not numpy scalars) and one unchanged :class:`Change` per numel (immutable,
    shared): ~0.3 us a key instead of ~1.2. Made per request, never kept (lists are GC-tracked)."""

    __slots__ = ("table", "kinds", "counts", "numels", "starts", "_unchanged")

    def __init__(self, table: Table):
        self.table = table
        self.kinds, self.counts = table.kinds.tolist(), table.counts.tolist()
        self.numels, self.starts = table.numels.tolist(), table.starts.tolist()
        self._unchanged: dict[int, Change] = {}

    def get(self, key) -> Change | None:
        """``key``'s change (None: not in the table); its indices are a view of the table's."""
        row = self.table.keys.rows.get(key)
        if row is None:
            return None
        kind, numel = self.kinds[row], self.numels[row]
        if kind == _UNCHANGED:
            got = self._unchanged.get(numel)
            if got is None:
                got = self._unchanged[numel] = Change(UNCHANGED, 0, numel)
            return got
        if kind == _WHOLE:
            return Change(WHOLE, self.counts[row], numel)
        indices = torch.from_numpy(self.table.indices[self.starts[row] : self.starts[row + 1]])  # a view
        return Change(INDICES, self.counts[row], numel, indices)


@dataclasses.dataclass(slots=True)
class Record:
    """A kept map of a version: against its ``base``, per reader dtype (wire name); the base's
    checksums in it outlive the base's data. A few GC-tracked objects whatever its tensor count."""

    base: Key
    maps: dict[str, Table]
    nbytes: int
