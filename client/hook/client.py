"""The train-loop hook: ``StagingClient.stage(state_dict, step=...)``.

``stage()`` only records a CUDA event (when CUDA is in use) and queues the state dict; a
background thread plans the layout, asks the daemon where this step goes, and copies every
local shard straight into its final place in the daemon's snapshot segment. The train loop
waits only in ``handle.wait_copied()``, before it mutates the tensors. A daemon that shows no
sign of life for ``ack_timeout`` (stopped, hung) holds it no longer: the step is skipped.

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
import importlib
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from stager.protocol import Abort, ErrorCode, Join, RemoteError, StagerError
from stager.protocol.messages import check_model_info

from ..connection import HELLO_WAIT_S, Connection
from .copier import CopyEngine, cuda_active
from .handle import StageHandle
from .planner import Planner
from .replies import SealTracker, report
from .sender import Sender
from .writer import SegmentWriter

__all__ = ["StagingClient"]

log = logging.getLogger("stager.client")
# Tunables, read by the worker at each use (not copied into the parts at construction), so
# tests can patch them here on the module (``staging.KEEPALIVE_S = ...``) at any time.
PUT_BATCH_BYTES = 64 << 20  # bytes per Put message from a rank on another host: bounds memory on both sides
PREFAULT_CHUNK = 64 << 20  # bytes of page tables faulted in per idle tick (~20-40 ms here)
KEEPALIVE_S = 5.0  # idle ping interval; the daemon drops remote peers silent for --peer-timeout (30 s)
PING_TIMEOUT_S = 5.0  # a ping unanswered this long: the daemon is gone or hung
ACK_TIMEOUT_S = 1.0  # default StagingClient(ack_timeout=...): the longest a stage waits for a sign of life
ACK_TIMEOUT_ENV = "STAGER_ACK_TIMEOUT"
# begin refusals after which the daemon needs no Abort: the step failed already, or was sealed before
_DAEMON_KNOWS = (ErrorCode.STEP_FAILED, ErrorCode.STALE_STEP)


class _QueuedStage:
    """One ``stage()`` call waiting in the worker's queue."""

    __slots__ = ("state_dict", "step", "model_info", "handle", "start_event", "submitted")

    def __init__(self, state_dict, step, model_info, handle, start_event):
        self.state_dict = state_dict
        self.step = step
        self.model_info = model_info
        self.handle, self.start_event = handle, start_event
        self.submitted = time.monotonic()


def _ack_timeout(value: float | None) -> float:
    """``StagingClient(ack_timeout=...)``, else ``$STAGER_ACK_TIMEOUT``, else ACK_TIMEOUT_S."""
    source = "ack_timeout"
    if value is None:
        raw = os.environ.get(ACK_TIMEOUT_ENV)
        if not raw:
            return ACK_TIMEOUT_S
        source = f"{ACK_TIMEOUT_ENV}={raw!r}"
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(
            f"{source}: the seconds a stage may wait for a sign of life from the daemon must be a "
            f"positive number (default {ACK_TIMEOUT_S}), not {value!r}"
        )
    return float(value)


def _rank_info(rank, local_world_size, world_size) -> tuple[int, int, int]:
    import torch.distributed as dist

    g_rank, g_world = (
        (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    )
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
        timeout: seconds of silence from the daemon (no answer to a request, nor to the pings sent
            while it waits) after which a stage fails with TIMEOUT. A begin the daemon holds for the
            other ranks of the node waits on while the daemon answers pings, up to ``seal_timeout``
            (the daemon's ``--step-timeout`` fails the step first, naming the ranks that never began).
        seal_timeout: seconds after which an unsealed step's handle fails.
        backpressure_timeout: seconds the daemon may hold a step waiting for memory (default: refuse at once).
        ack_timeout: seconds a stage waits for a sign of life from the daemon (default ``$STAGER_ACK_TIMEOUT``,
            else 1): the answer to its begin, or to a ping sent after it (the daemon handles requests in
            order, so that answer says it has the begin and is preparing the step: allocating memory,
            waiting for the other ranks or for memory to free up; the wait then goes on as ``timeout``
            says). Past it the daemon is taken for stopped, hung or gone: the step is skipped
            (``handle.skipped``, ``stats["skipped"]``, one warning), and while the daemon stays silent
            the next stages are skipped at once; the first stage after it answers again goes ahead.
        transport: ``"auto"`` (shared memory on the daemon's host, frames otherwise), ``"shm"`` or ``"frames"``.
        job: a job spanning nodes (``world_size > local_world_size`` under torch.distributed) joins its
            daemons into one store at construction (a collective: one all_gather over gloo, see
            ``hook/job_join.py``); this names the job (default ``$STAGER_JOB_ID``, else a token drawn
            for this run); ``False``: do not join (each node's versions stay partial).

    >>> client = StagingClient()  # doctest: +SKIP
    >>> client.stage({"w": torch.ones(4)}, step=1).wait()  # doctest: +SKIP
    {'step': 1, 'nbytes': 16, 'tensors': 1, 'partial': False}
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        rank: int | None = None,
        local_world_size: int | None = None,
        world_size: int | None = None,
        strict: bool = False,
        timeout: float = 10.0,
        seal_timeout: float = 300.0,
        backpressure_timeout: float = 0.0,
        transport: str = "auto",
        job: str | bool | None = None,
        ack_timeout: float | None = None,
    ):
        if transport not in ("auto", "shm", "frames"):
            raise ValueError(f"transport must be auto, shm or frames, not {transport!r}")
        ack_timeout = _ack_timeout(ack_timeout)
        rank, local_world_size, world_size = _rank_info(rank, local_world_size, world_size)
        self.rank = rank
        self.strict = strict
        self._timeout = timeout
        conn = Connection(endpoint, role="trainer", rank=rank, local_world_size=local_world_size, world_size=world_size)
        self.job = self._join(conn, job, world_size > local_world_size, timeout)  # before the worker owns conn
        self._worker = _Worker(
            conn,
            full_world=world_size == local_world_size,
            timeout=timeout,
            seal_timeout=seal_timeout,
            wait_ms=int(backpressure_timeout * 1000),
            transport=transport,
            ack_timeout=ack_timeout,
        )
        self.endpoint = self._worker.conn.endpoint
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._worker.run, name=f"stager-client-{rank}", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _Worker.shutdown, self._worker, self._thread, 0.0)

    def _join(self, conn: Connection, job: str | bool | None, spans_nodes: bool, timeout: float) -> Join | None:
        import torch.distributed as dist

        if job is False or not spans_nodes:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            log.warning(
                "this job spans nodes (WORLD_SIZE > LOCAL_WORLD_SIZE) but torch.distributed is not "
                "initialized: not joining the nodes' daemons into one job (each node's versions stay "
                "partial); construct StagingClient after init_process_group, or pass job=False"
            )
            return None
        from .job_join import join_job

        try:
            msg = join_job(conn, job=job if isinstance(job, str) else None, timeout=timeout)
        except StagerError as exc:
            if self.strict:
                conn.close()
                raise
            log.warning("could not join the multi-node job: %s", exc)
            return None
        conn.rejoin = msg  # said again to a restarted daemon, right after hello
        return msg

    def stage(self, state_dict: Mapping[str, Any], *, step: int, model_info: dict | None = None) -> StageHandle:
        """Queue ``state_dict`` as version ``step`` and return at once.

        Do not mutate the tensors until ``handle.wait_copied()`` returned (the same contract as
        DCP's async_save). ``model_info`` is a small msgpack-able dict carried with the version,
        checked here (BAD_VALUE when too large or deep, or when ``hf_config`` is not a dict).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, not {step!r}")
        if model_info is not None:
            check_model_info(model_info)  # a bad one is the caller's bug: say so here, not as a failed step
        handle = StageHandle(step, self.strict)
        if self._finalizer.alive is False:
            handle.fail(StagerError(ErrorCode.UNAVAILABLE, "the client is closed"))
            return handle
        start_event = None
        if cuda_active():
            self._worker.copier.device = torch.cuda.current_device()
            start_event = torch.cuda.Event()
            start_event.record()
        with self._lock:
            self._worker.submit(_QueuedStage(state_dict, step, model_info, handle, start_event))
        return handle

    @property
    def stats(self) -> dict:
        """Counters since construction: ``stages`` (``stage()`` calls) and ``skipped`` (steps not
        staged because the daemon showed no sign of life within ``ack_timeout``)."""
        return dict(self._worker.stats)

    @property
    def pinned_segments(self) -> int:
        """How many of the daemon's segments are page-locked now for this rank's device copies, each
        once (0 while staging CUDA tensors: cudaHostRegister failed and their copies are synchronous)."""
        return self._worker.copier.pinned

    def restore(self, state_dict: Mapping[str, Any], *, step: int | None = None) -> int:
        """Fill ``state_dict`` in place from the sealed version ``step`` (default: the newest; with
        torch.distributed, rank 0's newest on every rank) and return the step restored. A collective:
        every rank calls it.

        Each rank writes its own tensors: DTensor local shards of any placement and plain tensors,
        nested as staged (``{"model": model.state_dict(), "optim": get_optimizer_state_dict(...,
        flatten_optimizer_state_dict=True)}``, or ``get_model_state_dict(model)``'s), reading only the box
        it holds, from whichever node holds it. The job may have another world size or parallelism than
        the one that staged. Non-tensor leaves come back as staged. Every name, shape and dtype is checked
        first: a mismatch raises BAD_VALUE naming the tensor and nothing is written. Optimizer state must
        exist (take one step, as with DCP). Then ``model.load_state_dict`` (it puts back what state-dict
        hooks made, e.g. torchtitan's split fused QKV) or ``set_model_state_dict``, and
        ``set_optimizer_state_dict``, as after ``dcp.load``.

        >>> sd = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt, options=o)}
        >>> step = client.restore(sd)  # doctest: +SKIP
        """
        from ..readers import Subscriber
        from .restore import restore_state_dict

        return restore_state_dict(state_dict, lambda: Subscriber(self.endpoint, timeout=self._timeout), step=step)

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued stages (up to ``timeout`` seconds), then release the socket and mappings."""
        if self._finalizer.alive:
            self._finalizer.detach()
            _Worker.shutdown(self._worker, self._thread, timeout)

    def __enter__(self) -> StagingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Worker:
    """Runs on the client's background thread and orchestrates one step at a time.

    It owns the queue of stages, the wake-up event and the run loop; the work itself is done by the
    parts, each owning its own state: :class:`Planner` (state dict -> typed plan + digest),
    :class:`Sender` (Begin / Put / Commit / Abort), :class:`SegmentWriter` (mappings,
    destination views, pre-faulting, copies) and :class:`SealTracker` (pending seals, pings).
    Nothing here is touched by the train thread except :meth:`submit` and ``copier.device``.
    """

    def __init__(
        self,
        conn: Connection,
        *,
        full_world: bool,
        timeout: float,
        seal_timeout: float,
        wait_ms: int,
        transport: str,
        ack_timeout: float = ACK_TIMEOUT_S,
    ):
        self.conn = conn
        self.queued: collections.deque = collections.deque()
        # Waking the worker with an Event keeps the GIL in stage(): a socket send would release
        # it inside stage(), and the woken worker would hold it for a whole switch interval.
        self._wake = threading.Event()
        self.closing = threading.Event()
        self.copier = CopyEngine()  # also reached from stage() (the trainer's device) and stats
        self.planner = Planner()
        self.sender = Sender(conn, full_world=full_world, timeout=timeout, wait_ms=wait_ms, transport=transport)
        self.writer = SegmentWriter(self.copier)
        self.replies = SealTracker(conn, seal_timeout)
        # replies that arrive while a blocking request (Begin, Put) waits for its own answer
        self.conn.on_unsolicited = self.replies.on_reply
        self.conn.on_lost = self.replies.on_lost  # a dropped connection fails its seals, wherever it is seen
        # a Begin waits for every rank of the node; while the daemon answers pings it is alive and
        # the rank keeps waiting (the daemon's step timeout fails the step naming the missing ranks)
        self.conn.patience = seal_timeout
        # ...but a begin (or hello) that the daemon does not acknowledge within ack_timeout is given
        # up on: the daemon is stopped or hung, and the trainer must not wait on it (see _check_alive)
        self.conn.ack_timeout = self.ack_timeout = ack_timeout
        self.stats = {"stages": 0, "skipped": 0}  # read by the train thread (StagingClient.stats)
        self.skipping = 0  # steps skipped since the daemon last answered a begin
        self._grace = True  # the first stage after the daemon went silent may wait briefly for it
        # (step, reason): the newest step this rank gave up on before the daemon heard of it. The
        # daemon is told (Abort) once it can be, so the other ranks' begins of that step fail at once
        # instead of waiting for this rank: e.g. a rank whose reconnect after a daemon restart came a
        # step later than another's, now blocked in a collective waiting for that other rank.
        self.owed_abort: tuple[int, str] | None = None

    # ------------------------------------------------------------------ thread entry

    def submit(self, stage: _QueuedStage) -> None:  # called on the train thread, under the client's lock
        self.queued.append(stage)
        self.stats["stages"] += 1
        self._wake.set()

    @staticmethod
    def shutdown(worker: _Worker, thread: threading.Thread, timeout: float) -> None:
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
                    if (not self.queued and not self.replies.pending) or time.monotonic() >= close_deadline:
                        break
                self._tick()
            except Exception:  # the staging thread must outlive any single failure
                log.exception("stager client thread: unexpected error")
                time.sleep(0.05)
        self._close()

    def _tick(self) -> None:
        if not self.queued:
            if self.replies.awaiting:
                self.conn.poll(2)  # replies due: watch the socket, and the queue every 2 ms
            elif self.writer.upcoming:
                if not self.writer.premap_one(PREFAULT_CHUNK, time.monotonic()):
                    self._wake.wait(0.02)  # the segment is not there yet; a stage() cuts the wait short
            else:
                self._wake.wait(0.1)
        self._wake.clear()
        self.replies.check_connection()
        while True:
            reply = self.conn.recv(0)
            if reply is None:
                break
            self.replies.on_reply(reply)
        if self.queued:
            self._process(self.queued.popleft())
        elif self.owed_abort is not None and self.conn.connected and self.conn.silent_since is None:
            self._settle_abort()
        now = time.monotonic()
        self.replies.maintain(now, keepalive_s=KEEPALIVE_S, ping_timeout_s=PING_TIMEOUT_S)
        self.conn.probe()  # a silent daemon is pinged: its answer ends the silence

    def _close(self) -> None:
        while self.queued:
            self.queued.popleft().handle.fail(StagerError(ErrorCode.UNAVAILABLE, "the client was closed"))
        self.replies.fail_all(ErrorCode.UNAVAILABLE, "the client was closed before the step was sealed")
        self.writer.close()
        self.conn.close()

    # ------------------------------------------------------------------ one step

    def _process(self, stage: _QueuedStage) -> None:
        handle, began = stage.handle, False
        try:
            plan = self.planner.plan(stage.state_dict)
            self._check_alive(stage.submitted)
            shm = self.sender.connect()
            if self.owed_abort is not None:
                self._settle_abort()
            reply = self.sender.begin(stage.step, plan.entries, plan.digest, shm)
            began = True
            self._resumed(stage.step)
            assignment = self.sender.assignment(reply, len(plan.entries))
            if shm:
                dsts = self.writer.destinations(reply, plan.entries, assignment, time.monotonic())
                events = self.writer.copy(dsts, plan.locals, stage.start_event)
                handle.copied(events)
                for event in events:
                    event.synchronize()  # bytes must be in the segment before the commit
            else:
                self.sender.put(stage.step, assignment, plan.locals, PUT_BATCH_BYTES)
                handle.copied()
            rid = self.sender.commit(stage.step, plan.objects, stage.model_info, plan.quant)
            self.replies.add(rid, handle, time.monotonic())
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, StagerError)
                else StagerError(
                    ErrorCode.INTERNAL, f"staging step {stage.step} failed: {exc.__class__.__name__}: {exc}"
                )
            )
            if not isinstance(exc, StagerError):
                log.exception("staging step %d failed", stage.step)
            if began and not isinstance(exc, RemoteError):  # a remote error: the daemon dropped the step itself
                self.sender.abort(stage.step, str(error))
            elif not began and not (isinstance(exc, RemoteError) and exc.code in _DAEMON_KNOWS):
                # the daemon may not know this rank gave up: the other ranks' begins would wait for ours
                self.owed_abort = (stage.step, f"its stage of the step failed before its begin was answered: {error}")
                if self.conn.session is not None and self.conn.connected and self.conn.silent_since is None:
                    self._settle_abort()
            if error.code == ErrorCode.NO_SIGN_OF_LIFE:
                self._skip(handle, error)
            else:
                report(handle, error)

    def _check_alive(self, submitted: float) -> None:
        """Raise NO_SIGN_OF_LIFE while the daemon is silent (a request went unanswered, and nothing
        came from it since): the stage is skipped without waiting. The first stage of a silence
        may wait a moment (as a hello on a fresh socket does) for the daemon to answer a ping, but
        never past ``ack_timeout`` after its stage() (a stage queued behind the one that found the
        silence has waited already)."""
        conn = self.conn
        if conn.silent_since is not None:
            left = self.ack_timeout - (time.monotonic() - submitted)
            grace = max(0.0, min(HELLO_WAIT_S, left)) if self._grace else 0.0
            self._grace = False
            if not conn.await_life(grace):
                raise StagerError(
                    ErrorCode.NO_SIGN_OF_LIFE,
                    (
                        f"no sign of life from the daemon at {conn.endpoint} for "
                        f"{time.monotonic() - conn.silent_since:.1f}s: it is stopped (SIGSTOP), hung or gone "
                        "(see `stager status`)"
                    ),
                )
        self._grace = True

    def _skip(self, handle: StageHandle, error: StagerError) -> None:
        """The step is not staged: the daemon showed no sign of life. Said once per silence."""
        self.stats["skipped"] += 1
        self.skipping += 1
        error = StagerError(
            ErrorCode.NO_SIGN_OF_LIFE,
            (
                f"step {handle.step} skipped for staging: {error.message}; training goes on and the next stage() tries "
                f"again (a daemon only slower than this: StagingClient(ack_timeout=...) or {ACK_TIMEOUT_ENV})"
            ),
        )
        if self.skipping == 1:
            log.warning("%s [said once until the daemon answers again]", error.message)
        else:  # the same silence: the first warning said it
            log.debug("%s", error.message)
        handle.fail(error)

    def _resumed(self, step: int) -> None:
        if self.skipping:
            log.warning(
                "the daemon at %s answers again: staging resumed at step %d, after %d steps skipped",
                self.conn.endpoint,
                step,
                self.skipping,
            )
            self.skipping = 0

    def _settle_abort(self) -> None:
        """Tell the daemon about the step this rank gave up on (see ``owed_abort``); says hello
        first when needed. Kept for later when the daemon cannot be reached now."""
        step, reason = self.owed_abort
        try:
            self.sender.connect()
            self.conn.send(Abort(step=step, reason=reason[:500]))
        except RemoteError:
            self.owed_abort = None  # the daemon refused this rank (e.g. rank conflict): nothing to settle
        except StagerError:
            return  # not reachable now: on reconnect, or before the next begin
        else:
            self.owed_abort = None
