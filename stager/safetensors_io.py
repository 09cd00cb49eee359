"""Streaming safetensors writer: one tensor in memory at a time, bytes straight from the source.

safetensors' ``save_file`` needs the whole file's tensors at once; an exporter converting a
100 GB model tensor by tensor must not. The format (documented by the safetensors project):
8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape", "data_offsets"},
"__metadata__": {...}}`` padded with spaces to 8 bytes, then the tensors' bytes in header order.
Files written here load with ``safetensors.torch.load_file`` (tested).
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from typing import Callable, Iterable

import torch

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL", torch.uint16: "U16",
    torch.uint32: "U32", torch.uint64: "U64",
}


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (no numpy needed)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def write_safetensors(path: str, specs: list[tuple[str, tuple, torch.dtype]],
                      produce: Callable[[], Iterable[tuple[str, torch.Tensor]]], metadata: dict | None = None,
                      on_bytes: Callable[[int], None] | None = None) -> int:
    """Write ``path`` with the tensors named in ``specs`` (name, shape, dtype), pulling them one at a
    time from ``produce()`` in the same order; fsyncs before returning the file's size."""
    header: dict = {"__metadata__": {k: str(v) for k, v in (metadata or {}).items()}}
    offset = 0
    for name, shape, dtype in specs:
        if dtype not in ST_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors code")
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    expected = iter(specs)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, tensor in produce():
            want_name, want_shape, want_dtype = next(expected)
            if name != want_name or tuple(tensor.shape) != tuple(want_shape) or tensor.dtype != want_dtype:
                raise ValueError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned "
                                 f"{want_name} {tuple(want_shape)} {want_dtype}")
            tensor = tensor.contiguous()
            f.write(tensor_bytes(tensor))
            if on_bytes is not None:
                on_bytes(tensor.numel() * tensor.element_size())
        if next(expected, None) is not None:
            raise ValueError(f"{path}: fewer tensors produced than planned")
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset
