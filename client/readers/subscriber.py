"""Reading sealed versions: ``Subscriber().latest()``, ``wait_for_newer``, iteration, ``get``.

The daemon pushes an announcement per sealed version to subscribers (no polling); a reader
that falls behind skips to the newest version and sees how many it skipped. Same-host readers
map the daemon's shared memory (zero-copy); readers on another host get the bytes as ZeroMQ
frames, tensor by tensor. Both get the same API. A version is regions held by N >= 1 nodes: one
daemon is a one-member job; when the daemon belongs to a job spanning nodes, the reader sees only
versions every node sealed, each tensor whole (``.job``). Every read goes through the job reader
(:mod:`.job_reader`), which alone talks to the daemons.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from stager.protocol import ErrorCode, StagerError
from stager.protocol.dtypes import parse_dtype

from ..adapters import IdentityAdapter
from .fp8_view import Fp8Snapshot, check_quantize
from .job_reader import JobReader
from .snapshot import Snapshot, view_entries

log = logging.getLogger("stager.client")


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
    daemon is on another host). ``node`` and ``auth_dir``: this reader's host id and CURVE client
    keys, where they are not ``$STAGER_HOST_ID`` / the machine's and ``$STAGER_AUTH_DIR``.
    ``transport``: how bytes from another host come: ``"auto"`` over NIXL where this
    process has it and the daemon serves it (``stager serve --transport nixl``), else as frames;
    ``"nixl"``: NIXL or an UNSUPPORTED error; ``"frames"``: always frames. ``nixl_agent``: a
    :class:`~stager.client.readers.nixl_source.HeldAgent` to READ with (the daemon's own, for its
    full assembler; destinations must lie in memory registered with it) instead of this process's.

    >>> sub = Subscriber(view="hf", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> for snap in sub:                                    # every new version, skipping stale ones
    ...     engine.load_weights(snap.items())
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        view: str = "native",
        dtype: torch.dtype | str | None = None,
        names: Iterable[str] | None = None,
        adapter: str | Any | None = None,
        hf_config: dict | None = None,
        prefix: str | None = None,
        keep_fp8: bool = False,
        remote: bool | None = None,
        timeout: float = 10.0,
        quantize: str | None = None,
        node: str | None = None,
        auth_dir: str | None = None,
        transport: str = "auto",
        nixl_agent=None,
    ):
        if view not in ("native", "hf"):
            raise ValueError(f"view must be 'native' or 'hf', not {view!r}")
        if dtype is not None:
            dtype = parse_dtype(dtype)
        check_quantize(quantize, view, dtype, keep_fp8)
        self.quantize = quantize
        self.view = view
        self.dtype = dtype
        self.keep_fp8 = keep_fp8
        self.timeout = timeout
        self.names = set(names) if names is not None else None
        self._adapter_spec = adapter
        self._hf_config = hf_config
        self._prefix = prefix
        self._adapters: dict = {}
        self._view_config: dict | None = None
        self._index_cache: dict = {}
        self._reader = JobReader(
            endpoint, timeout, remote=remote, node=node, auth_dir=auth_dir, transport=transport, nixl_agent=nixl_agent
        )
        # the finalizer holds the job reader, never this subscriber: an unclosed one is collected, then disconnected
        self._finalizer = weakref.finalize(self, self._reader.close)

    # ------------------------------------------------------------------ versions

    def latest(self, *, allow_partial: bool = False) -> Snapshot:
        """Lease the newest sealed version (NO_VERSION when there is none yet)."""
        return self._acquire(None, allow_partial)

    def at(self, step: int, *, allow_partial: bool = False) -> Snapshot:
        """Lease the sealed version of ``step``."""
        return self._acquire(step, allow_partial)

    def wait_for_newer(
        self, step: int | None, timeout: float | None = None, *, allow_partial: bool = False
    ) -> Snapshot:
        """Lease the newest version once one newer than ``step`` (None: any) is sealed; waits for
        the daemon's announcement, raising TIMEOUT after ``timeout`` seconds (None: forever). In a
        multi-node job: once every node announced a newer step, and one is complete."""
        deadline = None if timeout is None else time.monotonic() + timeout
        floor = -1 if step is None else step
        reader, tried = self._reader, None  # tried: the announcements an acquire gave nothing newer for
        while True:
            reader.refresh()  # a restarted daemon may have left or joined a job
            reader.subscribe()
            hint = reader.newest_complete_hint()
            if hint is not None and hint > floor and reader.newest != tried:
                try:
                    snap = self._acquire(None, allow_partial)
                except StagerError as exc:
                    if exc.code not in (ErrorCode.NO_VERSION, ErrorCode.NODE_DOWN):
                        raise
                else:
                    if snap.step > floor:
                        return snap
                    snap.release()  # the announced version went (the job rolled back): wait on
                tried = dict(reader.newest)  # nothing newer is complete yet: wait for the next announcement
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                if reader.multi:
                    raise StagerError(
                        ErrorCode.TIMEOUT,
                        f"no version newer than step {floor} was completed by every "
                        f"node of job {reader.job} within {timeout:.1f}s",
                    )
                raise StagerError(
                    ErrorCode.TIMEOUT, f"no version newer than step {step} was sealed within {timeout:.1f}s"
                )
            reader.wait(1.0 if left is None else min(left, 1.0))

    @property
    def job(self) -> dict | None:
        """The multi-node job the daemon belongs to (``{"job", "node", "nodes"}``), None if none."""
        self._reader.members()
        reader = self._reader
        return {"job": reader.job, "node": reader.node, "nodes": dict(reader.nodes)} if reader.multi else None

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
                out[name] = t.clone() if snap.is_zero_copy(t) else t
            return out

    # ------------------------------------------------------------------ internals

    def _adapter(self, model_info: dict | None) -> Any:
        """The HF view's adapter for a version: this subscriber's ``adapter`` / ``hf_config``, else
        the staged model_info's (built-in names and dict configs only), one object per choice
        (the view index is cached per adapter)."""
        if self.view == "native":
            return None
        from ..adapters import resolve_adapter

        info = model_info if isinstance(model_info, dict) else {}
        spec = (
            self._adapter_spec
            if isinstance(self._adapter_spec, str) or self._adapter_spec is None
            else id(self._adapter_spec)
        )
        key = repr(
            (spec, self._hf_config, self._prefix, info.get("adapter"), info.get("hf_config"), info.get("prefix"))
        )
        if key not in self._adapters:
            resolved = resolve_adapter(self._adapter_spec, self._hf_config, info, prefix=self._prefix)
            self._adapters.clear()
            self._adapters[key] = resolved.adapter
            self._view_config = resolved.hf_config  # of the one adapter cached: its FP8 block and skips
        return self._adapters[key]

    def _acquire(self, step: int | None, allow_partial: bool) -> Snapshot:
        version = self._reader.acquire(step, allow_partial)
        try:
            adapter = self._adapter(version.model_info)
            if self.keep_fp8 and version.quant and adapter is not None and not isinstance(adapter, IdentityAdapter):
                raise StagerError(
                    ErrorCode.BAD_VALUE,
                    "keep_fp8=True with view='hf' cannot rename or permute float8 "
                    "scales; read view='native', or let the subscriber dequantize",
                )
            entries = view_entries(version.layouts(), version.quant, adapter, self.keep_fp8, self._index_cache)
            if self.quantize is None:
                return Snapshot(self, version, entries, adapter, self.names)
            return Fp8Snapshot(self, version, entries, adapter, self.names, self._view_config, self._index_cache)
        except BaseException:
            version.close()
            raise

    def close(self) -> None:
        """Release the leases still held, then disconnect (the daemon also ends them on bye)."""
        self._reader.release_all()
        self._finalizer()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
