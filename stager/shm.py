"""POSIX shared-memory segments under /dev/shm, readable and writable by the owning user only.

The daemon creates and unlinks segments; clients map them by name. Names carry the owner's
uid and the creating daemon's pid so that a restarted daemon can reclaim what a killed one
left behind (:func:`reclaim_stale`). Memory is reserved with ``posix_fallocate`` at creation
so a full /dev/shm is a clear refusal up front, never a SIGBUS in a client mid-copy.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import warnings

import psutil
import torch

from stager.protocol import ErrorCode, StagerError

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_PREFIX = "stager"
_NAME_RE = re.compile(rf"^{_PREFIX}-(\d+)-(\d+)-[0-9a-z]+$")


def segment_name(pid: int, session: str, serial: int) -> str:
    # the daemon's session in the name: a later daemon that gets the same pid never reuses a name
    return f"{_PREFIX}-{os.getuid()}-{pid}-{session[:8]}{serial:x}"


def _path(name: str) -> str:
    if not _NAME_RE.match(name):
        raise StagerError(ErrorCode.BAD_MESSAGE, f"{name!r} is not a stager segment name")
    return os.path.join(SHM_DIR, name)


class Segment:
    """A shared-memory file the daemon owns. The daemon itself maps it only when it must write
    (bytes from another host); same-host ranks write through their own mappings."""

    def __init__(self, name: str, size: int):  # creates the file and reserves its memory: may take a while
        self.name, self.size = name, size
        self._map: mmap.mmap | None = None
        self._tensor: torch.Tensor | None = None
        path = _path(name)
        free = shm_free_bytes()
        if size > free:
            raise StagerError(
                ErrorCode.MEMORY_LIMIT,
                f"{SHM_DIR} has {free >> 20} MiB free but the snapshot needs {size >> 20} MiB; "
                f"enlarge {SHM_DIR} (e.g. docker --shm-size) or lower --memory-limit",
            )
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise StagerError(
                ErrorCode.MEMORY_LIMIT, f"could not reserve {size >> 20} MiB in {SHM_DIR}: {exc.strerror}"
            ) from None
        os.close(fd)

    def as_bytes(self) -> torch.Tensor:
        """A writable uint8 view of the whole segment, mapped on first use."""
        if self._tensor is None:
            self._tensor = map_segment(self.name, self.size, writable=True)
        return self._tensor

    def buffer(self) -> memoryview:
        """A read-only buffer of the whole segment (for frames sent without copying), mapped once.
        Frames still queued keep the mapping alive after the segment is unlinked."""
        if self._map is None:
            fd = os.open(_path(self.name), os.O_RDONLY)
            try:
                self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(fd)
        return memoryview(self._map)

    def unlink(self) -> None:
        self._tensor = self._map = None
        try:
            os.unlink(_path(self.name))
        except FileNotFoundError:
            pass


def map_segment(name: str, size: int, *, writable: bool, populate: bool = False) -> torch.Tensor:
    """Map segment ``name`` as a flat uint8 tensor. Read-only mappings fault on write, so a
    reader can never corrupt a snapshot. The mapping lives as long as the tensor (and its views).
    ``populate`` pre-faults the page tables (MAP_POPULATE): slower to map, no faults on first write."""
    path = _path(name)
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


def block_view(seg: torch.Tensor, dtype: torch.dtype, byte_offset: int, shape) -> torch.Tensor:
    """The dense row-major block of ``dtype`` and ``shape`` at ``byte_offset`` of a mapped segment."""
    count = 1
    for n in shape:
        count *= n
    return seg[byte_offset:byte_offset + count * dtype.itemsize].view(dtype).view(list(shape))


def shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def reclaim_stale() -> int:
    """Unlink segments of this user whose creating daemon is dead; returns how many."""
    uid, count = os.getuid(), 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        match = _NAME_RE.match(name)
        if not match or int(match.group(1)) != uid or psutil.pid_exists(int(match.group(2))):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            count += 1
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("could not reclaim stale segment %s: %s", name, exc)
    if count:
        log.info("reclaimed %d shared-memory segments left by a dead daemon", count)
    return count


def list_segments(pid: int | None = None) -> list[str]:
    """This user's stager segments (of daemon ``pid`` when given); used by status and tests."""
    uid = os.getuid()
    out = []
    for name in os.listdir(SHM_DIR):
        match = _NAME_RE.match(name)
        if match and int(match.group(1)) == uid and (pid is None or int(match.group(2)) == pid):
            out.append(name)
    return sorted(out)
