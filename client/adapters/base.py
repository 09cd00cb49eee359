"""The adapter contract, the one set of functions that apply it, and what adapters share.

Two kinds of adapter plug in:

* :class:`Adapter`: ``to_hf(state_dict)`` and ``from_hf(hf_state_dict)`` on whole dicts
  (torchtitan's StateDictAdapter shape, so theirs plug in as they are; they run eagerly, once
  per version, on the whole state dict).
* :class:`PerTensorAdapter`: an Adapter that also converts one tensor at a time with
  ``to_hf_items(name, tensor)`` (every built-in one). An exporter then never holds a second
  copy of the model, and a reader can tell from meta tensors which HF tensors are views of
  staged ones.

Readers and exporters never call an adapter's methods themselves: they go through
:func:`hf_names` (the HF names, shapes and dtypes of a layout, from meta tensors, no bytes),
:func:`hf_items` (one native tensor, per-tensor adapters) and :func:`to_hf_items` (any adapter:
per tensor when it can, else the whole dict once).

>>> a = IdentityAdapter()
>>> isinstance(a, PerTensorAdapter), [(t.name, t.shape) for t in hf_names(a, [("w", torch.float32, (2, 3))])]
(True, [('w', (2, 3))])
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from stager.protocol import ErrorCode, StagerError

from .config import Schema, check_config

__all__ = [
    "Adapter",
    "HFTensor",
    "IdentityAdapter",
    "PerTensorAdapter",
    "adapter_error",
    "check_adapter",
    "fill_hf",
    "hf_flat_indices",
    "hf_items",
    "hf_names",
    "hf_row_orders",
    "is_lora",
    "is_per_tensor",
    "permute_for_hf_rotary",
    "rotary_rows",
    "to_hf_items",
    "unpermute_from_hf_rotary",
]

# LoRA weights beside a linear layer's weight, as torchtune names them: no base model tensor of any
# adapter, so HF views and exports leave them out (PEFT export: stager/writers/export_peft.py)
LORA_NAME = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[ab])\.weight$")


def is_lora(name: str) -> bool:
    """``<module>.lora_a.weight`` / ``<module>.lora_b.weight``.

    >>> is_lora("layers.0.attention.wq.lora_a.weight"), is_lora("layers.0.attention.wq.weight")
    (True, False)
    """
    return LORA_NAME.match(name) is not None


@runtime_checkable
class Adapter(Protocol):
    """Whole-dict conversion, native (training) names and layouts <-> HF ones."""

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]: ...

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]: ...


@runtime_checkable
class PerTensorAdapter(Adapter, Protocol):
    """An adapter that converts one native tensor at a time: ``to_hf_items(name, tensor)`` gives
    its ``[(hf name, tensor)]`` (none: not exported; several: e.g. experts split out)."""

    def to_hf_items(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]: ...


def adapter_error(message: str) -> StagerError:
    return StagerError(ErrorCode.BAD_VALUE, message)


def check_adapter(adapter: Any, what: str) -> Adapter:
    """``adapter`` if it satisfies :class:`Adapter`, else BAD_VALUE naming ``what`` it came from."""
    if not isinstance(adapter, Adapter):
        raise adapter_error(
            f"{what} ({type(adapter).__name__}) has no to_hf/from_hf: an adapter must offer both "
            "(torchtitan's StateDictAdapter shape); to_hf_items(name, tensor) is optional"
        )
    return adapter


def is_per_tensor(adapter: Any) -> bool:
    """Whether ``adapter`` converts tensor by tensor (else: whole dicts, eagerly)."""
    return isinstance(adapter, PerTensorAdapter)


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One HF tensor of a layout, as :func:`hf_names` tells it without touching bytes."""

    name: str  # HF name
    source: str  # the native tensor it comes from; "" for whole-dict adapters (no per-tensor facts)
    shape: tuple[int, ...]
    dtype: torch.dtype
    strided: tuple | None  # (shape, stride, storage offset) when a strided view of the whole source
    # the whole source with its rows reordered (the rotary permutation): the HF row of each source row
    # (:func:`hf_row_orders`; int64, shared: read only), else None
    rows: torch.Tensor | None = dataclasses.field(default=None, compare=False)


def hf_items(adapter: PerTensorAdapter, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``[(hf name, tensor)]`` for one native tensor. Only per-tensor adapters convert one tensor
    on its own; a whole-dict adapter goes through :func:`to_hf_items` with the whole dict."""
    if not is_per_tensor(adapter):
        raise adapter_error(
            f"{type(adapter).__name__} converts whole state dicts only (no to_hf_items): "
            f"convert {name!r} with the others through to_hf_items(adapter, items)"
        )
    return list(adapter.to_hf_items(name, tensor))


def fill_hf(adapter: Any, name: str, tensor: torch.Tensor, out: dict[str, torch.Tensor]) -> list[str]:
    """Write the HF tensors of native ``name`` into the tensors of ``out`` (by HF name; those
    absent are skipped, any dtype: ``copy_`` casts) and return the names written. Adapters with a
    ``to_hf_into(name, tensor, out)`` write there directly (no intermediate tensor, e.g. for the
    rotary permutation); the others go through :func:`hf_items` and ``copy_``.

    >>> out = {"w": torch.zeros(2)}
    >>> fill_hf(IdentityAdapter(), "w", torch.ones(2), out), out["w"].tolist()
    (['w'], [1.0, 1.0])
    """
    into = getattr(adapter, "to_hf_into", None)
    if into is not None:
        return list(into(name, tensor, out))
    written = []
    for hf_name, t in hf_items(adapter, name, tensor):
        if hf_name in out:
            out[hf_name].copy_(t)
            written.append(hf_name)
    return written


def to_hf_items(adapter: Any, items: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Convert ``(name, tensor)`` pairs: one at a time with per-tensor adapters, lazily; a
    whole-dict adapter gets them all in one dict, once (eager).

    >>> dict(to_hf_items(IdentityAdapter(), [("a", 1)]))
    {'a': 1}
    """
    if is_per_tensor(adapter):
        for name, tensor in items:
            yield from adapter.to_hf_items(name, tensor)
    else:
        yield from check_adapter(adapter, "the adapter").to_hf(dict(items)).items()


def hf_names(adapter: Any, tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[HFTensor]:
    """The HF tensors of a layout given as native ``(name, dtype, shape)``, in native order, from
    meta tensors: names, shapes, dtypes (and, per tensor, which native tensor each comes from and
    whether it is a strided view of it), without touching any bytes. What a reader's HF view
    index and an exporter's shard plan are both built from.

    >>> [(t.name, t.source, t.shape) for t in hf_names(IdentityAdapter(), [("norm.weight", torch.float32, (4,))])]
    [('norm.weight', 'norm.weight', (4,))]
    """
    metas = {name: torch.empty(tuple(shape), dtype=dtype, device="meta") for name, dtype, shape in tensors}
    out: list[HFTensor] = []
    if is_per_tensor(adapter):
        for name, meta in metas.items():
            orders = hf_row_orders(adapter, name, meta)
            for hf_name, t in adapter.to_hf_items(name, meta):
                rows = orders.get(hf_name) if tuple(t.shape) == tuple(meta.shape) else None
                out.append(HFTensor(hf_name, name, tuple(t.shape), t.dtype, _strided(meta, t), rows))
    else:  # a whole-dict adapter: names, shapes and dtypes only
        for hf_name, t in check_adapter(adapter, "the adapter").to_hf(metas).items():
            out.append(HFTensor(hf_name, "", tuple(t.shape), t.dtype, None))
    seen: dict[str, str] = {}
    for t in out:
        if t.name in seen:
            raise adapter_error(
                f"the adapter maps {seen[t.name] or 'a tensor'} and {t.source or 'another'} to the "
                f"same HF name {t.name!r}: check the adapter (or its hf_config)"
            )
        seen[t.name] = t.source
    return out


def _strided(base: torch.Tensor, out: torch.Tensor) -> tuple | None:
    if out is base:
        return tuple(base.shape), tuple(base.stride()), 0
    if out._base is base and out.dtype == base.dtype:
        return tuple(out.shape), tuple(out.stride()), out.storage_offset()
    return None


class IdentityAdapter:
    """The trained model already is a transformers model (common in RL frameworks): names pass through."""

    NAME = "identity"
    CONFIG = Schema(fields={})  # reads no field of hf_config

    def __init__(self, hf_config: dict | None = None):
        check_config(f"the {self.NAME} adapter", self.CONFIG, hf_config)
        self.hf_config = hf_config or {}

    def to_hf_items(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(name, tensor)]

    def to_hf(self, state_dict: dict) -> dict:
        return dict(state_dict)

    def from_hf(self, hf_state_dict: dict) -> dict:
        return dict(hf_state_dict)


class Prefixed:
    """The model part of a nested state dict through ``adapter``: names under ``prefix`` (``"model."``
    after ``stage({"model": ..., "optim": ...})``) lose the prefix and are converted; the rest
    (optimizer state, ...) is not part of the HF view. ``from_hf`` puts the prefix back.

    >>> a = with_prefix(IdentityAdapter(), "model.")
    >>> [n for n, _ in a.to_hf_items("model.w", 1)], a.to_hf_items("optim.state.w.exp_avg", 1)
    (['w'], [])
    """

    def __init__(self, adapter: Any, prefix: str):
        self.adapter, self.prefix = check_adapter(adapter, "the adapter"), prefix

    def _model_part(self, state_dict: dict) -> dict:
        n = len(self.prefix)
        return {k[n:]: v for k, v in state_dict.items() if k.startswith(self.prefix)}

    def to_hf(self, state_dict: dict) -> dict:
        return dict(to_hf_items(self.adapter, self._model_part(state_dict).items()))

    def from_hf(self, hf_state_dict: dict) -> dict:
        return {self.prefix + k: v for k, v in self.adapter.from_hf(hf_state_dict).items()}


class _PrefixedPerTensor(Prefixed):
    def to_hf_items(self, name: str, tensor: Any) -> list[tuple[str, Any]]:
        if not name.startswith(self.prefix):
            return []
        return list(self.adapter.to_hf_items(name[len(self.prefix) :], tensor))

    def to_hf_into(self, name: str, tensor: torch.Tensor, out: dict[str, torch.Tensor]) -> list[str]:
        if not name.startswith(self.prefix):
            return []
        return fill_hf(self.adapter, name[len(self.prefix) :], tensor, out)

    def hf_row_orders(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if not name.startswith(self.prefix):
            return {}
        return hf_row_orders(self.adapter, name[len(self.prefix) :], tensor)


def with_prefix(adapter: Any, prefix: str | None) -> Any:
    """``adapter`` applied to the names under ``prefix`` only (see :class:`Prefixed`); as is when
    ``prefix`` is empty. Per-tensor adapters stay per-tensor."""
    if not prefix:
        return adapter
    return (_PrefixedPerTensor if is_per_tensor(adapter) else Prefixed)(adapter, prefix)


def permute_for_hf_rotary(w: torch.Tensor, n_heads: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Meta-style (interleaved pairs) rotary rows -> HF's rotate_half order, per head. ``out``: write
    into this tensor (of w's shape; any dtype) with no intermediate copy, and return it."""
    rows, cols = w.shape
    pairs = w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2)
    if out is None:
        return pairs.reshape(rows, cols)
    if tuple(out.shape) != (rows, cols) or not out.is_contiguous():
        raise adapter_error(
            f"the rotary permutation writes a contiguous {[rows, cols]} tensor, not a "
            f"{'non-contiguous ' if not out.is_contiguous() else ''}{list(out.shape)} one"
        )
    out.view(pairs.shape).copy_(pairs)
    return out


def unpermute_from_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_for_hf_rotary`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


@functools.lru_cache(maxsize=64)
def rotary_rows(rows: int, n_heads: int) -> torch.Tensor:
    """The HF row of each staged row under :func:`permute_for_hf_rotary` (int64 ``[rows]``), taken from
    that function itself run on row numbers, so the two never disagree. Cached per shape and shared by
    every layer: read only.

    >>> rotary_rows(8, 2).tolist()  # per head of 4 rows: pairs (0, 1), (2, 3) -> halves (0, 2), (1, 3)
    [0, 2, 1, 3, 4, 6, 5, 7]
    """
    held = permute_for_hf_rotary(torch.arange(rows).view(rows, 1), n_heads).view(-1)  # HF row h holds staged held[h]
    out = torch.empty_like(held)
    out[held] = torch.arange(rows)
    return out


def hf_row_orders(adapter: Any, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{hf name: the HF row of each row of native tensor name}`` for the HF tensors an adapter makes
    by reordering the rows of the whole native tensor (the rotary permutation of q and k), from its
    optional ``hf_row_orders(name, tensor)`` (meta tensors do); ``{}`` for an adapter without one. A
    change map of the native tensor then holds for the HF one through :func:`hf_flat_indices`.

    >>> from stager.client.adapters import load_adapter
    >>> a = load_adapter("llama3", {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1})
    >>> hf_row_orders(a, "layers.0.attention.wk.weight", torch.empty(4, 8, device="meta"))
    {'model.layers.0.self_attn.k_proj.weight': tensor([0, 2, 1, 3])}
    """
    orders = getattr(adapter, "hf_row_orders", None)
    return dict(orders(name, tensor)) if orders is not None else {}


def hf_flat_indices(indices: torch.Tensor, rows: torch.Tensor, cols: int) -> torch.Tensor:
    """Flat indices of a staged ``[len(rows), cols]`` tensor as the same elements' flat indices in the HF
    tensor whose row ``rows[r]`` is staged row ``r`` (the column is unchanged); same dtype as ``indices``
    (int32 or int64), not sorted. Pure: what a change map of the staged tensor is for the HF one.

    >>> hf_flat_indices(torch.tensor([0, 5, 6], dtype=torch.int32), torch.tensor([0, 2, 1, 3]), 3).tolist()
    [0, 8, 3]
    """
    if rows.dim() != 1 or cols < 1 or rows.numel() * cols > torch.iinfo(indices.dtype).max + 1:
        raise adapter_error(f"a row order of {list(rows.shape)} rows of {cols} columns cannot map these indices")
    # in the indices' own dtype (every flat index of the tensor fits it, checked above): int32 arithmetic is
    # several times faster here than int64 (5-13 ns of one core per index: bench/bench_permuted_delta.py)
    order = rows.to(indices.dtype)
    row = indices.div(cols, rounding_mode="floor")
    # order[row]: an IndexError for a row past the order (the caller checked the indices' range first)
    return order[row] * cols + (indices - row * cols)
