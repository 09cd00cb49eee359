"""Change maps: which elements of a tensor differ between two versions, in the dtype a reader takes.

Pure functions, shared by the daemon (which computes maps after a seal) and readers (which apply
them). What changed is decided bitwise after the reader's cast: an fp32 master weight that moved
by less than half a bf16 ulp is unchanged for a bf16 reader (in an RL step ~70% of fp32 elements
move, ~2% of their bf16 cast does), so maps are computed per reader dtype, at element granularity.

Each tensor's map is one of:

- ``unchanged``: the reader's copy is already right, nothing moves;
- ``indices``: the flat element indices (int32, ascending) that changed; their values are read
  from the new version (a reader on the daemon's host gathers them itself, a remote one gets them
  gathered by the daemon, in its dtype);
- ``whole``: too much changed (over ``DENSE`` of the elements: indices plus values would cost more
  than the tensor), or the tensor is new, reshaped or too big to index with int32: read it whole.

>>> prev, new = torch.ones(8), torch.ones(8)
>>> new[3] = 2.0
>>> c = diff(prev, new, torch.bfloat16)
>>> c.kind, c.count, c.indices.tolist()
('indices', 1, [3])
>>> diff(prev, prev + 1e-4, torch.bfloat16).kind  # below bf16's precision: nothing moves
'unchanged'
"""

from __future__ import annotations

import bisect
import dataclasses
import zlib
from collections.abc import Callable, Iterable, Sequence

import numpy
import torch

UNCHANGED = "unchanged"
INDICES = "indices"
WHOLE = "whole"
KINDS = (UNCHANGED, INDICES, WHOLE)
DENSE = 0.25  # above this fraction of changed elements a tensor is read whole (int32 indices + values cost more)
MAX_INDEXED = 2**31 - 1  # int32 flat indices: larger tensors are read whole when changed
CHUNK = 1 << 22  # elements cast and compared at a time: bounds the temporaries to a few tens of MiB
SPAN_CHUNK = 1 << 18  # the same for regions of many tensors (diff_spans): the temporaries stay in cache
SPAN_GROUP = 128  # tensors beginning in one chunk of diff_spans at most: bounds its per-tensor Python (~1 ms)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclasses.dataclass(frozen=True)
class Change:
    """One tensor's change map. ``count``: elements that changed (for ``whole`` as measured, or
    ``numel`` when unknown); ``indices``: int32 flat indices for ``indices``, else None."""

    kind: str
    count: int
    numel: int
    indices: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Memory the map holds."""
        return self.indices.numel() * 4 if self.indices is not None else 0


def compare_dtype(stored: torch.dtype, reader: torch.dtype) -> torch.dtype:
    """The dtype a reader asking for ``reader`` sees a tensor stored as ``stored`` in (what a map is
    computed in): readers cast floating tensors only."""
    return reader if stored.is_floating_point else stored


def whole(numel: int) -> Change:
    return Change(WHOLE, numel, numel)


def encode(indices: torch.Tensor, numel: int, dense: float = DENSE) -> Change:
    """The encoding of a tensor whose changed flat indices are ``indices`` (any int dtype, ascending)."""
    count = int(indices.numel())
    if count == 0:
        return Change(UNCHANGED, 0, numel)
    if count > dense * numel or numel > MAX_INDEXED:
        return Change(WHOLE, count, numel)
    return Change(INDICES, count, numel, indices.to(torch.int32))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as integers of the same size (so NaNs and signed zeros compare by their bits)."""
    if t.dtype.is_complex:
        return t.view(t.dtype.to_real()).view(_INT_OF_SIZE[t.dtype.itemsize // 2]).view(-1, 2)
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view(_INT_OF_SIZE[t.dtype.itemsize])


def changed_indices(
    prev: torch.Tensor, new: torch.Tensor, dtype: torch.dtype, chunk: int = CHUNK, sums: list[int] | None = None
) -> torch.Tensor:
    """Flat indices (int64, ascending) of the elements of ``new`` whose cast to ``dtype`` differs
    bitwise from ``prev``'s. Both are contiguous tensors of the same shape and dtype. ``sums``
    (``[None, 0]``): set to the :func:`checksum` of ``prev`` and of ``new`` in ``dtype``, taken from
    the cast chunks as they are compared (no second cast); a ``prev`` checksum already known (not
    None: the previous map computed it as its ``new``'s) is kept."""
    if prev.shape != new.shape or prev.dtype != new.dtype:
        raise ValueError(f"cannot compare {prev.dtype} {list(prev.shape)} with {new.dtype} {list(new.shape)}")
    a, b = prev.reshape(-1), new.reshape(-1)
    found = []
    own = sums is not None and sums[0] is None
    if own:
        sums[0] = 0
    for start in range(0, a.numel(), chunk):
        x, y = a[start : start + chunk], b[start : start + chunk]
        if x.dtype != dtype:
            x, y = x.to(dtype), y.to(dtype)
        if own:
            sums[0] = zlib.crc32(_raw(x), sums[0])
        if sums is not None:
            sums[1] = zlib.crc32(_raw(y), sums[1])
        ne = _bits(x) != _bits(y)
        if ne.dim() > 1:  # complex: either half
            ne = ne.any(dim=-1)
        idx = ne.nonzero().view(-1)
        if idx.numel():
            found.append(idx + start)
    return torch.cat(found) if found else torch.empty(0, dtype=torch.int64)


def diff_spans(
    prev: torch.Tensor,
    new: torch.Tensor,
    spans: list[tuple[int, int]],
    dtype: torch.dtype,
    dense: float = DENSE,
    chunk: int = SPAN_CHUNK,
    cancel: Callable[[], bool] | None = None,
    sums: list[list] | None = None,
    group: int = SPAN_GROUP,
) -> list[Change] | None:
    """The change maps of several tensors at once, one per span: ``prev`` and ``new`` are the same
    flat region (1-D, one stored dtype) of two versions, ``spans`` the ``(start, numel)`` of each
    tensor in it, ascending and disjoint; elements between spans (alignment padding) are ignored.

    One cast-and-compare pass per chunk of the region, not one per tensor: a thousand small
    tensors cost what one tensor of their total size does (per-tensor Python only where something
    changed), and a chunk whose bits are all equal is not cast at all (frozen weights, norms).
    Chunks are small enough to stay in cache through the casts and the compare; numpy compares
    and finds the changed positions (its nonzero is ~2x torch's here).
    A chunk holds at most ``chunk`` elements and the starts of at most ``group`` tensors, so that
    ``cancel``, asked between chunks (and every ``group`` tensors of the maps' encoding), is asked
    often; True stops the work (returns None). ``sums``: one
    ``[base's crc32 or None, 0]`` per span, set as :func:`changed_indices` sets its own, from the
    same cast chunks (a chunk of equal bits is then cast once, for both)."""
    if prev.shape != new.shape or prev.dtype != new.dtype or prev.dim() != 1:
        raise ValueError(f"cannot compare {prev.dtype} {list(prev.shape)} with {new.dtype} {list(new.shape)}")
    if not spans:
        return []
    cast = compare_dtype(new.dtype, dtype)
    firsts = [s for s, _ in spans]
    starts = numpy.array(firsts, dtype=numpy.int64)
    ends = starts + numpy.array([n for _, n in spans], dtype=numpy.int64)
    counts = [0] * len(spans)
    parts: list[list[torch.Tensor] | None] = [[] for _ in spans]  # None: whole (too dense to index)
    own = [s[0] is None for s in sums] if sums is not None else None
    for i, mine in enumerate(own or ()):
        if mine:
            sums[i][0] = 0
    for lo, hi in _chunks(firsts, spans[0][0], int(ends[-1]), chunk, group):
        if cancel is not None and cancel():
            return None
        x, y = prev[lo:hi], new[lo:hi]
        if torch.equal(_bits(x), _bits(y)):
            if sums is not None:  # same bits: same cast, one for both checksums
                _crcs(sums, own, spans, bisect.bisect_right(firsts, lo) - 1, lo, None, y.to(cast))
            continue  # nothing to find
        if x.dtype != cast:
            x, y = x.to(cast), y.to(cast)
        if sums is not None:
            _crcs(sums, own, spans, bisect.bisect_right(firsts, lo) - 1, lo, x, y)
        ne = _bits(x).numpy() != _bits(y).numpy()
        if ne.ndim > 1:  # complex: either half
            ne = ne.any(axis=-1)
        pos = numpy.flatnonzero(ne)
        if not pos.size:
            continue
        pos += lo
        first = bisect.bisect_right(firsts, lo) - 1
        if first + 1 == len(spans) or firsts[first + 1] >= hi:  # one tensor (or its tail padding)
            pos = pos[: numpy.searchsorted(pos, ends[first])] - firsts[first]
            found = [(first, pos)] if pos.size else []
        else:
            owner = numpy.searchsorted(starts, pos, side="right") - 1
            inside = pos < ends[owner]
            if not inside.all():  # padding between tensors
                pos, owner = pos[inside], owner[inside]
            local = pos - starts[owner]
            cuts = numpy.flatnonzero(owner[1:] != owner[:-1]) + 1
            found = zip(owner[numpy.concatenate(([0], cuts))].tolist(), numpy.split(local, cuts)) if pos.size else []
        for i, piece in found:
            counts[i] += piece.size
            got = parts[i]
            if got is None:
                continue
            numel = spans[i][1]
            if counts[i] > dense * numel or numel > MAX_INDEXED:
                parts[i] = None
            else:
                got.append(torch.from_numpy(piece.astype(numpy.int32)))
    out = []
    for i, ((_, numel), count, got) in enumerate(zip(spans, counts, parts)):
        if cancel is not None and i % group == group - 1 and cancel():  # ~1 us a tensor: asked as often
            return None
        if got is None:
            out.append(Change(WHOLE, count, numel))
        else:
            out.append(encode(torch.cat(got) if len(got) > 1 else got[0] if got else _NONE, numel, dense))
    return out


_NONE = torch.empty(0, dtype=torch.int32)


def _chunks(firsts: list[int], lo: int, stop: int, chunk: int, group: int) -> Iterable[tuple[int, int]]:
    """The ``[lo, hi)`` of each chunk of :func:`diff_spans`: at most ``chunk`` elements, and at most
    ``group`` tensors (of ascending starts ``firsts``) beginning in it."""
    while lo < stop:
        hi = min(lo + chunk, stop)
        j = bisect.bisect_left(firsts, lo) + group
        if j < len(firsts) and lo < firsts[j] < hi:  # empty tensors share a start: never an empty chunk
            hi = firsts[j]
        yield lo, hi
        lo = hi


def _crcs(sums: list, own: list, spans: list, first: int, lo: int, x: torch.Tensor | None, y: torch.Tensor) -> None:
    """Feed the part of each span inside the chunk at ``lo`` (``y``: new's, ``x``: the base's, None:
    the same bytes) to its checksums; ``first``: the span holding ``lo`` (-1: padding before it)."""
    hi = lo + y.shape[0]
    i = max(first, 0)
    while i < len(spans) and spans[i][0] < hi:
        a, b = max(spans[i][0], lo) - lo, min(spans[i][0] + spans[i][1], hi) - lo
        if a < b:
            new = _raw(y[a:b])
            sums[i][1] = zlib.crc32(new, sums[i][1])
            if own[i]:
                sums[i][0] = zlib.crc32(new if x is None else _raw(x[a:b]), sums[i][0])
        i += 1


def diff(
    prev: torch.Tensor,
    new: torch.Tensor,
    dtype: torch.dtype,
    dense: float = DENSE,
    chunk: int = CHUNK,
    sums: list[int] | None = None,
) -> Change:
    """The change map from ``prev`` to ``new`` (same shape and dtype) for a reader of ``dtype``
    (``sums``: as :func:`changed_indices`'s)."""
    return encode(changed_indices(prev, new, compare_dtype(new.dtype, dtype), chunk, sums), new.numel(), dense)


def checksum(t: torch.Tensor, crc: int = 0) -> int:
    """crc32 of a tensor's bytes, row-major (the checksum stager's manifests use, as an int): what
    proves a reader's copy of a version it did not load itself. On CPU, ~0.3 s of one core per GiB
    with zlib's crc32 (a copy first for a non-contiguous or device tensor). ``crc``: the crc32 of the
    bytes before these (a checksum taken in parts)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return zlib.crc32(_raw(t.contiguous()), crc)


def _raw(t: torch.Tensor) -> numpy.ndarray:
    """A contiguous tensor's bytes as a flat uint8 array (no copy; any dtype)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def unravel(flat: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Row-major flat indices of a tensor of ``shape`` as coordinates, ``(n, len(shape))`` int64."""
    rest = flat.to(torch.int64)
    coords = []
    for n in reversed(shape):
        coords.append(rest % n)
        rest = rest // n
    return torch.stack(coords[::-1], dim=1) if coords else torch.empty(rest.numel(), 0, dtype=torch.int64)


def ravel(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`unravel`: int64 flat indices."""
    flat = torch.zeros(coords.shape[0], dtype=torch.int64)
    for d, n in enumerate(shape):
        flat = flat * n + coords[:, d]
    return flat


def inside(coords: torch.Tensor, offset: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Which of ``coords`` (as :func:`unravel` gives them) lie in the box at ``offset`` of ``shape``."""
    lo = torch.tensor(list(offset), dtype=torch.int64)
    hi = lo + torch.tensor(list(shape), dtype=torch.int64)
    return ((coords >= lo) & (coords < hi)).all(dim=1)


def union(changes: Iterable[Change], numel: int, dense: float = DENSE) -> Change:
    """One map for a chain of maps (N->N+1, ..., M-1->M): what changed in any of them. Values are
    then read from M, so the union is exact whatever happened in between."""
    parts = []
    for c in changes:
        if c.numel != numel or c.kind == WHOLE:
            return whole(numel)
        if c.kind == INDICES:
            parts.append(c.indices)
    if not parts:
        return Change(UNCHANGED, 0, numel)
    if len(parts) == 1:
        return encode(parts[0], numel, dense)
    return encode(torch.unique(torch.cat(parts)), numel, dense)  # unique sorts


def apply(dst: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` (any dtype: cast to ``dst``'s as a copy would) at flat ``indices`` (non-negative,
    each once; ascending as maps give them, or in any order: mapped through an adapter's row order) of
    contiguous ``dst``, on any device (indices and values go there first)."""
    values = values.to(device=dst.device, dtype=dst.dtype)
    flat = dst.detach().view(-1)
    if flat.device.type == "cpu" and _numpy_ok(flat.dtype):
        # numpy's put moves the bits through int32 indices ~5x faster than torch's index_put_ on CPU
        numpy.put(_ints(flat), indices.numpy(), _ints(values.reshape(-1)))
        torch.autograd.graph.increment_version(dst)  # a write like any in-place op: readers' proofs see it
        return
    # index_put_ takes the int32 indices as they are (index_copy_ wants int64: a conversion pass more)
    flat.index_put_((indices.to(device=dst.device),), values)


def gather(src: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values of ``src`` at flat ``indices`` (int32 or int64), cast to ``dtype`` as a reader's copy would."""
    flat = src.detach().reshape(-1)
    if flat.device.type == "cpu" and _numpy_ok(flat.dtype):
        picked = torch.from_numpy(_ints(flat).take(indices.numpy())).view(flat.dtype)  # bits, then the cast
        return picked.to(dtype)
    return flat.index_select(0, indices).to(dtype)


def gather_many(
    base: torch.Tensor, offsets: list[int], counts: list[int], indices: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """The values of several tensors of one flat region in one take: tensor i starts at element
    ``offsets[i]`` of ``base`` (1-D, the tensors' stored dtype) and its flat indices are the next
    ``counts[i]`` of ``indices`` (int32, in range: the caller's own maps, not checked); they are
    cast into ``out`` (1-D, the reader's dtype) as a copy would. One numpy take for them all, not
    one call per tensor: the per-tensor Python of a request is what a small delta's time is."""
    if base.device.type != "cpu" or not _numpy_ok(base.dtype):
        at = 0
        for offset, count in zip(offsets, counts):
            where = indices[at : at + count].long() + offset
            out[at : at + count] = base.index_select(0, where)
            at += count
        return out
    where = indices.numpy().astype(numpy.int64)
    where += numpy.repeat(numpy.asarray(offsets, dtype=numpy.int64), counts)
    if out.dtype == base.dtype:  # "clip" takes straight into out ("raise" would buffer: a copy more)
        _ints(base).take(where, out=_ints(out), mode="clip")
    else:
        out.copy_(torch.from_numpy(_ints(base).take(where, mode="clip")).view(base.dtype))  # bits, then the cast
    return out


def _numpy_ok(dtype: torch.dtype) -> bool:
    return not dtype.is_complex and dtype.itemsize in _INT_OF_SIZE


def _ints(t: torch.Tensor) -> numpy.ndarray:
    """A flat tensor's bits as a numpy array (no copy): numpy has no bfloat16 or float8, integers it has."""
    return t.view(_INT_OF_SIZE[t.dtype.itemsize]).numpy()
