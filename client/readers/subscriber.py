"""Reading sealed versions: ``Subscriber().latest()``, ``wait_for_newer``, iteration, ``get``.

The daemon pushes an announcement per sealed version to subscribers (no polling); a reader
that falls behind skips to the newest version and sees how many it skipped. Same-host readers
map the daemon's shared memory (zero-copy); readers on another host get the bytes as ZeroMQ
frames, tensor by tensor. Both get the same API. When the daemon belongs to a job spanning
nodes, the reader sees only versions every node sealed, each tensor whole (``.job``).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch

from stager.protocol import (
    Acquire, AcquireReply, Announce, ErrorCode, Release, StagerError, Subscribe, SubscribeReply,
)
from stager.protocol.dtypes import parse_dtype
from stager.protocol.job import JobInfo, JobInfoReply
from stager.protocol.shm import SHM_DIR, map_segment

from ..adapters import IdentityAdapter
from ..connection import Connection
from .fp8_view import Fp8Snapshot, check_quantize
from .job import JobReader, MembershipChanged
from .snapshot import Snapshot, view_entries
from .sources import LocalSource, RemoteSource

log = logging.getLogger("stager.client")

__all__ = ["Subscriber", "Snapshot"]


class Subscriber:
    """Reads sealed versions from the node's daemon.

    ``view``: ``"native"`` (the trainer's names) or ``"hf"`` (through the HF adapter named in the
    staged ``model_info``, or ``adapter`` / ``hf_config`` given here; ``prefix``, else the staged
    ``model_info["prefix"]``: only the tensors under it, e.g. ``"model."``, are the model). ``dtype``: cast floating
    tensors (and dequantize float8 ones) to it. ``names``: only these tensors (names of the view).
    ``keep_fp8``: serve float8 data and its scale as staged instead of dequantizing. ``quantize="fp8-block"``
    (HF view): the weights an FP8 checkpoint of the architecture quantizes come as e4m3 ``<module>.weight``
    plus fp32 ``<module>.weight_scale_inv`` (:mod:`.fp8_view`).
    ``remote``: fetch bytes over the socket even on the daemon's host (default: only when the
    daemon is on another host).

    >>> sub = Subscriber(view="hf", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> for snap in sub:                                    # every new version, skipping stale ones
    ...     engine.load_weights(snap.items())
    """

    def __init__(self, endpoint: str | None = None, *, view: str = "native", dtype: torch.dtype | str | None = None,
                 names: Iterable[str] | None = None, adapter: str | Any | None = None,
                 hf_config: dict | None = None, prefix: str | None = None, keep_fp8: bool = False,
                 remote: bool | None = None, timeout: float = 10.0, quantize: str | None = None):
        if view not in ("native", "hf"):
            raise ValueError(f"view must be 'native' or 'hf', not {view!r}")
        if dtype is not None:
            dtype = parse_dtype(dtype)
        check_quantize(quantize, view, dtype, keep_fp8)
        self.quantize = quantize
        self.view, self.dtype, self.keep_fp8, self.timeout = view, dtype, keep_fp8, timeout
        self.names = set(names) if names is not None else None
        self._adapter_spec, self._hf_config, self._prefix, self._remote = adapter, hf_config, prefix, remote
        self._adapters: dict = {}
        self._view_config: dict | None = None
        self._index_cache: dict = {}
        self._conn = Connection(endpoint, role="reader")
        # weakly: the finalizer holds the connection, and a connection that held this subscriber
        # would keep an unclosed one alive, never finalized, its socket open, until the process ends
        self._conn.on_unsolicited = _weakly(self._on_unsolicited)
        self._segments: dict[str, torch.Tensor] = {}
        self._leases: set[int] = set()
        self._subscribed: tuple | None = None  # the connection's registration the subscription was made in
        self._known: tuple[int, int] | None = None  # newest sealed (seq, step) this subscriber heard of
        self._links: dict[str, JobReader] = {}  # "job": the daemon's multi-node job, once asked in a session
        self._job_session: str | None = None
        self._job_tried: int | None = None  # job step hint an acquire last gave nothing newer for
        self._finalizer = weakref.finalize(self, _close, self._conn, self._links)

    # ------------------------------------------------------------------ versions

    def latest(self, *, allow_partial: bool = False) -> Snapshot:
        """Lease the newest sealed version (NO_VERSION when there is none yet)."""
        return self._acquire(None, allow_partial)

    def at(self, step: int, *, allow_partial: bool = False) -> Snapshot:
        """Lease the sealed version of ``step``."""
        return self._acquire(step, allow_partial)

    def wait_for_newer(self, step: int | None, timeout: float | None = None, *, allow_partial: bool = False) -> Snapshot:
        """Lease the newest version once one newer than ``step`` (None: any) is sealed; waits for
        the daemon's announcement, raising TIMEOUT after ``timeout`` seconds (None: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        floor = -1 if step is None else step
        if self._job_or_none() is not None:
            return self._wait_for_newer_in_job(floor, deadline, timeout, allow_partial)
        self._subscribe()
        while True:
            if self._known is not None and self._known[1] > floor:
                try:
                    snap = self._acquire(None, allow_partial)
                except StagerError as exc:
                    if exc.code != ErrorCode.NO_VERSION:
                        raise
                else:
                    if snap.step > floor:
                        return snap
                    snap.release()  # the announced version went (job rolled back): wait on
                self._known = None
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise StagerError(ErrorCode.TIMEOUT, f"no version newer than step {step} was sealed within "
                                                     f"{timeout:.1f}s")
            wait = 1.0 if left is None else min(left, 1.0)
            msg = self._conn.recv(wait)
            if msg is not None:
                self._on_unsolicited(msg)
            elif not self._conn.poll_monitor(0) or self._conn.registration != self._subscribed:
                self._subscribe()  # the daemon restarted or ended the session: subscribe again (a no-op while down)
                if self._conn.session is not None and self._job_or_none() is not None:
                    return self._wait_for_newer_in_job(floor, deadline, timeout, allow_partial)

    def _wait_for_newer_in_job(self, floor: int, deadline: float | None, timeout: float | None,
                               allow_partial: bool) -> Snapshot:
        """wait_for_newer for a multi-node job: woken by every node's announcements, leasing once
        each node announced a step newer than ``floor`` (the job's complete step may still be older:
        then wait for the next announcement)."""
        while True:
            job = self._job_or_none()
            if job is None:  # the daemon left the job (restarted): the single-node wait
                return self.wait_for_newer(floor if floor >= 0 else None,
                                           None if deadline is None else max(0.0, deadline - time.monotonic()),
                                           allow_partial=allow_partial)
            job.subscribe()
            hint = job.newest_complete_hint()
            if hint is not None and hint > floor and hint != self._job_tried:
                try:
                    snap = self._acquire(None, allow_partial)
                except StagerError as exc:
                    if exc.code not in (ErrorCode.NO_VERSION, ErrorCode.NODE_DOWN):
                        raise
                else:
                    if snap.step > floor:
                        return snap
                    snap.release()
                self._job_tried = hint  # nothing newer is complete yet: wait for the next announcement
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise StagerError(ErrorCode.TIMEOUT, f"no version newer than step {floor} was completed by every "
                                                     f"node of job {job.job} within {timeout:.1f}s")
            job.wait(1.0 if left is None else min(left, 1.0))

    @property
    def job(self) -> dict | None:
        """The multi-node job the daemon belongs to (``{"job", "node", "nodes"}``), None if none."""
        job = self._job_reader()
        return None if job is None else {"job": job.job, "node": job.node, "nodes": dict(job.nodes)}

    def __iter__(self) -> Iterator[Snapshot]:
        """Each new version as it is sealed; the previous one is released when the next is asked
        for. ``snap.skipped`` counts versions sealed in between that this reader never saw."""
        last: Snapshot | None = None
        while True:
            snap = self.wait_for_newer(last.step if last else None, allow_partial=True)
            if last is not None:
                snap.skipped = max(0, snap.seq - last.seq - 1)
                last.release()
            last = snap
            yield snap

    # ------------------------------------------------------------------ parameter-server reads

    def get(self, name: str, step: int | None = None, **slice_: Any) -> torch.Tensor:
        """One tensor of version ``step`` (default: the newest), copied out of the lease; accepts
        :meth:`Snapshot.get`'s ``shard`` or ``offsets``/``sizes``."""
        return self.get_many([name], step, **slice_)[name]

    def get_many(self, names: Iterable[str], step: int | None = None, **slice_: Any) -> dict[str, torch.Tensor]:
        """Several tensors of one version (consistent: all from the same step), copied out."""
        with self._acquire(step, False) as snap:
            out = {}
            for name in names:
                t = snap.get(name, **slice_)
                out[name] = t.clone() if _shares_segment(t, self._segments) else t
            return out

    # ------------------------------------------------------------------ internals

    def _subscribe(self) -> None:
        if self._subscribed is not None and self._subscribed == self._conn.registration:
            return
        try:
            reply = self._conn.request(Subscribe(), self.timeout)
        except StagerError as exc:
            if exc.code in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT):
                return  # daemon down: the wait loop tries again
            raise
        if not isinstance(reply, SubscribeReply):
            raise StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {reply.TYPE} reply to subscribe")
        self._subscribed = self._conn.registration
        self._known = (reply.seq, reply.step) if reply.step is not None else None

    def _on_unsolicited(self, msg) -> None:
        if isinstance(msg, Announce):
            if self._known is None or msg.seq > self._known[0]:
                self._known = (msg.seq, msg.step)
        else:
            log.debug("stray reply %r", msg)

    def _adapter(self, model_info: dict | None) -> Any:
        """The HF view's adapter for a version: this subscriber's ``adapter`` / ``hf_config``, else
        the staged model_info's (built-in names and dict configs only), one object per choice
        (the view index is cached per adapter)."""
        if self.view == "native":
            return None
        from ..adapters import resolve_adapter

        info = model_info if isinstance(model_info, dict) else {}
        spec = self._adapter_spec if isinstance(self._adapter_spec, str) or self._adapter_spec is None \
            else id(self._adapter_spec)
        key = repr((spec, self._hf_config, self._prefix, info.get("adapter"), info.get("hf_config"),
                    info.get("prefix")))
        if key not in self._adapters:
            resolved = resolve_adapter(self._adapter_spec, self._hf_config, info, prefix=self._prefix)
            self._adapters.clear()
            self._adapters[key] = resolved.adapter
            self._view_config = resolved.hf_config  # of the one adapter cached: its FP8 block and skips
        return self._adapters[key]

    def _job_reader(self) -> JobReader | None:
        """The daemon's multi-node job (asked once per daemon session), None when it is in none."""
        job = self._links.get("job")
        if self._conn.session is not None and self._job_session == self._conn.session:
            return job
        info = self._conn.request(JobInfo(), self.timeout)
        if not isinstance(info, JobInfoReply):
            raise StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {info.TYPE} reply to job_info")
        self._job_session = self._conn.session
        if job is not None and not (info.job and job.same_membership(info)):
            self._links.pop("job").close()
            job = None
        if info.job and len(info.nodes) > 1 and job is None:
            job = self._links["job"] = JobReader(self._conn, info, self.timeout, _weakly(self._source))
        return job

    def _job_or_none(self) -> JobReader | None:
        """:meth:`_job_reader`, or while the daemon does not answer, the job known before (None)."""
        try:
            return self._job_reader()
        except StagerError as exc:
            if exc.code not in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT):
                raise
            return self._links.get("job")

    def _acquire(self, step: int | None, allow_partial: bool, retried: bool = False) -> Snapshot:
        job = self._job_reader()
        if job is not None:
            try:
                reply, source = job.acquire(step)
            except MembershipChanged:
                if retried:
                    raise
                self._job_session = None  # ask the daemon for the job again
                return self._acquire(step, allow_partial, True)
        else:
            reply = self._conn.request(Acquire(step=step), self.timeout)
            if not isinstance(reply, AcquireReply):
                raise StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {reply.TYPE} reply to acquire")
            source = None
            if reply.partial and self._job_session is not None:  # the job may have been joined since we asked
                self._job_session = None
                if self._job_reader() is not None:
                    self._release(reply.lease)
                    return self._acquire(step, allow_partial, True)
        self._leases.add(reply.lease)
        try:
            if reply.partial and not allow_partial:
                raise StagerError(
                    ErrorCode.PARTIAL,
                    f"step {reply.step} holds only part of some tensors (the job spans nodes); pass "
                    "allow_partial=True and read them with Snapshot.regions()")
            adapter = self._adapter(reply.model_info)
            if self.keep_fp8 and reply.quant and adapter is not None and not isinstance(adapter, IdentityAdapter):
                raise StagerError(ErrorCode.BAD_VALUE, "keep_fp8=True with view='hf' cannot rename or permute float8 "
                                                       "scales; read view='native', or let the subscriber dequantize")
            entries = view_entries(reply.tensors, reply.quant, adapter, self.keep_fp8, self._index_cache)
            if self.quantize is None:
                snap = Snapshot(self, reply, source or self._source(reply), entries, adapter, self.names)
            else:
                snap = Fp8Snapshot(self, reply, source or self._source(reply), entries, adapter, self.names,
                                   self._view_config, self._index_cache)
        except BaseException:
            if source is not None:
                source.close()
            self._release(reply.lease)
            raise
        if job is None and (self._known is None or reply.seq > self._known[0]):
            self._known = (reply.seq, reply.step)
        return snap

    def _source(self, reply: AcquireReply, conn: Connection | None = None):
        """Where ``reply``'s bytes come from: the segment mapped (same host) or frames over ``conn``
        (default: this subscriber's daemon; a multi-node job's reader passes each node's)."""
        conn = conn or self._conn
        path = os.path.join(SHM_DIR, reply.segment)
        remote = self._remote if self._remote is not None else not (conn.same_host and os.path.exists(path))
        if remote:
            return RemoteSource(conn, reply.lease, reply.tensors, self.timeout)
        # mappings of segments the daemon unlinked would keep their memory alive: drop them
        for name in [n for n in self._segments if not os.path.exists(os.path.join(SHM_DIR, n))]:
            del self._segments[name]
        seg = self._segments.get(reply.segment)
        if seg is None or seg.numel() != reply.size:
            seg = self._segments[reply.segment] = map_segment(reply.segment, reply.size, writable=False)
        return LocalSource(seg, reply.tensors)

    def _release(self, lease: int) -> None:
        self._leases.discard(lease)
        try:
            self._conn.request(Release(lease=lease), self.timeout)
        except StagerError as exc:
            log.warning("release of lease %d failed: %s", lease, exc)

    def close(self) -> None:
        """Release the leases still held, then disconnect (the daemon also ends them on bye)."""
        for lease in list(self._leases):
            self._release(lease)
        self._segments.clear()
        self._finalizer()

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _weakly(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, called only while its object lives (None after)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        bound = ref()
        return None if bound is None else bound(*args)

    return call


def _close(conn: Connection, links: dict) -> None:
    for link in links.values():
        link.close()
    links.clear()
    conn.close()


def _shares_segment(t: torch.Tensor, segments: dict[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(s.untyped_storage().data_ptr() == ptr for s in segments.values())
