"""The shared-memory contract: segment names and how either side maps a segment.

The daemon creates segments under ``/dev/shm`` with mode 0600 (owner only) and unlinks them;
ranks map them writable to copy their shards in, readers map them read-only. A name carries the
owner's uid and the creating daemon's pid and session, so a restarted daemon can tell what a
killed one left behind, and a later daemon with the same pid never reuses a name.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import re
import warnings
from collections.abc import Sequence

import torch

from .errors import ErrorCode, StagerError, short_repr
from .layout import Placement, narrow_box

SHM_DIR = "/dev/shm"
PAGE = 4096
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_libc = ctypes.CDLL(None, use_errno=True)
_madvise = _libc.madvise  # ctypes drops the GIL during the call
_madvise.restype = ctypes.c_int
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
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
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW)  # never a planted link
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
    return seg[byte_offset : byte_offset + count * dtype.itemsize].view(dtype).view(list(shape))


def placement_view(seg: torch.Tensor, dtype: torch.dtype, placement: Placement, shape: Sequence[int]) -> torch.Tensor:
    """The (strided) view of a mapped segment where a shard of ``shape`` placed at ``placement`` goes."""
    block = block_view(seg, dtype, placement.block_offset, placement.block_shape)
    return narrow_box(block, placement.inner, shape)


def prefault(seg: torch.Tensor, start: int, end: int) -> bool:
    """Fault in, writable and in one call, the pages of ``seg[start:end]``, leaving the bytes as
    they are (the segment may hold a sealed version). Pages of /dev/shm not allocated yet are
    allocated here, so this is also where a full /dev/shm shows: as an error, where the copy
    itself would die of SIGBUS.

    Returns False where the kernel cannot (before 5.14; the daemon then reserves segments with
    ``posix_fallocate`` at creation, see :func:`populate_supported`).
    Raises ``StagerError(MEMORY_LIMIT)`` when /dev/shm has no room for the pages."""
    if end <= start:
        return True
    addr = seg.data_ptr() + start
    aligned = addr - addr % PAGE
    while _madvise(aligned, end - start + (addr - aligned), _MADV_POPULATE_WRITE) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINTR, errno.EAGAIN):
            continue
        if err == errno.EINVAL:
            return False
        if err in (errno.EFAULT, errno.ENOMEM, errno.ENOSPC):
            raise StagerError(
                ErrorCode.MEMORY_LIMIT,
                f"{SHM_DIR} has no room for {(end - start) / 2**20:.1f} MiB of a snapshot segment; "
                f"enlarge {SHM_DIR} (e.g. docker --shm-size) or lower the daemon's --memory-limit",
            )
        raise StagerError(ErrorCode.INTERNAL, f"could not fault in snapshot pages: {os.strerror(err)}")
    return True


def view_bounds(seg: torch.Tensor, view: torch.Tensor) -> tuple[int, int]:
    """``(start, end)`` byte offsets of ``seg`` that a (strided) view into it spans; ``(0, 0)``
    for an empty view (which has no address)."""
    if view.numel() == 0:
        return 0, 0
    start = view.data_ptr() - seg.data_ptr()
    last = sum((n - 1) * stride for n, stride in zip(view.shape, view.stride()))
    return start, start + (last + 1) * view.element_size()


@functools.cache
def populate_supported() -> bool:
    """Whether this kernel faults pages in on request (``MADV_POPULATE_WRITE``, Linux >= 5.14).
    Same-host writers share the daemon's kernel, so the daemon can decide for them."""
    probe = torch.frombuffer(mmap.mmap(-1, PAGE), dtype=torch.uint8)
    try:
        return prefault(probe, 0, PAGE)
    except StagerError:
        return False
