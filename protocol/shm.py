"""The shared-memory contract: segment names and how either side maps a segment.

The daemon creates segments under ``/dev/shm`` with mode 0600 (owner only) and unlinks them;
ranks map them writable to copy their shards in, readers map them read-only. A name carries the
owner's uid and the creating daemon's pid and session, so a restarted daemon can tell what a
killed one left behind, and a later daemon with the same pid never reuses a name.
"""

from __future__ import annotations

import mmap
import os
import re
import warnings
from typing import Sequence

import torch

from .errors import ErrorCode, StagerError, short_repr
from .layout import Placement, narrow_box

SHM_DIR = "/dev/shm"
_PREFIX = "stager"
_NAME_RE = re.compile(rf"^{_PREFIX}-(\d+)-(\d+)-[0-9a-z]+$")


def segment_name(pid: int, session: str, serial: int) -> str:
    """The name of the ``serial``-th segment of the daemon ``pid`` in ``session``."""
    return f"{_PREFIX}-{os.getuid()}-{pid}-{session[:8]}{serial:x}"


def segment_owner(name: str) -> tuple[int, int] | None:
    """``(uid, daemon pid)`` of a stager segment name, None for any other name."""
    match = _NAME_RE.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def segment_path(name: str) -> str:
    """``/dev/shm/<name>``; refuses anything that is not a stager segment name (no path tricks)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise StagerError(ErrorCode.BAD_MESSAGE, f"{short_repr(name)} is not a stager segment name")
    return os.path.join(SHM_DIR, name)


def map_segment(name: str, size: int, *, writable: bool, populate: bool = False) -> torch.Tensor:
    """Map segment ``name`` as a flat uint8 tensor. Read-only mappings fault on write, so a
    reader can never corrupt a snapshot. The mapping lives as long as the tensor (and its views).
    ``populate`` pre-faults the page tables (MAP_POPULATE): slower to map, no faults on first use."""
    path = segment_path(name)
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise StagerError(ErrorCode.BAD_MESSAGE, f"segment {name} holds {actual} bytes, expected {size}")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        mapping = mmap.mmap(fd, size, flags, prot)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that read-only buffers are not writable: intended
        return torch.frombuffer(mapping, dtype=torch.uint8)


def block_view(seg: torch.Tensor, dtype: torch.dtype, byte_offset: int, shape: Sequence[int]) -> torch.Tensor:
    """The dense row-major block of ``dtype`` and ``shape`` at ``byte_offset`` of a mapped segment."""
    count = 1
    for n in shape:
        count *= n
    return seg[byte_offset:byte_offset + count * dtype.itemsize].view(dtype).view(list(shape))


def placement_view(seg: torch.Tensor, dtype: torch.dtype, placement: Placement, shape: Sequence[int]) -> torch.Tensor:
    """The (strided) view of a mapped segment where a shard of ``shape`` placed at ``placement`` goes."""
    block = block_view(seg, dtype, placement.block_offset, placement.block_shape)
    return narrow_box(block, placement.inner, shape)
