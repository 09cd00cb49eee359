"""One checkpoint into the daemon as a sealed version: a one-rank staging session.

A loader (``load-hf``, ``load-dcp``) is a trainer of world size 1 as far as the daemon knows: it
says hello as rank 0 of a one-rank node, begins the step with a plan of plain (whole) tensors,
writes each tensor's bytes into the daemon's segment itself, and commits. So the daemon needs no
ingest path of its own, and a loaded version is served, leased, exported and restored like any
staged one. What is new here is only *who fills the destination*: :meth:`IngestSession.begin` hands
the caller the segment's views (on the daemon's host; elsewhere plain buffers sent as frames), so
a loader reads file bytes straight into shared memory, once. Or, with ``mapped=False``, the byte
ranges of the segment *file* (:class:`SegmentRange`), which a loader fills with ``sendfile`` from
the checkpoint file through :class:`SegmentFile`: the kernel copies page cache to shared memory
and the loader never maps the segment, so it pays neither the page-table setup of a mapping nor
a fault per 4 KiB page (on this kind of VM about half the time of a load into a new segment).

Nothing half-done is visible: a failure between begin and commit aborts the step (the daemon fails
it and unlinks its segment), and the version exists only once the daemon answered ``Sealed``.

>>> with IngestSession(endpoint, step=0) as s:  # doctest: +SKIP
...     dsts = s.begin({"w": (torch.float32, (4, 2))})
...     dsts["w"].fill_(1.0)
...     s.commit(model_info={"source": {"format": "hf"}})
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import threading
import time
from typing import Any

import torch

from stager.client.connection import Connection
from stager.client.hook.copier import CopyEngine
from stager.client.hook.sender import Sender
from stager.client.hook.writer import SegmentWriter
from stager.protocol import ErrorCode, RemoteError, Sealed, StagerError, dtype_name
from stager.protocol.dtypes import dtype_from_name
from stager.protocol.layout import Box, PlanEntry, plan_digest
from stager.protocol.shm import SHM_DIR, segment_path

log = logging.getLogger("stager.consumers.ingest")
PUT_BATCH_BYTES = 64 << 20  # frames to a daemon on another host: bounds memory on both sides
SENDFILE_CHUNK = 1 << 30  # Linux moves at most ~2 GiB per sendfile call


@dataclasses.dataclass(frozen=True)
class SegmentRange:
    """Where one whole tensor goes in the daemon's segment file: ``nbytes`` at ``offset``,
    contiguous, row-major. Written through a :class:`SegmentFile`, never mapped."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class SegmentFile:
    """Writes into one segment file by file offset, from any number of threads: each thread has
    its own descriptor, because ``sendfile`` writes at the descriptor's position."""

    def __init__(self, name: str, size: int):
        self.path = segment_path(name)  # validates the daemon-given name: no path tricks
        self.size = size
        self._local = threading.local()
        self._fds: list[int] = []
        self._lock = threading.Lock()

    def _fd(self) -> int:
        fd = getattr(self._local, "fd", None)
        if fd is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
            with self._lock:
                self._fds.append(fd)
            self._local.fd = fd
        return fd

    def copy_from(self, src_fd: int, src_offset: int, dst: SegmentRange) -> int:
        """Copy ``dst.nbytes`` from ``src_fd`` at ``src_offset`` into ``dst``, in the kernel.
        Returns the bytes copied: fewer when the source ends first (the caller says which file)."""
        fd = self._fd()
        os.lseek(fd, dst.offset, os.SEEK_SET)
        done = 0
        while done < dst.nbytes:
            try:
                n = os.sendfile(fd, src_fd, src_offset + done, min(SENDFILE_CHUNK, dst.nbytes - done))
            except OSError as exc:
                raise self._write_failure(exc) from None
            if n <= 0:
                break
            done += n
        return done

    def write(self, t: torch.Tensor, dst: SegmentRange) -> None:
        """Write tensor ``t`` (same dtype and shape as ``dst``) into ``dst``."""
        if t.dtype != dst.dtype or tuple(t.shape) != dst.shape:
            raise StagerError(ErrorCode.INTERNAL, f"a {t.dtype} tensor of shape {list(t.shape)} written where a "
                                                  f"{dst.dtype} tensor of shape {list(dst.shape)} goes")
        t = t.contiguous()
        fd, done, base = self._fd(), 0, t.data_ptr()
        while done < dst.nbytes:
            n = min(SENDFILE_CHUNK, dst.nbytes - done)
            view = memoryview((ctypes.c_char * n).from_address(base + done)).cast("B")
            try:
                n = os.pwrite(fd, view, dst.offset + done)
            except OSError as exc:
                raise self._write_failure(exc) from None
            if n <= 0:
                raise StagerError(ErrorCode.INTERNAL, f"writing the daemon's segment {self.path} wrote nothing")
            done += n

    def _write_failure(self, exc: OSError) -> StagerError:
        if exc.errno == errno.ENOSPC:
            return StagerError(ErrorCode.MEMORY_LIMIT, f"{SHM_DIR} is full: enlarge it (e.g. docker --shm-size) "
                                                       "or free memory, then load again")
        return StagerError(ErrorCode.INTERNAL, f"writing the daemon's segment {self.path} failed: {exc}")

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


class IngestSession:
    """Stage one version from this process as the only rank of a one-rank job.

    Args:
        endpoint: the daemon (default ``$STAGER_ENDPOINT`` or the per-user ipc socket).
        step: the version's step number (a new job timeline starts when no trainer is connected,
            so 0 is fine on a daemon a trainer left; a step not newer than one sealed in the same
            timeline is refused with STALE_STEP).
        timeout: seconds of silence from the daemon after which a request fails.
        seal_timeout: seconds to wait for the seal once committed.
        backpressure_timeout: seconds the daemon may hold the begin waiting for memory.
    """

    def __init__(self, endpoint: str | None = None, *, step: int = 0, timeout: float = 30.0,
                 seal_timeout: float = 300.0, backpressure_timeout: float = 0.0):
        self.step = step
        self.conn = Connection(endpoint, role="trainer", rank=0, local_world_size=1, world_size=1)
        self.endpoint = self.conn.endpoint
        self.sender = Sender(self.conn, full_world=True, timeout=timeout, wait_ms=int(backpressure_timeout * 1000),
                             transport="auto")
        self.seal_timeout = seal_timeout
        self.writer = SegmentWriter(CopyEngine())
        self._began = False
        self._committed = False
        self._frames: tuple[list, list] | None = None  # (assignment, buffers) when the daemon is on another host
        self.segment_file: SegmentFile | None = None  # begin(mapped=False) on the daemon's host

    def begin(self, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]], *,
              mapped: bool = True) -> dict[str, torch.Tensor | SegmentRange]:
        """Begin the step with ``{name: (dtype, shape)}``; returns ``{name: destination}``: views of
        the daemon's segment (same host), else buffers of this process sent at commit. With
        ``mapped=False`` a destination on the daemon's host is a :class:`SegmentRange` of
        :attr:`segment_file` instead of a view. The caller writes every byte of each before
        :meth:`commit`."""
        entries = []
        for name, (dtype, shape) in tensors.items():
            shape = tuple(int(s) for s in shape)
            entries.append(PlanEntry(name, dtype_name(dtype), shape, Box((0,) * len(shape), shape)))
        shm = self.sender.connect()
        reply = self.sender.begin(self.step, entries, plan_digest(entries), shm)
        self._began = True
        assignment = self.sender.assignment(reply, len(entries))
        if shm and not mapped:
            self.segment_file = SegmentFile(reply.segment, reply.size)
            return {name: self._range(entry, where) for name, entry, where in zip(tensors, entries, assignment)}
        if shm:
            views = self.writer.destinations(reply, entries, assignment, time.monotonic())
        else:  # the daemon is on another host: the bytes travel as frames, from buffers here
            views = [torch.empty(e.global_shape, dtype=dtype) for e, (dtype, _) in zip(entries, tensors.values())]
            self._frames = (assignment, views)
        return dict(zip(tensors, views))

    def _range(self, entry: PlanEntry, where) -> SegmentRange:
        shape, dtype = entry.box.shape, dtype_from_name(entry.dtype)
        if where is None or tuple(where.block_shape) != shape or any(where.inner):
            raise StagerError(ErrorCode.INTERNAL, f"the daemon placed {entry.name!r} of a one-rank step in part")
        nbytes = dtype.itemsize * entry.box.numel
        if where.block_offset < 0 or where.block_offset + nbytes > self.segment_file.size:
            raise StagerError(ErrorCode.INTERNAL, f"the daemon placed {entry.name!r} outside its segment")
        return SegmentRange(where.block_offset, nbytes, dtype, shape)

    def commit(self, *, objects: dict[str, Any] | None = None, model_info: dict | None = None,
               quant: dict | None = None) -> dict:
        """Commit and wait for the seal; returns ``{"step", "nbytes", "tensors", "partial"}``."""
        if self._frames is not None:
            assignment, buffers = self._frames
            self.sender.put(self.step, assignment, buffers, PUT_BATCH_BYTES)
        rid = self.sender.commit(self.step, objects or {}, model_info, quant or {})
        self._committed = True  # from here on the daemon seals or fails the step itself
        reply = self.conn.wait_reply(rid, self.seal_timeout, f"commit of step {self.step}", Sealed)
        return {"step": reply.step, "nbytes": reply.nbytes, "tensors": reply.tensors, "partial": reply.partial}

    def abort(self, reason: str) -> None:
        """Fail the step (best effort): the daemon unlinks its segment, no version is left."""
        if self._began and not self._committed:
            self.sender.abort(self.step, reason)
            self._committed = True

    def close(self) -> None:
        if self.segment_file is not None:
            self.segment_file.close()
        self.writer.close()
        self.conn.close()

    def __enter__(self) -> "IngestSession":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is not None and not isinstance(exc, RemoteError):
                self.abort(f"the loader failed: {exc}"[:500])
        finally:
            self.close()


def no_trainer_hint(exc: StagerError) -> StagerError:
    """A RANK_CONFLICT on hello means a training job is connected: say what to do instead."""
    if exc.code == ErrorCode.RANK_CONFLICT:
        return StagerError(ErrorCode.RANK_CONFLICT, f"{exc.message}; a checkpoint is loaded as a one-rank job: load "
                                                    "it while no trainer is connected, or into its own daemon "
                                                    "(--endpoint)")
    return exc
