"""Turn a training state dict into flat tensor entries and non-tensor leaves (pure functions).

Nested dicts are flattened with dotted keys (``{"optim": {"state": ...}}`` -> ``"optim.state..."``),
the flat FQN dicts of ``get_model_state_dict`` / ``get_optimizer_state_dict(flatten_optimizer_state_dict=True)``
pass through unchanged. Non-tensor leaves must be int, float, str, bool, None, bytes, or lists
and small dicts of those: they travel as msgpack, never pickle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from stager.protocol import ErrorCode, StagerError, dtype_name
from stager.protocol.dtypes import FLOAT8_DTYPES
from stager.protocol.layout import Box, PlanEntry
from stager.protocol.quant import SCALE_SUFFIX, QuantSpec, float8_parts

_MAX_OBJECT_DEPTH = 8
_INT64 = (-(1 << 63), (1 << 64) - 1)


def _bad(key: str, why: str) -> StagerError:
    return StagerError(ErrorCode.BAD_VALUE, f"{key}: {why}")


def _check_object(key: str, value: Any, depth: int = 0) -> Any:
    if depth > _MAX_OBJECT_DEPTH:
        raise _bad(key, "non-tensor value nested too deep; flatten it or stage it as a tensor")
    if value is None or isinstance(value, (bool, str, bytes, float)):
        return value
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise _bad(key, f"integer {value} does not fit 64 bits; store it as a string")
        return value
    if isinstance(value, (list, tuple)):
        return [_check_object(key, v, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise _bad(key, "dict keys inside a non-tensor value must be str or int")
        return {k: _check_object(key, v, depth + 1) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        raise _bad(key, "tensors inside lists cannot be staged; put each tensor under its own key")
    raise _bad(
        key,
        f"values of type {type(value).__name__} cannot be staged; use int, float, str, bool, None, "
        "bytes, or lists and dicts of those (no pickle crosses the wire)",
    )


def flatten_state_dict(state_dict: Mapping, *, objects: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``state_dict`` into ``{fqn: tensor}`` and ``{fqn: non-tensor value}`` (``objects=False``:
    the tensors only, other leaves neither checked nor kept: what a restore fills).

    >>> t, o = flatten_state_dict({"model": {"w": torch.zeros(2)}, "step": 3})
    >>> list(t), o
    (['model.w'], {'step': 3})
    """
    if not isinstance(state_dict, Mapping):
        raise StagerError(ErrorCode.BAD_VALUE, f"a state dict must be a mapping, not {type(state_dict).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    others: dict[str, Any] = {}
    stack: list[tuple[str, Mapping]] = [("", state_dict)]
    while stack:
        prefix, mapping = stack.pop()
        for key, value in mapping.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise _bad(f"{prefix}{key!r}", "state-dict keys must be str (or int)")
            fqn = f"{prefix}{key}"
            if isinstance(value, Mapping) and not isinstance(value, torch.Tensor):
                if value:
                    stack.append((fqn + ".", value))
                elif objects:
                    _store(others, tensors, fqn, {})
                continue
            if isinstance(value, torch.Tensor):
                _store(tensors, others, fqn, value)
            elif objects:
                _store(others, tensors, fqn, _check_object(fqn, value))
    return tensors, others


def _store(into: dict, other: dict, fqn: str, value: Any) -> None:
    if fqn in into or fqn in other:
        raise _bad(fqn, "two entries flatten to the same dotted name; rename one of them")
    into[fqn] = value


COMPANION_SCALES = ("_scale_inv", "_scale")  # HF fp8 checkpoints: `w` + `w_scale_inv` / `w_scale`, multiplied


def split_float8(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, QuantSpec]]:
    """Stage float8 data with its scale as two plain tensors plus typed metadata.

    A torchao float8 tensor (``_data`` + ``_scale`` through ``__tensor_flatten__``; also as a
    DTensor's local) becomes ``fqn`` (its float8 data) and ``fqn + ":scale"``, dequantized by
    division. A plain float8 tensor next to ``fqn + "_scale_inv"`` or ``fqn + "_scale"`` is paired
    with it, dequantized by multiplication. Per-tensor scales of a sharded tensor must be the same
    on every rank (torchao's FSDP float8 computes them globally); the lowest rank's is kept.

    >>> split_float8({"w": torch.zeros(2, dtype=torch.float8_e4m3fn), "w_scale_inv": torch.ones(1)})[1]
    {'w': QuantSpec(scale='w_scale_inv', mode='mul', dtype='bf16')}
    """
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] | None = None
    quant: dict[str, QuantSpec] = {}
    for fqn, t in tensors.items():
        local = t._local_tensor if isinstance(t, DTensor) else t
        parts = float8_parts(local) if type(local) not in (torch.Tensor, torch.nn.Parameter) else None
        if parts is None:
            if t.dtype in FLOAT8_DTYPES:
                for suffix in COMPANION_SCALES:
                    scale = tensors.get(fqn + suffix)
                    if (
                        isinstance(scale, torch.Tensor)
                        and scale.is_floating_point()
                        and scale.dtype not in FLOAT8_DTYPES
                    ):
                        quant[fqn] = QuantSpec(fqn + suffix, "mul", "bf16")
                        break
            continue
        if out is None:
            out = dict(tensors)
        data, scale, orig = parts
        if isinstance(t, DTensor):
            data = DTensor.from_local(
                data, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
            )
        name = fqn + SCALE_SUFFIX
        if name in tensors:
            raise _bad(fqn, f"cannot stage its scale as {name!r}: that name is taken")
        out[fqn], out[name] = data, scale
        quant[fqn] = QuantSpec(name, "div", orig)
    return (out if out is not None else tensors), quant


def unwrap(fqn: str, tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor to stage for ``tensor``, stripping training wrapper subclasses.

    A subclass whose only inner tensor (``__tensor_flatten__``) is ``_tensor`` of the same shape and
    dtype is a cast-on-use wrapper around the real weight, e.g. torchao float8 training's
    ``WeightWithDynamicFloat8CastTensor`` (FSDP2 with ``enable_fsdp_float8_all_gather``): the
    high-precision ``_tensor`` is staged. Any other subclass is refused with its type named.
    """
    cls = type(tensor)
    if cls is torch.Tensor or cls is torch.nn.Parameter:
        return tensor
    flatten = getattr(tensor, "__tensor_flatten__", None)
    names = flatten()[0] if flatten is not None else None
    if names == ["_tensor"]:
        inner = tensor._tensor
        if isinstance(inner, torch.Tensor) and inner.shape == tensor.shape and inner.dtype == tensor.dtype:
            return unwrap(fqn, inner)
    raise StagerError(
        ErrorCode.BAD_VALUE,
        f"{fqn}: tensor subclass {cls.__module__}.{cls.__qualname__}"
        + (f" (inner tensors {names})" if names else "")
        + " is not supported; stage plain tensors, DTensors, or float8 training weights",
    )


def local_box(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(local tensor, global shape, global offset, local shape)`` of a plain tensor or DTensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = tensor._local_tensor
        gshape = tuple(tensor.shape)
        lshape, offset = compute_local_shape_and_global_offset(gshape, tensor.device_mesh, tensor.placements)
        lshape, offset = tuple(lshape), tuple(offset)
        if tuple(local.shape) != lshape:
            raise StagerError(
                ErrorCode.BAD_VALUE,
                f"local shard has shape {tuple(local.shape)} but placements {tensor.placements} imply {lshape}; "
                "padded shards are not supported: stage the unpadded state dict (model.state_dict())",
            )
        return local, gshape, offset, lshape
    shape = tuple(tensor.shape)
    return tensor, shape, (0,) * len(shape), shape


class LayoutCache:
    """Describes a flattened state dict as plan entries, caching DTensor placement math.

    ``describe`` returns the plan (a :class:`PlanEntry` per tensor) and the local tensors in the
    same order. Placement math for a DTensor is redone
    only when its name, shape, placements or mesh change, so a steady training loop pays a
    dictionary lookup per tensor.
    """

    def __init__(self) -> None:
        self._boxes: dict[tuple, tuple] = {}

    def describe(self, tensors: Mapping[str, torch.Tensor]) -> tuple[list[PlanEntry], list[torch.Tensor]]:
        from torch.distributed.tensor import DTensor

        boxes = self._boxes
        plan: list[PlanEntry] = []
        locals_: list[torch.Tensor] = []
        for fqn, tensor in tensors.items():
            cls = type(tensor)
            if cls is torch.Tensor or cls is torch.nn.Parameter:
                # the same entry object every step: comparing plans is then mostly identity checks
                key = (fqn, tensor.shape, tensor.dtype)
                entry = boxes.get(key)
                if entry is None:
                    shape = tuple(tensor.shape)
                    entry = boxes[key] = _entry(fqn, dtype_name(tensor.dtype), shape, (0,) * len(shape), shape)
                local = tensor
            elif isinstance(tensor, DTensor):
                key = (fqn, tensor.shape, tuple(tensor.placements), id(tensor.device_mesh), tensor.dtype)
                entry = boxes.get(key)
                if entry is None:
                    _, gshape, offset, lshape = local_box(tensor)
                    entry = boxes[key] = _entry(fqn, dtype_name(tensor.dtype), gshape, offset, lshape)
                local = unwrap(fqn, tensor._local_tensor)
                if local.shape != entry.box.shape:
                    raise StagerError(
                        ErrorCode.BAD_VALUE, f"{fqn}: local shard shape changed under the same placements"
                    )
            else:
                local = unwrap(fqn, tensor)
                shape = tuple(local.shape)
                entry = _entry(fqn, dtype_name(local.dtype), shape, (0,) * len(shape), shape)
            if not local.numel() and math.prod(entry.global_shape):
                continue  # this rank holds nothing of the tensor (uneven sharding): others write it
            plan.append(entry)
            locals_.append(local)
        if len(boxes) > 4 * max(len(plan), 64):
            boxes.clear()  # layouts changed many times: drop stale keys
        return plan, locals_


def _entry(fqn: str, dtype: str, gshape: tuple, offset: tuple, lshape: tuple) -> PlanEntry:
    return PlanEntry(fqn, dtype, tuple(gshape), Box(tuple(offset), tuple(lshape)))
