"""Streaming safetensors writer: a tensor or two in memory at a time, bytes straight from the source.

safetensors' ``save_file`` needs the whole file's tensors at once; an exporter converting a
100 GB model tensor by tensor must not. The format (documented by the safetensors project):
8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape", "data_offsets"},
"__metadata__": {...}}`` padded with spaces to 8 bytes, then the tensors' bytes in header order.
Files written here load with ``safetensors.torch.load_file`` (tested).

Writeback is started as the file grows (every ``WRITEBACK_BYTES``, ``posix_fadvise(DONTNEED)``
over what is written so far): the disk works while later tensors are converted, the final fsync
waits for the tail only, and pages already on disk leave the page cache, so an export of any size
holds a bounded amount of cache instead of a file's worth of dirty pages (which would evict the
node's useful cache, and which on a VM guest is new memory at ~3 ms per MiB).
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from stager.protocol.dtypes import safetensors_code

WRITEBACK_BYTES = 64 << 20


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


def write_safetensors(
    path: str,
    specs: list[tuple[str, tuple, torch.dtype]],
    produce: Callable[[], Iterable[tuple[str, torch.Tensor]]],
    metadata: dict | None = None,
    on_bytes: Callable[[int], None] | None = None,
    checksums: dict | None = None,
) -> int:
    """Write ``path`` with the tensors named in ``specs`` (name, shape, dtype), pulling them one at a
    time from ``produce()`` in the same order; fsyncs before returning the file's size.
    ``checksums``: filled with each tensor's crc32 (hex) of the bytes as written.

    One tensor is written by a helper thread while the calling thread checksums it and then
    produces (reads, converts) the next one: file writes, ``zlib.crc32`` and torch's conversions
    all release the GIL, so they overlap. At most two produced tensors are alive at once."""
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
    with open(path, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="stager-write") as pool:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        writer = _FileWriter(f, 8 + len(raw))
        in_flight: Future | None = None
        # on an error the pool's exit (before the file's: the with order) waits for a write in flight
        for name, tensor in produce():
            want_name, want_shape, want_dtype = next(expected)
            if name != want_name or tuple(tensor.shape) != tuple(want_shape) or tensor.dtype != want_dtype:
                raise ValueError(
                    f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned "
                    f"{want_name} {tuple(want_shape)} {want_dtype}"
                )
            tensor = tensor.contiguous()
            data = tensor_bytes(tensor)
            if in_flight is not None:
                in_flight.result()  # the previous tensor is on its way to disk (or its error raises here)
            in_flight = pool.submit(writer.write, data, tensor)  # ``tensor`` keeps ``data`` alive
            if checksums is not None:
                checksums[name] = f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
            if on_bytes is not None:
                on_bytes(len(data))
        if in_flight is not None:
            in_flight.result()
        if next(expected, None) is not None:
            raise ValueError(f"{path}: fewer tensors produced than planned")
        f.flush()
        os.fsync(f.fileno())
        _start_writeback(f.fileno(), writer.written)  # drop the tail's pages from the cache too (now clean)
    return 8 + len(raw) + offset


class _FileWriter:
    """Writes tensor bytes (on the helper thread) and starts writeback every ``WRITEBACK_BYTES``."""

    def __init__(self, f, written: int):
        self.f = f
        self.written = written
        self.flushed = 0

    def write(self, data: memoryview, _keepalive: torch.Tensor) -> None:
        self.f.write(data)
        self.written += len(data)
        if self.written - self.flushed >= WRITEBACK_BYTES:
            self.f.flush()
            _start_writeback(self.f.fileno(), self.written)
            self.flushed = self.written


def _start_writeback(fd: int, end: int) -> None:
    """Start writing ``[0, end)`` back without waiting, and drop its pages that are already clean."""
    try:
        os.posix_fadvise(fd, 0, end, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):  # not on every platform or file system: only slower without it
        pass
