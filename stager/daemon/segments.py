"""Shared-memory segments the daemon owns: created, unlinked, reclaimed.

A segment is created empty (``ftruncate``): its pages are allocated by the ranks that write
it, each faulting in its own part in one ``MADV_POPULATE_WRITE`` call before its copy
(:func:`stager.protocol.shm.prefault`). The ranks thereby allocate in parallel and off the
daemon's thread: a first step waits for no ``posix_fallocate`` of the whole segment (~0.3 s/GiB
here, one thread, under the file's lock), and a full /dev/shm is still an error before any
copy, never a SIGBUS mid-copy. On kernels without ``MADV_POPULATE_WRITE`` (before 5.14) the
daemon reserves the memory with ``posix_fallocate`` at creation instead. Names and mapping are
the shared contract in :mod:`stager.protocol.shm`.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable

import psutil
import torch

from stager.protocol import ErrorCode, StagerError
from stager.protocol.shm import SHM_DIR, map_segment, populate_supported, segment_owner, segment_path

log = logging.getLogger("stager.daemon")
PREALLOCATE_CHUNK = 1 << 30  # --preallocate checks between chunks whether the daemon is stopping


class Segment:
    """A shared-memory file the daemon owns. The daemon itself maps it only when it must write
    (bytes from another host) or send (remote readers); same-host ranks write through their own mappings."""

    def __init__(self, name: str, size: int, *, pages_from: Segment | None = None):
        """Creates the file (and may reserve its memory: a while); with ``pages_from`` (a
        preallocated segment at least ``size`` large) takes over that file and its pages instead."""
        self.name, self.size = name, size
        self._map: mmap.mmap | None = None
        self._tensor: torch.Tensor | None = None
        self.inflight: list = []  # zmq MessageTrackers of frames sent from this segment, not yet sent
        # NIXL READs landing in it (the full assembler's, counted by the NIXL registry under its lock): a
        # failed assembly's segment is not reused before they ended
        self.landing = 0
        self.on_unlink: list[Callable[[], None]] = []  # e.g. NIXL's deregistration: before the mapping goes
        path = segment_path(name)
        if pages_from is not None:
            try:
                self._take_over(pages_from)
                return
            except OSError as exc:  # both names are gone: create the segment as if there were none
                log.warning(
                    "could not take over preallocated segment %s (%s); creating %s anew", pages_from.name, exc, name
                )
        free = shm_free_bytes()
        if size > free:
            raise StagerError(
                ErrorCode.MEMORY_LIMIT,
                f"{SHM_DIR} has {free >> 20} MiB free but the snapshot needs {size >> 20} MiB; "
                f"enlarge {SHM_DIR} (e.g. docker --shm-size) or lower --memory-limit",
            )
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            if populate_supported() or size == 0:  # (0: a file to be preallocated)
                os.ftruncate(fd, size)  # writers allocate their pages when they fault them in
            else:
                os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise StagerError(
                ErrorCode.MEMORY_LIMIT, f"could not reserve {size >> 20} MiB in {SHM_DIR}: {exc.strerror}"
            ) from None
        os.close(fd)

    @classmethod
    def preallocated(cls, name: str, size: int, stop: threading.Event | None = None) -> Segment:
        """A segment whose ``size`` bytes of memory are allocated now (``posix_fallocate``, a GiB at
        a time, until ``stop`` is set): a later segment takes its pages over (``pages_from``)."""
        seg = cls(name, 0)
        fd = os.open(segment_path(name), os.O_RDWR | os.O_NOFOLLOW)
        try:
            for offset in range(0, size, PREALLOCATE_CHUNK):
                if stop is not None and stop.is_set():
                    raise InterruptedError(errno.EINTR, "the daemon is stopping")
                os.posix_fallocate(fd, offset, min(PREALLOCATE_CHUNK, size - offset))
        except OSError as exc:
            seg.unlink()
            raise StagerError(
                ErrorCode.MEMORY_LIMIT, f"could not preallocate {size >> 20} MiB in {SHM_DIR}: {exc.strerror}"
            ) from None
        finally:
            os.close(fd)
        seg.size = size
        return seg

    def _take_over(self, old: Segment) -> None:
        if old.size < self.size:
            raise ValueError(f"segment {old.name} has {old.size} bytes, fewer than the {self.size} needed")
        path = segment_path(self.name)
        try:
            # never replaces a file (the new name must be free), never follows a link
            os.link(segment_path(old.name), path, follow_symlinks=False)
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            try:
                os.ftruncate(fd, self.size)  # the pages past the new size go back to the system
            finally:
                os.close(fd)
        except OSError:
            self.unlink()
            raise
        finally:
            old.unlink()

    def as_bytes(self) -> torch.Tensor:
        """A writable uint8 view of the whole segment, mapped on first use."""
        if self._tensor is None:
            self._tensor = map_segment(self.name, self.size, writable=True)
        return self._tensor

    def buffer(self) -> memoryview:
        """A read-only buffer of the whole segment (for frames sent without copying), mapped once.
        Frames still queued keep the mapping alive after the segment is unlinked."""
        if self._map is None:
            fd = os.open(segment_path(self.name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(fd)
        return memoryview(self._map)

    def busy(self) -> bool:
        """True while frames queued in ZeroMQ still point into this segment, or NIXL READs land in it."""
        self.inflight = [t for t in self.inflight if not t.done]
        return bool(self.inflight) or self.landing > 0

    def unlink(self) -> None:
        hooks, self.on_unlink = self.on_unlink, []
        for hook in hooks:
            hook()
        self._tensor = self._map = None
        try:
            os.unlink(segment_path(self.name))
        except FileNotFoundError:
            pass


def shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def shm_total_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_blocks * st.f_frsize


def list_segments(pid: int | None = None) -> list[str]:
    """This user's stager segments (of daemon ``pid`` when given); used by status and tests."""
    uid = os.getuid()
    owners = ((name, segment_owner(name)) for name in os.listdir(SHM_DIR))
    return sorted(
        name for name, owner in owners if owner is not None and owner[0] == uid and (pid is None or owner[1] == pid)
    )


def reclaim_stale() -> int:
    """Unlink segments of this user whose creating daemon is dead; returns how many."""
    count = 0
    try:
        names = list_segments()
    except OSError:
        return 0
    for name in names:
        if psutil.pid_exists(segment_owner(name)[1]):
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
