"""The full assembler's thread (``serve --assemble-full``): a reader of the node's multi-node job
that copies each newly complete version, whole, into a segment the daemon provides.

The daemon's half (memory, the swap of the partial version for the whole one) is
:class:`stager.daemon.whole_versions.FullAssembly`; this half reads like any consumer (its own node's
regions through shared memory, the others' as frames) and reaches the daemon's loop only through
``call``, so neither the loop nor the trainer ever waits for another node.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from stager.client import Subscriber
from stager.protocol import ErrorCode, StagerError
from stager.protocol.dtypes import dtype_name
from stager.protocol.shm import block_view

log = logging.getLogger("stager.daemon")


class Assembler:
    """Copies each newly complete version of the job into a segment ``assembly`` (the daemon's
    :class:`~stager.daemon.whole_versions.FullAssembly`) provides. ``call(fn)`` runs ``fn`` on the
    daemon's socket loop and returns its result (``Daemon.call``).

    >>> daemon.attach(Assembler(daemon.endpoint, daemon.call, daemon.assembly))  # doctest: +SKIP
    """

    def __init__(self, endpoint: str, call: Callable[[Callable[[], Any]], Any], assembly: Any, *,
                 timeout: float = 30.0):
        self.endpoint, self.call, self.assembly, self.timeout = endpoint, call, assembly, timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stager-assembler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)  # a daemon thread: a read it is blocked in cannot delay the exit

    def _run(self) -> None:
        done = None  # the newest step tried: each complete version is assembled once
        sub = None
        while not self._stop.is_set():
            try:
                if sub is None:
                    sub = Subscriber(self.endpoint, view="native", keep_fp8=True, timeout=self.timeout)
                # (a partial version makes the subscriber ask its daemon for the job again, so a
                # job joined after the assembler started is found)
                snap = sub.wait_for_newer(done, timeout=1.0)
                done = snap.step
                with snap:
                    if snap.placement() is not None:  # a multi-node job's version (else nothing to pull)
                        self._assemble(snap)
            except StagerError as exc:
                if exc.code == ErrorCode.TIMEOUT:
                    done = self._restarted_below(done)
                else:
                    log.info("full assembly: %s", exc)
                    self._stop.wait(1.0)
            except Exception:  # never the daemon's end: log it and try the next version
                log.exception("full assembly failed")
                if sub is not None:
                    sub.close()
                sub = None
                self._stop.wait(1.0)
        if sub is not None:
            sub.close()

    def _restarted_below(self, done: int | None) -> int | None:
        """``done``, or lower when the job restarted (or a new one began) and stages steps from a
        lower number again: its partial versions are all at or below the newest step tried."""
        try:
            pending = self.call(self.assembly.pending)
        except (StagerError, TimeoutError):  # the daemon is shutting down (or its loop is stuck)
            return done
        if pending and done is not None and pending[-1] <= done:
            return pending[0] - 1
        return done

    def _assemble(self, snap) -> None:
        specs = [(name, dtype_name(dt), tuple(shape)) for name, dt, shape in snap.specs()]
        plan = self.call(lambda: self.assembly.begin(snap.step, snap.lease, specs))
        if isinstance(plan, str):
            log.debug("full assembly skipped: %s", plan)
            return
        version, record, seg, name = plan
        if seg is None:
            try:
                seg = self.assembly.create_segment(name, record.layout.size)  # off the loop: a while
            except BaseException:
                self.call(lambda: self.assembly.unreserve(record))
                raise
            try:
                self.call(lambda: self.assembly.adopt(record, seg))
            except BaseException:  # the daemon is closing: no segment outlives it
                seg.unlink()
                raise
        ok = False
        try:
            data = seg.as_bytes()
            targets = {t.fqn: block_view(data, t.torch_dtype, t.blocks[0].byte_offset, t.shape)
                       for t in record.layout.tensors}
            snap.load_into(targets)
            ok = True
        finally:
            self.call(lambda: self.assembly.finish(version, record, seg, ok))
