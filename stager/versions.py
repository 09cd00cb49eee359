"""Versions, segments and the memory budget: the daemon's bookkeeping, free of sockets.

Lifecycle of a version: ``staging`` (ranks are writing into its segment) -> ``sealed``
(immutable, served) or ``failed``. Only sealed versions are ever visible to readers.

Memory policy (the budget is ``--memory-limit``; every segment that exists counts, pooled ones too):
1. reuse a pooled segment of the same layout;
2. else create one if it fits;
3. else free pooled segments of other layouts, then evict the oldest unleased sealed versions,
   but never the newest sealed one;
4. else the begin waits up to the client's ``wait_ms`` for a lease to end or a step to finish
   (back-pressure), and is refused with ``MEMORY_LIMIT`` after that.
A failed step's segment is unlinked, never pooled: a slow rank may still be writing into it.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from stager.planning import NodeLayout
from stager.protocol import ErrorCode, StagerError
from stager.shm import Segment

log = logging.getLogger("stager.daemon")


@dataclasses.dataclass(eq=False)
class Pending:
    """A request whose reply is deferred: who asked, and the request id to answer."""

    peer: bytes
    rid: int


@dataclasses.dataclass(eq=False)
class Version:
    step: int
    epoch: int
    started: float = dataclasses.field(default_factory=time.monotonic)
    state: str = "staging"  # staging | sealed | failed
    record: Any = None  # the LayoutRecord this version was built with (kept even if the daemon forgets it)
    layout_id: str | None = None
    layout: NodeLayout | None = None
    entries: dict[int, list] = dataclasses.field(default_factory=dict)  # rank -> its plan entries at begin
    segment: Segment | None = None
    digests: dict[int, str] = dataclasses.field(default_factory=dict)  # rank -> layout digest at begin
    shm_ranks: set[int] = dataclasses.field(default_factory=set)
    committed: set[int] = dataclasses.field(default_factory=set)
    put: dict[int, set[int]] = dataclasses.field(default_factory=dict)  # rank -> plan indices received
    waiting_begin: dict[int, Pending] = dataclasses.field(default_factory=dict)
    waiting_commit: dict[int, Pending] = dataclasses.field(default_factory=dict)
    full_world: bool = True  # False once a rank says the job spans nodes: gaps become "partial"
    wait_ms: int = 0  # the longest back-pressure wait any rank allows
    wait_deadline: float | None = None  # set while the begin waits for memory
    objects: dict = dataclasses.field(default_factory=dict)
    objects_rank: int | None = None
    model_info: dict | None = None
    quant: dict = dataclasses.field(default_factory=dict)  # float8 fqn -> scale spec (wire form)
    seq: int = 0  # the daemon's count of sealed versions when this one sealed
    leases: set[int] = dataclasses.field(default_factory=set)
    sealed_at: float | None = None
    reason: str = ""

    def summary(self) -> dict:
        layout = self.layout
        out = {
            "step": self.step,
            "state": self.state,
            "bytes": layout.nbytes if layout else 0,
            "tensors": len(layout.tensors) if layout else 0,
            "objects": len(self.objects),
            "partial": bool(layout and layout.partial),
            "leases": len(self.leases),
        }
        if layout and layout.partial:
            out["held_regions"] = layout.held_regions()
        if self.reason:
            out["reason"] = self.reason
        return out


PENDING = object()  # take(): a segment is being created; try again when collect() finished one


class SegmentBudget:
    """Creates, pools and unlinks segments within ``limit`` bytes.

    ``prefill`` creates a layout's remaining pool segments on a background thread
    (``posix_fallocate`` releases the GIL), so steady-state steps never wait for allocation
    and ranks can map and pre-fault them before they are needed. Pending segments count
    against the limit from the moment they are requested.
    """

    def __init__(self, limit: int, make: Callable[[str, int], Segment], new_name: Callable[[], str]):
        self.limit = limit
        self._make, self._new_name = make, new_name
        self.used = 0
        self.current_layout: str | None = None  # pooled segments of other layouts are dropped
        self.pool: dict[str, list[Segment]] = {}  # layout id -> free segments of that layout
        self.owner: dict[str, tuple[str, Segment]] = {}  # segment name -> (layout id, segment)
        self.pending: dict[str, tuple[str, int]] = {}  # name -> (layout id, size), being created
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- background creation

    def _factory(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            name, size = item
            try:
                started = time.monotonic()
                seg = self._make(name, size)
                log.debug("created %s (%.0f MiB) in %.0f ms", name, size / 2**20, (time.monotonic() - started) * 1e3)
                self._done.put((name, seg))
            except Exception as exc:  # reported by collect(); the budget is given back there
                self._done.put((name, exc))

    def prefill(self, layout_id: str, size: int, target: int) -> None:
        """Have ``target`` segments of ``layout_id`` (pooled, in use or pending), as far as the limit allows."""
        have = sum(1 for lid, _ in self.owner.values() if lid == layout_id)
        have += sum(1 for lid, _ in self.pending.values() if lid == layout_id)
        while have < target and self.used + size <= self.limit:
            if self._thread is None:
                self._thread = threading.Thread(target=self._factory, name="stager-segments", daemon=True)
                self._thread.start()
            name = self._new_name()
            self.used += size
            self.pending[name] = (layout_id, size)
            self._requests.put((name, size))
            have += 1

    def collect(self, block_for: str | None = None, timeout: float = 120.0) -> int:
        """Move finished background segments into the pool and return how many finished; with
        ``block_for`` (only at shutdown), wait until none of that layout (or any, for ``"*"``) is pending."""
        finished = 0
        while self.pending:
            waiting = block_for is not None and any(
                block_for in ("*", lid) for lid, _ in self.pending.values())
            try:
                name, result = self._done.get(timeout=timeout) if waiting else self._done.get_nowait()
            except queue.Empty:
                break
            finished += 1
            layout_id, size = self.pending.pop(name)
            if isinstance(result, Exception):
                self.used -= size
                log.warning("could not pre-create segment %s: %s", name, result)
            elif layout_id != self.current_layout:
                self.owner[name] = (layout_id, result)
                self.destroy(result)
            else:
                self.owner[name] = (layout_id, result)
                self.pool.setdefault(layout_id, []).append(result)
        return finished

    # -------------------------------------------------------------- taking and giving back

    def take(self, layout_id: str, size: int) -> "Segment | None | object":
        """A pooled segment of ``layout_id``; else :data:`PENDING` after asking the background thread
        for one (the caller waits, the daemon keeps serving); None when over budget."""
        self.collect()
        free = self.pool.get(layout_id)
        if free:
            return free.pop()
        if size > self.limit:
            raise StagerError(
                ErrorCode.MEMORY_LIMIT,
                f"one snapshot needs {size / 2**20:.1f} MiB but the daemon's memory limit is "
                f"{self.limit / 2**20:.1f} MiB; restart the daemon with a larger --memory-limit",
            )
        if any(lid == layout_id for lid, _ in self.pending.values()):
            return PENDING
        if self.used + size > self.limit:
            self.drop_pool(except_layout=layout_id)
        if self.used + size > self.limit:
            # segments still being created for an old layout give their budget back when done
            return PENDING if self.pending else None
        self.prefill(layout_id, size, len(self.live(layout_id)) + 1)
        return PENDING

    def give_back(self, seg: Segment, *, reuse: bool) -> None:
        layout_id = self.owner.get(seg.name, (None,))[0]
        if reuse and layout_id is not None and layout_id == self.current_layout:
            self.pool.setdefault(layout_id, []).append(seg)
        else:
            self.destroy(seg)

    def destroy(self, seg: Segment) -> None:
        if self.owner.pop(seg.name, None) is not None:
            self.used -= seg.size
        seg.unlink()

    def drop_pool(self, except_layout: str | None = None) -> None:
        for layout_id in list(self.pool):
            if layout_id != except_layout:
                for seg in self.pool.pop(layout_id):
                    self.destroy(seg)

    def live(self, layout_id: str) -> list[str]:
        """Names of the layout's segments: pooled, in use, and still being created."""
        return [name for name, (owner, _) in self.owner.items() if owner == layout_id] + [
            name for name, (owner, _) in self.pending.items() if owner == layout_id]

    def close(self) -> None:
        """Unlink every segment (daemon shutdown), waiting for those being created."""
        if self._thread is not None:
            self._requests.put(None)
            self.current_layout = None
            self.collect(block_for="*", timeout=60.0)
            self._thread.join(60.0)
        for _, seg in list(self.owner.values()):
            self.destroy(seg)
        self.pool.clear()


def evictable(sealed: "OrderedDict[int, Version]", keep: int) -> list[Version]:
    """Sealed versions retention would drop now: beyond the newest ``keep``, unleased, oldest first."""
    steps = list(sealed)
    extra = steps[:-keep] if len(steps) > keep else []
    return [sealed[s] for s in extra if not sealed[s].leases]


def reclaim_candidates(sealed: "OrderedDict[int, Version]") -> list[Version]:
    """Unleased sealed versions that may go to make room, oldest first, never the newest."""
    steps = list(sealed)[:-1]
    return [sealed[s] for s in steps if not sealed[s].leases]
