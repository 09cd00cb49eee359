"""One checkpoint into the daemon as a sealed version: a one-rank staging session.

A loader (``load-hf``, ``load-dcp``) is a trainer of world size 1 as far as the daemon knows: it
says hello as rank 0 of a one-rank node, begins the step with a plan of plain (whole) tensors,
writes each tensor's bytes into the daemon's segment itself, and commits. So the daemon needs no
ingest path of its own, and a loaded version is served, leased, exported and restored like any
staged one. What is new here is only *who fills the destination*: :meth:`IngestSession.fill` hands
the caller the segment's views (on the daemon's host; elsewhere plain buffers sent as frames), so
a loader reads file bytes straight into shared memory, once.

Nothing half-done is visible: a failure between begin and commit aborts the step (the daemon fails
it and unlinks its segment), and the version exists only once the daemon answered ``Sealed``.

>>> with IngestSession(endpoint, step=0) as s:  # doctest: +SKIP
...     dsts = s.begin({"w": (torch.float32, (4, 2))})
...     dsts["w"].fill_(1.0)
...     s.commit(model_info={"source": {"format": "hf"}})
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from stager.client.connection import Connection
from stager.client.hook.copier import CopyEngine
from stager.client.hook.sender import Sender
from stager.client.hook.writer import SegmentWriter
from stager.protocol import ErrorCode, RemoteError, Sealed, StagerError, dtype_name
from stager.protocol.layout import Box, PlanEntry, plan_digest

log = logging.getLogger("stager.consumers.ingest")
PUT_BATCH_BYTES = 64 << 20  # frames to a daemon on another host: bounds memory on both sides


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

    def begin(self, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        """Begin the step with ``{name: (dtype, shape)}``; returns ``{name: destination}``: views of
        the daemon's segment (same host), else buffers of this process sent at commit. The caller
        writes every byte of each before :meth:`commit`."""
        entries = []
        for name, (dtype, shape) in tensors.items():
            shape = tuple(int(s) for s in shape)
            entries.append(PlanEntry(name, dtype_name(dtype), shape, Box((0,) * len(shape), shape)))
        shm = self.sender.connect()
        reply = self.sender.begin(self.step, entries, plan_digest(entries), shm)
        self._began = True
        assignment = self.sender.assignment(reply, len(entries))
        if shm:
            views = self.writer.destinations(reply, entries, assignment, time.monotonic())
        else:  # the daemon is on another host: the bytes travel as frames, from buffers here
            views = [torch.empty(e.global_shape, dtype=dtype) for e, (dtype, _) in zip(entries, tensors.values())]
            self._frames = (assignment, views)
        return dict(zip(tensors, views))

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
