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
import zlib
from typing import Callable, Iterable

import torch

from stager.protocol.dtypes import safetensors_code

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


CRC_CHUNK = 1 << 20  # checksum each MiB right after writing it, while it is still in the CPU cache


def write_safetensors(path: str, specs: list[tuple[str, tuple, torch.dtype]],
                      produce: Callable[[], Iterable[tuple[str, torch.Tensor]]], metadata: dict | None = None,
                      on_bytes: Callable[[int], None] | None = None, checksums: dict | None = None) -> int:
    """Write ``path`` with the tensors named in ``specs`` (name, shape, dtype), pulling them one at a
    time from ``produce()`` in the same order; fsyncs before returning the file's size.
    ``checksums``: filled with each tensor's crc32 (hex) of the bytes as written, computed chunk by
    chunk as they are written, so memory is read once, not once for the checksum and once to write."""
    header: dict = {"__metadata__": {k: str(v) for k, v in (metadata or {}).items()}}
    offset = 0
    for name, shape, dtype in specs:
        try:
            code = safetensors_code(dtype)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
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
            data = tensor_bytes(tensor)
            if checksums is None:
                f.write(data)
            else:
                crc = 0
                for start in range(0, len(data), CRC_CHUNK):
                    chunk = data[start:start + CRC_CHUNK]
                    f.write(chunk)
                    crc = zlib.crc32(chunk, crc)
                checksums[name] = f"{crc & 0xFFFFFFFF:08x}"
            if on_bytes is not None:
                on_bytes(tensor.numel() * tensor.element_size())
        if next(expected, None) is not None:
            raise ValueError(f"{path}: fewer tensors produced than planned")
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset
