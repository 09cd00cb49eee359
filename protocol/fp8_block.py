"""FP8 block quantization: e4m3 weights plus one fp32 ``weight_scale_inv`` per block (DeepSeek-V3 / Qwen3-FP8).

:func:`quantize_block_fp8` is vLLM's ``per_block_cast_to_fp8`` (``vllm/utils/deep_gemm.py``, itself DeepGEMM's
``deep_gemm/utils/math.py`` with ``use_ue8m0=False``), bit for bit: per block, ``amax`` over the block's
absolute values in fp32, clamped to at least 1e-4; ``scale_inv = amax / 448``; data = ``(w * (1.0 /
scale_inv))`` cast to ``float8_e4m3fn``. An edge block that a dimension does not fill is padded with zeros
(which never raise ``amax``): its scale is that of the values it holds. An all-zero block gets
``scale_inv = 1e-4 / 448``.

The published quantizers differ in the last bit (the order of the fp32 divisions): transformers'
``Fp8Quantize`` multiplies by ``448 / amax`` and stores ``1 / (448 / amax)`` (and 1.0 for a zero block),
DeepGEMM's first release multiplied by ``448 / amax``. vLLM is the engine that reads these weights, so
its function is the reference (tests/test_fp8_block.py holds a literal transcription of it).

Dequantization is :func:`stager.protocol.quant.dequantize` (``data * scale_inv`` in fp32, one scale per
block), the one load-hf and the readers use.

>>> w = torch.tensor([[1.0, -2.0], [0.5, 448.0]])
>>> data, scale_inv = quantize_block_fp8(w, (128, 128))
>>> data.dtype, scale_inv.tolist(), dequantize_block_fp8(data, scale_inv, (128, 128)).tolist()
(torch.float8_e4m3fn, [[1.0]], [[1.0, -2.0], [0.5, 448.0]])
"""

from __future__ import annotations

import torch

from .errors import ErrorCode, StagerError
from .quant import QuantSpec, dequantize

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
AMAX_FLOOR = 1e-4  # vLLM's / DeepGEMM's clamp: an all-zero block's scale_inv is 1e-4 / 448
DEFAULT_BLOCK = (128, 128)
# fp32 temporaries per step, in whole block rows: bounded memory and ~3x faster here (one thread, bf16) than the
# whole tensor at once, as vLLM's function does it. Measured 4 MiB: as fast with one thread, 2x slower with two
# on this busy 2-core host (more steps, each a parallel region whose threads wait for each other)
CHUNK_BYTES = 16 << 20


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The ``weight_scale_inv`` grid of a ``[rows, cols]`` weight: ceil-divisions by the block.

    >>> scale_shape((576, 7168), (128, 128))
    (5, 56)
    """
    rows, cols = shape
    return -(-rows // block[0]), -(-cols // block[1])


def _check(w: torch.Tensor, block: tuple[int, int]) -> tuple[int, int]:
    if w.dim() != 2 or not w.is_floating_point() or w.element_size() < 2:
        raise StagerError(
            ErrorCode.BAD_VALUE,
            f"FP8 block quantization takes a 2-D high-precision weight, not a {w.dim()}-D {w.dtype} tensor",
        )
    if len(block) != 2 or not all(isinstance(b, int) and b >= 1 for b in block):
        raise StagerError(ErrorCode.BAD_VALUE, f"FP8 block size must be two positive integers, not {list(block)}")
    return int(block[0]), int(block[1])


def quantize_block_fp8(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data, scale_inv)``: ``w`` ([rows, cols], any high-precision float dtype) as ``float8_e4m3fn`` of the
    same shape and one fp32 scale per ``block`` (``[ceil(rows / b0), ceil(cols / b1)]``), so that
    ``data * scale_inv`` (per block) approximates ``w``. Equal, bit for bit, to vLLM's ``per_block_cast_to_fp8``
    of ``w`` (module doc), computed one block row at a time (same operations on the same values, less memory).
    ``out``: ``(data, scale_inv)`` tensors of those shapes and dtypes to write (the daemon's reply buffers)."""
    bm, bn = _check(w, block)
    rows, cols = w.shape
    grid = scale_shape((rows, cols), (bm, bn))
    if out is None:
        data = torch.empty((rows, cols), dtype=E4M3, device=w.device)
        scale_inv = torch.empty(grid, dtype=torch.float32, device=w.device)
    else:
        data, scale_inv = out
    if w.numel() == 0:
        scale_inv.fill_(AMAX_FLOOR / E4M3_MAX)
        return data, scale_inv
    padded_cols = grid[1] * bn
    # the product is fp32, float64 for a float64 weight (tensor promotion): its bytes bound a step's temporaries
    step = max(1, CHUNK_BYTES // (bm * padded_cols * max(4, w.element_size())))
    for r0 in range(0, grid[0], step):
        r1 = min(grid[0], r0 + step)
        top, bottom = r0 * bm, min(rows, r1 * bm)
        part = w[top:bottom]
        edge = bottom - top != (r1 - r0) * bm or padded_cols != cols
        if edge:  # an edge block: zeros fill it, as vLLM pads
            padded = torch.zeros(((r1 - r0) * bm, padded_cols), dtype=w.dtype, device=w.device)
            padded[: bottom - top, :cols] = part
            part = padded
        view = part.reshape(r1 - r0, bm, grid[1], bn)
        # max |x| as max(max x, -min x): the same value as abs().amax() (both exact), without an |x| copy
        amax = torch.maximum(view.amax(dim=(1, 3), keepdim=True), view.amin(dim=(1, 3), keepdim=True).neg())
        sf = amax.float().clamp(AMAX_FLOOR) / E4M3_MAX
        scaled = view * (1.0 / sf)  # the fp32 product (tensor promotion), as in vLLM
        if edge:
            data[top:bottom] = scaled.reshape((r1 - r0) * bm, padded_cols)[: bottom - top, :cols]
        else:  # copy_ casts to e4m3 as .to() does, straight into place
            data[top:bottom].view(scaled.shape).copy_(scaled)
        scale_inv[r0:r1] = sf.reshape(r1 - r0, grid[1])
    return data, scale_inv


def dequantize_block_fp8(
    data: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``data * scale_inv`` per block, as ``dtype``: :func:`~stager.protocol.quant.dequantize`, the
    dequantizer load-hf and the readers use (one implementation)."""
    return dequantize(data, scale_inv, QuantSpec("weight_scale_inv", "mul", "f32"), dtype, tuple(block))
