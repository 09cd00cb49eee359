"""How a reader's view maps onto the staged tensors (pure functions, meta tensors only).

The HF view is the adapter applied per tensor. Run on meta tensors it tells, without touching
data, each HF name's native source, shape and dtype, and whether the HF tensor is a strided
view of the native one (a rename, an expert picked out of a grouped tensor, a transpose): then
a box of the HF tensor is a box of the native tensor, which is all a remote reader fetches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from stager.protocol.layout import dense_strides

from ..adapters import hf_names


@dataclasses.dataclass(frozen=True)
class ViewEntry:
    name: str  # name in the view
    source: str  # native tensor it comes from
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the tensor before any requested cast
    strided: tuple | None  # (shape, stride, storage offset) when a strided view of the whole source
    # the whole source with its rows reordered (the adapter's rotary permutation): the HF row of each
    # source row (:func:`~stager.client.adapters.base.hf_row_orders`), else None
    rows: torch.Tensor | None = dataclasses.field(default=None, compare=False)

    def whole_native(self, native_shape: tuple[int, ...]) -> bool:
        """Whether this is its whole native tensor (of ``native_shape``) renamed, or with its rows reordered
        (``rows``): element for element the native tensor's, up to the row order."""
        shape = tuple(native_shape)
        if tuple(self.shape) != shape:
            return False
        if self.rows is not None:
            return len(shape) >= 1 and tuple(self.rows.shape) == (shape[0],)
        if self.strided is None:
            return False
        strided_shape, stride, offset = self.strided
        return tuple(strided_shape) == shape and tuple(stride) == dense_strides(shape) and offset == 0


def hf_index(adapter: Any, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> dict[str, ViewEntry]:
    """``{hf name: ViewEntry}`` for native ``(name, dtype, shape)`` triples, in native order: the
    adapter's :func:`~stager.client.adapters.hf_names` (meta tensors, the same plan an exporter
    makes). A whole-dict adapter gives names, shapes and dtypes only (``source`` empty).

    >>> from stager.client.adapters import IdentityAdapter
    >>> hf_index(IdentityAdapter(), [("w", torch.float32, (2, 3))])["w"].strided
    ((2, 3), (3, 1), 0)
    """
    return {
        t.name: ViewEntry(t.name, t.source, t.shape, t.dtype, t.strided, t.rows) for t in hf_names(adapter, tensors)
    }


def native_box(
    native_shape: tuple[int, ...], strided: tuple, offsets: tuple[int, ...], sizes: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...], list[int]] | None:
    """The box of the (contiguous) native tensor that holds box ``(offsets, sizes)`` of a strided
    view of it, and the native dimension each view dimension runs along (-1: size 1). None when
    the view does not map dimension to dimension (then read the whole tensor).

    >>> native_box((4, 6), ((6, 4), (1, 6), 0), (2, 0), (3, 4))  # the transpose: rows 2..4 = columns 2..4
    ((0, 2), (4, 3), [1, 0])
    >>> native_box((5, 4), ((5, 4), (4, 1), 0), (0, 2), (5, 1))  # one column: a size-1 box keeps its offset
    ((0, 2), (5, 1), [0, 1])
    """
    shape, stride, storage_offset = strided
    native_strides = []
    acc = 1
    for n in reversed(native_shape):
        native_strides.insert(0, acc)
        acc *= n
    base = []
    rest = storage_offset
    for s in native_strides:
        base.append(rest // s)
        rest %= s
    box_off, box_size = list(base), [1] * len(native_shape)
    dims: list[int] = []
    used: set[int] = set()
    for k, (n, st) in enumerate(zip(shape, stride)):
        candidates = [p for p, s in enumerate(native_strides) if s == st and native_shape[p] > 1 and p not in used]
        if n == 1 and not candidates:  # a size-1 dimension of its own (an unsqueeze): nothing to pick
            if offsets[k]:
                return None
            dims.append(-1)
            continue
        if not candidates:
            return None
        p = candidates[0]
        if base[p] + n > native_shape[p]:
            return None
        used.add(p)
        dims.append(p)
        box_off[p] = base[p] + offsets[k]
        box_size[p] = sizes[k]
    return tuple(box_off), tuple(box_size), dims


def arrange(block: torch.Tensor, dims: list[int], sizes: tuple[int, ...]) -> torch.Tensor:
    """Turn a native box read for :func:`native_box` into the view's box (dimension order)."""
    mapped = sorted(p for p in dims if p >= 0)
    t = block.reshape([block.shape[p] for p in mapped])
    order = [mapped.index(p) for p in dims if p >= 0]
    return t.permute(order).reshape(sizes)
