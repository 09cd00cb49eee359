"""Typed quantization metadata: float8 data staged with its scale, and dequantization.

A quantized tensor travels as two plain tensors, its float8 data and its scale, plus one entry
of metadata (sent with :class:`~stager.protocol.Commit`, served in
:class:`~stager.protocol.AcquireReply`)::

    {"<data fqn>": {"scale": "<scale fqn>", "mode": "mul" | "div", "dtype": "<dtype name>"}}

``mode`` says how the scale applies: ``mul`` (high precision = data * scale, the
``weight_scale`` / ``weight_scale_inv`` convention of HF fp8 checkpoints) or ``div`` (data / scale,
torchao's float8 training tensors). ``dtype`` is the precision the data was quantized from, the
default target of dequantization. The scale holds one value (per tensor) or has the data's rank
with each dimension a ceil-division of the data's: ``[rows, 1]`` is per row, ``[ceil(r/128),
ceil(c/128)]`` is 128x128 blocks (DeepSeek-V3).

>>> spec = QuantSpec.parse("w", {"scale": "w:scale", "mode": "div", "dtype": "f32"})
>>> data = torch.tensor([2.0, 4.0]).to(torch.float8_e4m3fn)
>>> dequantize(data, torch.tensor(2.0), spec).tolist()
[1.0, 2.0]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .dtypes import DTYPES, FLOAT8, dtype_name
from .errors import ErrorCode, StagerError, short_repr

MODES = ("mul", "div")
SCALE_SUFFIX = ":scale"  # the scale of a torchao float8 tensor `w` is staged as `w:scale`


def _bad(fqn: str, why: str) -> StagerError:
    return StagerError(ErrorCode.BAD_VALUE, f"{fqn}: {why}")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    scale: str
    mode: str
    dtype: str

    @classmethod
    def parse(cls, fqn: str, raw: Any) -> QuantSpec:
        if not isinstance(raw, dict) or set(raw) != {"scale", "mode", "dtype"}:
            raise _bad(fqn, "quantization metadata must be a map with exactly 'scale', 'mode' and 'dtype'")
        scale = raw["scale"]
        mode = raw["mode"]
        dtype = raw["dtype"]
        if not isinstance(scale, str) or scale == fqn:
            raise _bad(fqn, "'scale' must name another tensor")
        if not isinstance(mode, str) or mode not in MODES:
            raise _bad(fqn, f"mode must be one of {MODES}, not {short_repr(mode)}")
        if not isinstance(dtype, str) or dtype not in DTYPES or dtype in FLOAT8:
            raise _bad(fqn, f"dtype must name a high-precision dtype of the table, not {short_repr(dtype)}")
        return cls(scale, mode, dtype)

    def wire(self) -> dict:
        return {"scale": self.scale, "mode": self.mode, "dtype": self.dtype}


def scale_blocks(fqn: str, data_shape, scale_shape, block: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """Block size per dimension of ``data_shape`` that one scale value covers (None: one scale):
    ``block`` when given (an HF checkpoint's ``weight_block_size``), else equal blocks.

    >>> scale_blocks("w", (300, 200), (3, 2), (128, 128)), scale_blocks("w", (6, 4), (3, 1))
    ((128, 128), (2, 4))
    """
    if math.prod(scale_shape) == 1:
        return None
    if len(scale_shape) != len(data_shape):
        raise _bad(
            fqn,
            f"scale shape {list(scale_shape)} does not fit data shape {list(data_shape)}: give one "
            "scale, or one per block with the data's rank",
        )
    blocks = []
    for i, (d, s) in enumerate(zip(data_shape, scale_shape)):
        size = block[i] if block is not None and i < len(block) else (-(-d // s) if s else 0)
        if s < 1 or size < 1 or -(-d // size) != s:
            raise _bad(
                fqn,
                f"scale shape {list(scale_shape)} does not tile data shape {list(data_shape)}"
                + (f" in blocks of {list(block)}" if block is not None else ""),
            )
        blocks.append(size)
    return tuple(blocks)


def check_quant(raw: Any, tensors: dict[str, tuple[str, tuple]]) -> dict[str, QuantSpec]:
    """Validate metadata against the version's tensors (``{fqn: (dtype name, shape)}``)."""
    if not isinstance(raw, dict):
        raise StagerError(ErrorCode.BAD_VALUE, "quantization metadata must be a map of tensor name -> spec")
    specs: dict[str, QuantSpec] = {}
    scales: set[str] = set()
    for fqn, entry in raw.items():
        spec = QuantSpec.parse(str(fqn), entry)
        if fqn not in tensors or spec.scale not in tensors:
            raise _bad(fqn, f"quantized tensor or its scale {spec.scale!r} is not in the staged state dict")
        (dtype, shape), (sdtype, sshape) = tensors[fqn], tensors[spec.scale]
        if dtype not in FLOAT8:
            raise _bad(fqn, f"only float8 data is dequantized, this tensor is {dtype}")
        if sdtype in FLOAT8 or not DTYPES[sdtype].is_floating_point or spec.scale in raw:
            raise _bad(fqn, f"scale {spec.scale!r} must be a plain floating-point tensor, not {sdtype}")
        scale_blocks(fqn, shape, sshape)
        scales.add(spec.scale)
        specs[fqn] = spec
    return specs


def dequantize(
    data: torch.Tensor,
    scale: torch.Tensor,
    spec: QuantSpec,
    dtype: torch.dtype | None = None,
    block: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """High-precision values of ``data`` (a new tensor of ``dtype``, default ``spec.dtype``);
    ``block``: the block size one scale value covers, when the checkpoint says it."""
    out_dtype = dtype or DTYPES[spec.dtype]
    blocks = scale_blocks("tensor", tuple(data.shape), tuple(scale.shape), block)
    scale = scale.to(torch.float32)
    if blocks is None:
        scale = scale.reshape(())
    else:
        for dim, block in enumerate(blocks):
            scale = scale.repeat_interleave(block, dim).narrow(dim, 0, data.shape[dim])
    values = data.to(torch.float32)
    values = values * scale if spec.mode == "mul" else values / scale
    return values.to(out_dtype)


def float8_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """``(data, scale, original dtype name)`` of a tensor subclass holding float8 data and a scale
    (torchao's ``Float8TrainingTensor``, seen through ``__tensor_flatten__``), else None."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None or type(tensor) is torch.Tensor:
        return None
    names = tensor.__tensor_flatten__()[0]
    if "_data" not in names or "_scale" not in names:
        return None
    data, scale = tensor._data, tensor._scale
    if type(data) is not torch.Tensor or type(scale) is not torch.Tensor or dtype_name(data.dtype) not in FLOAT8:
        return None
    orig = getattr(tensor, "_orig_dtype", None) or torch.float32
    return data, scale, dtype_name(orig)
