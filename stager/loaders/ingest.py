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
import stat
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

log = logging.getLogger("stager.loaders.ingest")
PUT_BATCH_BYTES = 64 << 20  # frames to a daemon on another host: bounds memory on both sides
SENDFILE_CHUNK = 1 << 30  # Linux moves at most ~2 GiB per sendfile call
COPY_BUFFER = 64 << 20  # the buffer of a copy from a file system that cannot splice
_NO_SPLICE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}  # sendfile refused for this pair of files
_WRITE_ERRNOS = {errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EDQUOT}  # the segment's pages cannot be had


@dataclasses.dataclass(frozen=True)
class SegmentRange:
    """Where one whole tensor goes in the daemon's segment file: ``nbytes`` at ``offset``,
    contiguous, row-major. Written through a :class:`SegmentFile`, never mapped."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class SegmentFile:
    """Writes into one segment file by file offset, from any number of threads.

    The file is opened when the step begins (``O_NOFOLLOW``; a regular file of this user, as large
    as the daemon said). Each thread then writes through a descriptor of its own, because
    ``sendfile`` writes at the descriptor's position; such a descriptor must reach the very same
    file (device and inode), so a name the daemon has unlinked since (it failed the step) or a file
    another user planted under that name is refused, never written."""

    def __init__(self, name: str, size: int):
        self.path = segment_path(name)  # validates the daemon-given name: no path tricks
        self.size = size
        self._local = threading.local()
        self._lock = threading.Lock()
        self._left_open = False
        first = self._open()
        st = os.fstat(first)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size < size:
            os.close(first)
            raise StagerError(
                ErrorCode.BAD_MESSAGE,
                f"{self.path} is not a segment of this user of {size} bytes: "
                "the daemon named a file it does not own; restart it",
            )
        self._identity = (st.st_dev, st.st_ino)
        self._fds = [first]
        self._local.fd = first

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise StagerError(
                ErrorCode.STEP_FAILED,
                f"the daemon's segment {self.path} cannot be opened "
                f"({exc.strerror}): the daemon has failed the step (see "
                "`stager status`); load again",
            ) from None

    def _fd(self) -> int:
        fd = getattr(self._local, "fd", None)
        if fd is None:
            fd = self._open()
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._identity:
                os.close(fd)
                raise StagerError(
                    ErrorCode.STEP_FAILED,
                    f"{self.path} is another file than the step's segment: the daemon has failed the step; load again",
                )
            with self._lock:
                self._fds.append(fd)
            self._local.fd = fd
        return fd

    def copy_from(self, src_fd: int, src_offset: int, dst: SegmentRange) -> int:
        """Copy ``dst.nbytes`` from ``src_fd`` at ``src_offset`` into ``dst``: in the kernel
        (``sendfile``), or through a buffer where the source's file system cannot splice. Returns
        the bytes copied: fewer when the source ends first. A failure to read the source raises
        ``OSError`` (the caller names the file); one to write the segment, a StagerError."""
        fd = self._fd()
        os.lseek(fd, dst.offset, os.SEEK_SET)
        done = 0
        while done < dst.nbytes:
            try:
                n = os.sendfile(fd, src_fd, src_offset + done, min(SENDFILE_CHUNK, dst.nbytes - done))
            except OSError as exc:
                if exc.errno in _NO_SPLICE and done == 0:
                    return self._copy_buffered(src_fd, src_offset, dst)
                if exc.errno in _WRITE_ERRNOS:
                    raise self._write_failure(exc) from None
                raise
            if n <= 0:
                break
            done += n
        return done

    def _copy_buffered(self, src_fd: int, src_offset: int, dst: SegmentRange) -> int:
        buf = bytearray(min(COPY_BUFFER, dst.nbytes))
        view = memoryview(buf)
        done = 0
        while done < dst.nbytes:
            got = os.preadv(src_fd, [view[: min(len(buf), dst.nbytes - done)]], src_offset + done)
            if got <= 0:
                break
            self._pwrite_all(view[:got], dst.offset + done)
            done += got
        return done

    def write(self, t: torch.Tensor, dst: SegmentRange) -> None:
        """Write tensor ``t`` (same dtype and shape as ``dst``) into ``dst``."""
        if t.dtype != dst.dtype or tuple(t.shape) != dst.shape:
            raise StagerError(
                ErrorCode.INTERNAL,
                f"a {t.dtype} tensor of shape {list(t.shape)} written where a "
                f"{dst.dtype} tensor of shape {list(dst.shape)} goes",
            )
        t = t.resolve_conj().resolve_neg().contiguous()  # the bytes of the values, as copy_ would write them
        done, base = 0, t.data_ptr()
        while done < dst.nbytes:
            n = min(SENDFILE_CHUNK, dst.nbytes - done)
            self._pwrite_all(memoryview((ctypes.c_char * n).from_address(base + done)).cast("B"), dst.offset + done)
            done += n

    def _pwrite_all(self, view: memoryview, offset: int) -> None:
        fd, done = self._fd(), 0
        while done < len(view):
            try:
                n = os.pwrite(fd, view[done:], offset + done)
            except OSError as exc:
                raise self._write_failure(exc) from None
            if n <= 0:
                raise StagerError(ErrorCode.INTERNAL, f"writing the daemon's segment {self.path} wrote nothing")
            done += n

    def _write_failure(self, exc: OSError) -> StagerError:
        if exc.errno in _WRITE_ERRNOS:
            return StagerError(
                ErrorCode.MEMORY_LIMIT,
                f"{SHM_DIR} has no room for the segment's pages "
                f"({exc.strerror}): enlarge it (e.g. docker --shm-size) or "
                "free memory, then load again",
            )
        return StagerError(ErrorCode.INTERNAL, f"writing the daemon's segment {self.path} failed: {exc}")

    def leave_open(self) -> None:
        """Writers may still be running (interrupted twice): :meth:`close` must not close their
        descriptors under them, where a reused number could then point at another file."""
        self._left_open = True

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, []
        if not self._left_open:
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

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        step: int = 0,
        timeout: float = 30.0,
        seal_timeout: float = 300.0,
        backpressure_timeout: float = 0.0,
    ):
        self.step = step
        self.conn = Connection(endpoint, role="trainer", rank=0, local_world_size=1, world_size=1)
        self.endpoint = self.conn.endpoint
        self.sender = Sender(
            self.conn, full_world=True, timeout=timeout, wait_ms=int(backpressure_timeout * 1000), transport="auto"
        )
        self.seal_timeout = seal_timeout
        self.writer = SegmentWriter(CopyEngine())
        self._began = False
        self._committed = False
        self._frames: tuple[list, list] | None = None  # (assignment, buffers) when the daemon is on another host
        self.segment_file: SegmentFile | None = None  # begin(mapped=False) on the daemon's host

    def begin(
        self, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]], *, mapped: bool = True
    ) -> dict[str, torch.Tensor | SegmentRange]:
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

    def commit(
        self, *, objects: dict[str, Any] | None = None, model_info: dict | None = None, quant: dict | None = None
    ) -> dict:
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

    def __enter__(self) -> IngestSession:
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
        return StagerError(
            ErrorCode.RANK_CONFLICT,
            f"{exc.message}; a checkpoint is loaded as a one-rank job: load "
            "it while no trainer is connected, or into its own daemon "
            "(--endpoint)",
        )
    return exc
