"""The train-loop hook: ``StagingClient.stage(state_dict, step=...)``.

``stage()`` only records a CUDA event (when CUDA is in use) and queues the state dict; a
background thread plans the layout, asks the daemon where this step goes, and copies every
local shard straight into its final place in the daemon's snapshot segment. The train loop
waits only in ``handle.wait_copied()``, before it mutates the tensors.

    client = StagingClient()
    for step in range(steps):
        loss = model(batch).sum(); loss.backward()
        handle = client.stage(model.state_dict(), step=step)
        handle.wait_copied()          # the copy out of the live tensors is done
        optimizer.step()
    client.close()
"""

from __future__ import annotations

import collections
import ctypes
import importlib
import logging
import math
import os
import threading
import time
import weakref
from typing import Any, Mapping

import torch

from stager.protocol import (
    Abort, Begin, BeginReply, Commit, ErrorCode, ErrorReply, Ok, Ping, Pong, Put, RemoteError, Sealed,
    StagerError,
)
from stager.protocol.dtypes import DTYPES
from stager.planning import plan_digest
from stager.shm import block_view, map_segment

from .connection import Connection
from .copier import CopyEngine, cuda_active, prefault
from .flatten import LayoutCache, flatten_state_dict, split_float8
from .handle import StageHandle

log = logging.getLogger("stager.client")
PUT_BATCH_BYTES = 64 << 20  # bytes per Put message from a rank on another host: bounds memory on both sides
PREFAULT_CHUNK = 64 << 20  # bytes of page tables faulted in per idle tick (~20-40 ms here)
KEEPALIVE_S = 5.0  # idle ping interval; the daemon drops remote peers silent for --peer-timeout (30 s)
PING_TIMEOUT_S = 5.0  # a ping unanswered this long: the daemon is gone or hung


def write_spans(plan: list, assignment: list) -> list[tuple[int, int]]:
    """Merged byte ranges of the segment that this rank's assigned shards cover."""
    spans = []
    for entry, where in zip(plan, assignment):
        if where is None or not math.prod(entry[4]):
            continue
        block_offset, block_shape, inner = where
        itemsize = DTYPES[entry[1]].itemsize
        first = last = 0
        for dim, extent in enumerate(block_shape):  # row-major linear index of the box's corners
            first = first * extent + inner[dim]
            last = last * extent + inner[dim] + entry[4][dim] - 1
        spans.append((block_offset + first * itemsize, block_offset + (last + 1) * itemsize))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1] + 4096:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


class _Job:
    __slots__ = ("state_dict", "step", "model_info", "handle", "start_event")

    def __init__(self, state_dict, step, model_info, handle, start_event):
        self.state_dict, self.step, self.model_info = state_dict, step, model_info
        self.handle, self.start_event = handle, start_event


def _rank_info(rank, local_world_size, world_size) -> tuple[int, int, int]:
    import torch.distributed as dist

    g_rank, g_world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    world_size = world_size or int(os.environ.get("WORLD_SIZE", g_world))
    local_world_size = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if rank is None:
        rank = int(os.environ.get("LOCAL_RANK", g_rank % local_world_size))
    return rank, local_world_size, world_size


class StagingClient:
    """Stages state dicts to the node's stager daemon without blocking the training loop.

    Args:
        endpoint: the daemon's endpoint; default ``$STAGER_ENDPOINT`` or the per-user ipc socket.
        rank, local_world_size, world_size: this rank on its node; default from torch.distributed
            and ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` (as torchrun sets them).
        strict: raise staging errors from ``wait_copied()`` instead of logging them.
        timeout: seconds to wait for the daemon's answer to a step's begin.
        seal_timeout: seconds after which an unsealed step's handle fails.
        backpressure_timeout: seconds the daemon may hold a step waiting for memory (default: refuse at once).
        transport: ``"auto"`` (shared memory on the daemon's host, frames otherwise), ``"shm"`` or ``"frames"``.

    >>> client = StagingClient()  # doctest: +SKIP
    >>> client.stage({"w": torch.ones(4)}, step=1).wait()  # doctest: +SKIP
    {'step': 1, 'nbytes': 16, 'tensors': 1, 'partial': False}
    """

    def __init__(self, endpoint: str | None = None, *, rank: int | None = None, local_world_size: int | None = None,
                 world_size: int | None = None, strict: bool = False, timeout: float = 10.0,
                 seal_timeout: float = 300.0, backpressure_timeout: float = 0.0, transport: str = "auto"):
        if transport not in ("auto", "shm", "frames"):
            raise ValueError(f"transport must be auto, shm or frames, not {transport!r}")
        rank, local_world_size, world_size = _rank_info(rank, local_world_size, world_size)
        self.rank, self.strict = rank, strict
        self._worker = _Worker(
            Connection(endpoint, role="trainer", rank=rank, local_world_size=local_world_size,
                       world_size=world_size),
            full_world=world_size == local_world_size, timeout=timeout, seal_timeout=seal_timeout,
            wait_ms=int(backpressure_timeout * 1000), transport=transport)
        self.endpoint = self._worker.conn.endpoint
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._worker.run, name=f"stager-client-{rank}", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _Worker.shutdown, self._worker, self._thread, 0.0)

    def stage(self, state_dict: Mapping[str, Any], *, step: int, model_info: dict | None = None) -> StageHandle:
        """Queue ``state_dict`` as version ``step`` and return at once.

        Do not mutate the tensors until ``handle.wait_copied()`` returned (the same contract as
        DCP's async_save). ``model_info`` is a small msgpack-able dict carried with the version.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, not {step!r}")
        handle = StageHandle(step, self.strict)
        if self._finalizer.alive is False:
            handle._fail(StagerError(ErrorCode.UNAVAILABLE, "the client is closed"))
            return handle
        start_event = None
        if cuda_active():
            self._worker.copier.device = torch.cuda.current_device()
            start_event = torch.cuda.Event()
            start_event.record()
        with self._lock:
            self._worker.submit(_Job(state_dict, step, model_info, handle, start_event))
        return handle

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued stages (up to ``timeout`` seconds), then release the socket and mappings."""
        if self._finalizer.alive:
            self._finalizer.detach()
            _Worker.shutdown(self._worker, self._thread, timeout)

    def __enter__(self) -> "StagingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Worker:
    """Runs on the client's background thread and owns everything that thread touches."""

    def __init__(self, conn: Connection, *, full_world: bool, timeout: float, seal_timeout: float, wait_ms: int,
                 transport: str):
        self.conn, self.full_world, self.timeout = conn, full_world, timeout
        self.seal_timeout, self.wait_ms, self.transport = seal_timeout, wait_ms, transport
        self.jobs: collections.deque = collections.deque()
        # Waking the worker with an Event keeps the GIL in stage(): a socket send would release
        # it inside stage(), and the woken worker would hold it for a whole switch interval.
        self._wake = threading.Event()
        self.closing = threading.Event()
        self.layouts = LayoutCache()
        self.copier = CopyEngine()
        self.last_plan: list | None = None
        self.digest = ""
        self.plans_sent: set[tuple[str, str]] = set()
        self.assignments: dict[tuple[str, str], list] = {}
        self.segments: dict[str, torch.Tensor] = {}
        self.dst_cache: dict[tuple[str, str], list] = {}
        self.pending: dict[int, tuple] = {}  # commit request id -> (handle, deadline, connection generation)
        self.generation = self.conn.generation
        self.put_buffers: list = []  # host copies behind the latest Put frames (see _send_put)
        self.upcoming: dict[str, tuple] = {}  # segments to pre-fault -> (size, give-up time, spans left)
        self.spans_layout: str | None = None
        self.spans: list[tuple[int, int]] = []  # byte ranges of a segment this rank writes
        self.ping_id: int | None = None
        self.last_ping = 0.0
        self.conn.on_unsolicited = self._on_reply

    # ------------------------------------------------------------------ thread entry

    def submit(self, job: _Job) -> None:  # called on the train thread, under the client's lock
        self.jobs.append(job)
        self._wake.set()

    @staticmethod
    def shutdown(worker: "_Worker", thread: threading.Thread, timeout: float) -> None:
        worker.drain_timeout = timeout
        worker.closing.set()
        worker._wake.set()
        thread.join(timeout + 5.0)

    drain_timeout = 0.0

    def run(self) -> None:
        try:  # torch.distributed.tensor takes ~1 s to import: here, not in the first stage()
            importlib.import_module("torch.distributed.tensor")
        except Exception:  # a torch without distributed: plain tensors still work
            pass
        close_deadline = None
        while True:
            try:
                if self.closing.is_set():
                    close_deadline = close_deadline or time.monotonic() + self.drain_timeout
                    if (not self.jobs and not self.pending) or time.monotonic() >= close_deadline:
                        break
                self._tick()
            except Exception:  # the staging thread must outlive any single failure
                log.exception("stager client thread: unexpected error")
                time.sleep(0.05)
        self._close()

    def _tick(self) -> None:
        if not self.jobs:
            if self.pending or self.ping_id is not None:
                self.conn.sock.poll(2)  # replies due: watch the socket, and the job queue every 2 ms
            elif self.upcoming:
                self._premap_one()
            else:
                self._wake.wait(0.1)
        self._wake.clear()
        was_connected = self.conn.connected
        if not self.conn.poll_monitor(0) and was_connected and self.pending:
            self._fail_pending(ErrorCode.UNAVAILABLE, "lost the connection to the daemon before the step was sealed")
        while True:
            reply = self.conn.recv(0)
            if reply is None:
                break
            self._on_reply(reply)
        if self.jobs:
            self._process(self.jobs.popleft())
        self._maintain()

    def _close(self) -> None:
        while self.jobs:
            self.jobs.popleft().handle._fail(StagerError(ErrorCode.UNAVAILABLE, "the client was closed"))
        self._fail_pending(ErrorCode.UNAVAILABLE, "the client was closed before the step was sealed")
        self.copier.close()
        self.segments.clear()
        self.dst_cache.clear()
        self.conn.close()

    # ------------------------------------------------------------------ replies & liveness

    def _on_reply(self, reply) -> None:
        entry = self.pending.pop(reply.id, None)
        if entry is not None:
            handle = entry[0]
            if isinstance(reply, Sealed):
                handle._seal({"step": reply.step, "nbytes": reply.nbytes, "tensors": reply.tensors,
                              "partial": reply.partial})
            elif isinstance(reply, ErrorReply):
                self._report(handle, reply.to_exception())
            else:
                self._report(handle, StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {reply.TYPE} reply to commit"))
            return
        if isinstance(reply, Pong) and reply.id == self.ping_id:
            self.ping_id = None
            if self.conn.session is not None and reply.session != self.conn.session:
                self.conn.session = None
                self._fail_pending(ErrorCode.UNAVAILABLE, "the daemon restarted; the step was lost")

    def _fail_pending(self, code: ErrorCode, message: str) -> None:
        pending, self.pending = self.pending, {}
        for handle, _, _ in pending.values():
            self._report(handle, StagerError(code, f"step {handle.step}: {message}"))

    def _maintain(self) -> None:
        now = time.monotonic()
        if self.conn.generation != self.generation:  # the socket was reset: its requests are lost
            self.generation = self.conn.generation
            self.ping_id = None
            for rid, (handle, _, gen) in list(self.pending.items()):
                if gen != self.generation:
                    del self.pending[rid]
                    self._report(handle, StagerError(ErrorCode.UNAVAILABLE, f"step {handle.step}: the connection "
                                                     "to the daemon was reset before the step was sealed"))
        for rid, (handle, deadline, _) in list(self.pending.items()):
            if now >= deadline:
                del self.pending[rid]
                self._report(handle, StagerError(ErrorCode.TIMEOUT, f"step {handle.step} not sealed within "
                                                 f"{self.seal_timeout:.0f}s"))
        # ping every second while a seal is due (a restarted daemon shows a new session), and every
        # KEEPALIVE_S when idle so a daemon on another host does not take this rank for dead
        interval = 1.0 if self.pending else KEEPALIVE_S
        if self.conn.session is not None and self.conn.connected and now - self.last_ping > interval:
            if self.ping_id is not None and now - self.last_ping > PING_TIMEOUT_S:
                self.conn.reset()
                self._fail_pending(ErrorCode.UNAVAILABLE, "the daemon stopped answering")
                self.ping_id = None
                return
            if self.ping_id is not None:
                return  # still waiting for the last one
            try:
                self.ping_id = self.conn.send(Ping())
            except StagerError:
                self.ping_id = None
            self.last_ping = now

    @staticmethod
    def _report(handle: StageHandle, error: StagerError) -> None:
        log.warning("staging step %d failed: %s", handle.step, error)
        handle._fail(error)

    # ------------------------------------------------------------------ one step

    def _process(self, job: _Job) -> None:
        handle, began = job.handle, False
        try:
            tensors, objects = flatten_state_dict(job.state_dict)
            tensors, quant = split_float8(tensors)
            plan, locals_ = self.layouts.describe(tensors)
            if plan != self.last_plan:
                self.last_plan = plan
                self.digest = plan_digest(plan)
            if self.conn.session is None:
                self.conn.hello(self.timeout)
            shm = self.transport == "shm" or (self.transport == "auto" and self.conn.same_host)
            reply = self._begin(job.step, plan, shm)
            began = True
            key = (self.conn.session, reply.layout)
            if reply.assignment is not None:
                # assignments of an earlier daemon session can never be used again
                self.assignments = {k: v for k, v in self.assignments.items() if k[0] == self.conn.session}
                self.assignments[key] = reply.assignment
            assignment = self.assignments.get(key)
            if assignment is None or len(assignment) != len(plan):
                raise StagerError(ErrorCode.INTERNAL, f"no assignment for layout {reply.layout}")
            if shm:
                dsts = self._destinations(reply, plan, assignment)
                events = self.copier.copy([(d, s) for d, s in zip(dsts, locals_) if d is not None], job.start_event)
                handle._cuda_events = events
                handle._set_copied()
                for event in events:
                    event.synchronize()  # bytes must be in the segment before the commit
            else:
                self._put(job.step, plan, assignment, locals_)
                handle._set_copied()
            rid = self.conn.send(Commit(step=job.step, objects=objects, model_info=job.model_info, quant=quant))
            self.pending[rid] = (handle, time.monotonic() + self.seal_timeout, self.conn.generation)
        except Exception as exc:
            error = exc if isinstance(exc, StagerError) else StagerError(
                ErrorCode.INTERNAL, f"staging step {job.step} failed: {exc.__class__.__name__}: {exc}")
            if not isinstance(exc, StagerError):
                log.exception("staging step %d failed", job.step)
            if began and not isinstance(exc, RemoteError):
                try:
                    self.conn.send(Abort(step=job.step, reason=str(error)[:500]))
                except StagerError:
                    pass
            self._report(handle, error)

    def _begin(self, step: int, plan: list, shm: bool) -> BeginReply:
        for attempt in range(2):
            sent_key = (self.conn.session, self.digest)
            with_plan = sent_key not in self.plans_sent or attempt > 0
            msg = Begin(step=step, digest=self.digest, plan=[list(p) for p in plan] if with_plan else None,
                        full_world=self.full_world, shm=shm, wait_ms=self.wait_ms)
            try:
                reply = self.conn.request(msg, self.timeout + self.wait_ms / 1000)
            except RemoteError as exc:
                if exc.code == ErrorCode.PLAN_REQUIRED and attempt == 0:
                    continue
                if exc.code == ErrorCode.NOT_REGISTERED and attempt == 0:
                    self.conn.hello(self.timeout)  # the daemon dropped us (restart, silence): register again
                    continue
                raise
            self.plans_sent.add((self.conn.session, self.digest))
            if not isinstance(reply, BeginReply):
                raise StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {reply.TYPE} reply to begin")
            return reply
        raise StagerError(ErrorCode.INTERNAL, "unreachable")

    def _premap_one(self) -> None:
        """While idle, map a segment the daemon will hand out in a later step and fault in the page
        tables of this rank's part of it, so that step's copy runs at full speed. Works in chunks
        of PREFAULT_CHUNK bytes: a stage() arriving meanwhile waits for one chunk at most."""
        name, (size, deadline, spans) = next(iter(self.upcoming.items()))
        seg = self.segments.get(name)
        if seg is None:
            try:
                seg = map_segment(name, size, writable=True)
            except (OSError, StagerError):
                # the daemon is still creating it (the size is set when it is complete): retry soon,
                # unless it never appears (retired): then the step that needs it maps it
                if time.monotonic() > deadline:
                    del self.upcoming[name]
                else:
                    self._wake.wait(0.02)
                return
            self.segments[name] = seg
            self.copier.register(seg)
        budget = PREFAULT_CHUNK
        while spans and budget > 0:
            start, end = spans[0]
            stop = min(end, start + budget)
            if not prefault(seg, start, stop):
                spans.clear()  # kernel without MADV_POPULATE_WRITE: the copy faults pages in itself
                break
            budget -= stop - start
            if stop == end:
                spans.pop(0)
            else:
                spans[0] = (stop, end)
        if not spans:
            del self.upcoming[name]
            log.debug("segment %s mapped and pre-faulted", name)

    def _destinations(self, reply: BeginReply, plan: list, assignment: list) -> list:
        """Views of the segment where each local shard goes (None: a replica another rank writes)."""
        live = set(reply.live_segments)
        if reply.layout != self.spans_layout:
            self.spans_layout, self.spans = reply.layout, write_spans(plan, assignment)
        deadline = time.monotonic() + 30.0
        self.upcoming = {n: (reply.size, deadline, list(self.spans))
                         for n in reply.live_segments if n not in self.segments and n != reply.segment}
        key = (reply.segment, reply.layout)
        cached = self.dst_cache.get(key)
        if cached is not None:
            return cached
        for name in [n for n in self.segments if n not in live]:  # retired by the daemon
            self.copier.unregister(self.segments.pop(name))
        for k in [k for k in self.dst_cache if k[0] not in live or k[1] != reply.layout]:
            del self.dst_cache[k]
        seg = self.segments.get(reply.segment)
        if seg is None:
            seg = self.segments[reply.segment] = map_segment(reply.segment, reply.size, writable=True)
            self.copier.register(seg)
        dsts = []
        for entry, where in zip(plan, assignment):
            if where is None:
                dsts.append(None)
                continue
            block_offset, block_shape, inner = where
            view = block_view(seg, DTYPES[entry[1]], block_offset, block_shape)
            for dim, (start, length) in enumerate(zip(inner, entry[4])):
                view = view.narrow(dim, start, length)
            dsts.append(view)
        self.dst_cache[key] = dsts
        return dsts

    def _put(self, step: int, plan: list, assignment: list, locals_: list) -> None:
        """Send this rank's regions as frames (a daemon on another host), in bounded batches."""
        batch_idx, batch_frames, batch_bytes = [], [], 0
        keep_alive: list = []
        for index, (where, local) in enumerate(zip(assignment, locals_)):
            if where is None:
                continue
            host = local.detach().contiguous().cpu() if local.is_cuda or not local.is_contiguous() else local
            keep_alive.append(host)
            nbytes = host.numel() * host.element_size()
            frame = (ctypes.c_char * nbytes).from_address(host.data_ptr()) if nbytes else b""
            batch_idx.append(index)
            batch_frames.append(frame)
            batch_bytes += nbytes
            if batch_bytes >= PUT_BATCH_BYTES:
                self._send_put(step, batch_idx, batch_frames, keep_alive)
                batch_idx, batch_frames, batch_bytes, keep_alive = [], [], 0, []
        if batch_idx:
            self._send_put(step, batch_idx, batch_frames, keep_alive)

    def _send_put(self, step: int, regions: list, frames: list, buffers: list) -> None:
        # frames point into ``buffers`` without owning them; a socket reset closes asynchronously,
        # so the last batch's buffers stay referenced until the next batch was acknowledged
        self.put_buffers.append(buffers)
        reply = self.conn.request(Put(step=step, regions=regions, frames=frames), self.timeout)
        del self.put_buffers[:-1]
        if not isinstance(reply, Ok):
            raise StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {reply.TYPE} reply to put")
