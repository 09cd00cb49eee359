"""Memory: the segment budget and the retention policy, within ``--memory-limit``.

Every segment that exists counts against the limit, pooled ones too:
1. reuse a pooled segment of the same layout;
2. else create one if it fits;
3. else free pooled segments of other layouts, then evict the oldest unleased sealed versions,
   but never the newest sealed one;
4. else the step waits up to the client's ``wait_ms`` for a lease to end or a step to finish
   (back-pressure), and is refused with ``MEMORY_LIMIT`` after that.
A failed step's segment is unlinked, never pooled: a slow rank may still be writing into it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from stager.protocol import ErrorCode, StagerError

from .segments import Segment
from .status import MemoryStatus, RetentionStatus
from .versions import Version

if TYPE_CHECKING:
    from .nixl_agent import SegmentRegistry

log = logging.getLogger("stager.daemon")

RETENTION_POLICY = (
    "keep the newest --keep sealed versions; a leased version is never freed while leased; when a new "
    "step needs memory, drop unleased versions oldest first (never the newest), then make the step wait "
    "up to the trainer's backpressure_timeout, then refuse it with MEMORY_LIMIT"
)


PENDING = object()  # take(): a segment is being created; try again when collect() finished one


class SegmentBudget:
    """Creates, pools and unlinks segments within ``limit`` bytes.

    ``prefill`` creates a layout's remaining pool segments on a background thread
    (``posix_fallocate`` releases the GIL), so steady-state steps never wait for allocation
    and ranks can map and pre-fault them before they are needed. Pending segments count
    against the limit from the moment they are requested.

    ``preallocate`` allocates memory ahead on the same thread (``--preallocate``): the first new
    segment that fits takes over its pages, the rest of it is given back then. It counts against
    the limit, and is given back first when a step needs the memory.

    ``registry`` (``--transport nixl``: :class:`~stager.daemon.nixl_agent.SegmentRegistry`): the
    same thread registers each segment it creates with the daemon's NIXL agent before handing it
    over, so a grant on the socket loop only looks the registration up.
    """

    def __init__(
        self, limit: int, make: type[Segment], new_name: Callable[[], str], registry: SegmentRegistry | None = None
    ):
        self.limit = limit
        self._make, self._new_name = make, new_name
        self._registry = registry
        self.used = 0
        self.current_layout: str | None = None  # pooled segments of other layouts are dropped
        # full assembly (serve --assemble-full) pools its own layout's segments too, never at the
        # trainer's expense: take() drops them first when a step needs the memory
        self.spare_layout: str | None = None
        self.spare_rotation = 0
        self.pool: dict[str, list[Segment]] = {}  # layout id -> free segments of that layout
        self.owner: dict[str, tuple[str, Segment]] = {}  # segment name -> (layout id, segment)
        self.pending: dict[str, tuple[str, int]] = {}  # name -> (layout id, size), being created
        self.failures: dict[str, StagerError] = {}  # layout id -> why its last segment could not be created
        self.draining: list[Segment] = []  # given back while remote readers' frames still point into them
        self.rotation = 1  # segments a layout keeps (keep + 1): more are unlinked when given back
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.reserve: Segment | None = None  # preallocated pages the next new segment that fits takes
        self._reserve_pending: tuple[str, int] | None = None  # (name, size) being preallocated
        self._stopping = threading.Event()  # close(): a preallocation in progress stops early

    # -------------------------------------------------------------- background creation

    @property
    def creating(self) -> bool:
        """True while the background thread creates segments or preallocates memory."""
        return bool(self.pending) or self._reserve_pending is not None

    def _start_factory(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._factory, name="stager-segments", daemon=True)
            self._thread.start()

    def _factory(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            name, size, pages_from = item
            try:
                started = time.monotonic()
                if pages_from == "preallocate":
                    seg = self._make.preallocated(name, size, self._stopping)
                elif pages_from is not None:
                    seg = self._make(name, size, pages_from=pages_from)
                else:
                    seg = self._make(name, size)
                if self._registry is not None and pages_from != "preallocate":  # a reserve is registered once used
                    self._registry.register(seg)
                log.debug("created %s (%.0f MiB) in %.0f ms", name, size / 2**20, (time.monotonic() - started) * 1e3)
                self._done.put((name, seg))
            except Exception as exc:  # reported by collect(); the budget is given back there
                self._done.put((name, exc))

    def preallocate(self, size: int) -> None:
        """Allocate ``size`` bytes ahead, in the background, for the next new segment that fits."""
        if size <= 0 or self.reserve is not None or self._reserve_pending is not None:
            return
        self._start_factory()
        name = self._new_name()
        self.used += size
        self._reserve_pending = (name, size)
        self._requests.put((name, size, "preallocate"))

    def drop_reserve(self) -> None:
        """Give the preallocated memory back (a step needs memory it cannot serve, or shutdown)."""
        if self.reserve is not None:
            seg, self.reserve = self.reserve, None
            self.used -= seg.size
            seg.unlink()

    def _take_reserve(self, size: int) -> Segment | None:
        """The preallocated segment, for a new segment of ``size`` bytes, if it is ready and large enough."""
        seg = self.reserve
        if seg is None or seg.size < size:
            return None
        self.reserve = None
        self.used -= seg.size  # the new segment's own size was counted when it was asked for
        return seg

    def _room_for(self, size: int) -> int:
        """Bytes a new segment of ``size`` bytes has: the free budget, plus the preallocated
        memory when it is large enough to become that segment."""
        reserved = self.reserve.size if self.reserve is not None and self.reserve.size >= size else 0
        return self.limit - self.used + reserved

    def prefill(self, layout_id: str, size: int, target: int) -> None:
        """Have ``target`` segments of ``layout_id`` (pooled, in use or pending), as far as the limit allows."""
        self.rotation = target
        have = sum(1 for lid, _ in self.owner.values() if lid == layout_id)
        have += sum(1 for lid, _ in self.pending.values() if lid == layout_id)
        while have < target:
            pages_from = self._take_reserve(size)
            if pages_from is None and self.used + size > self.limit and self.reserve is not None:
                self.drop_reserve()  # too small for this layout, and in the way of its rotation
            if pages_from is None and self.used + size > self.limit:
                break
            self._start_factory()
            name = self._new_name()
            self.used += size
            self.pending[name] = (layout_id, size)
            self._requests.put((name, size, pages_from))
            have += 1

    def collect(self, block_for: str | None = None, timeout: float = 120.0) -> int:
        """Move finished background segments into the pool and return how many finished; with
        ``block_for`` (only at shutdown), wait until none of that layout (or any, for ``"*"``) is pending."""
        finished = 0
        while self.pending or self._reserve_pending is not None:
            waiting = block_for is not None and (
                any(block_for in ("*", lid) for lid, _ in self.pending.values())
                or (block_for == "*" and self._reserve_pending is not None)
            )
            try:
                name, result = self._done.get(timeout=timeout) if waiting else self._done.get_nowait()
            except queue.Empty:
                break
            finished += 1
            if self._reserve_pending is not None and name == self._reserve_pending[0]:
                self._preallocated(result)
                continue
            layout_id, size = self.pending.pop(name)
            if isinstance(result, Exception):
                self.used -= size
                if not isinstance(result, StagerError):
                    result = StagerError(
                        ErrorCode.MEMORY_LIMIT,
                        f"could not create a shared-memory segment of {size >> 20} MiB: {result}",
                    )
                if layout_id not in self.failures:  # said once per layout, not once per retry
                    log.warning("could not create segment %s: %s", name, result.message)
                self.failures[layout_id] = result
            elif layout_id not in (self.current_layout, self.spare_layout):
                self.owner[name] = (layout_id, result)
                self.destroy(result)
            else:
                self.owner[name] = (layout_id, result)
                self.failures.pop(layout_id, None)
                self.pool.setdefault(layout_id, []).append(result)
        for seg in [s for s in self.draining if not s.busy()]:  # remote readers got their frames
            self.draining.remove(seg)
            self.give_back(seg, reuse=True)
            finished += 1
        return finished

    def _preallocated(self, result: Segment | Exception) -> None:
        name, size = self._reserve_pending
        self._reserve_pending = None
        if isinstance(result, Exception):
            self.used -= size
            log.warning("could not preallocate %d MiB: %s", size >> 20, getattr(result, "message", result))
            return
        self.reserve = result
        log.debug("preallocated %s (%.0f MiB)", name, size / 2**20)

    # -------------------------------------------------------------- taking and giving back

    def take(self, layout_id: str, size: int) -> Segment | None | object:
        """A pooled segment of ``layout_id``; else :data:`PENDING` after asking the background thread
        for one (the caller waits, the daemon keeps serving); None when over budget."""
        self.collect()
        free = self.pool.get(layout_id)
        if free:
            # oldest first: the order segments were created in, which is the order ranks pre-fault
            # them in (BeginReply.live_segments), so a new step gets the one they prepared first
            return free.pop(0)
        if size > self.limit:
            raise StagerError(
                ErrorCode.MEMORY_LIMIT,
                f"one snapshot needs {size / 2**20:.1f} MiB but the daemon's memory limit is "
                f"{self.limit / 2**20:.1f} MiB; restart the daemon with a larger --memory-limit",
            )
        if any(lid == layout_id for lid, _ in self.pending.values()):
            return PENDING
        failure = self.failures.pop(layout_id, None)
        if failure is not None:  # creating one failed (e.g. /dev/shm is full): refuse now, do not retry
            raise failure
        if self._reserve_pending is not None and self._reserve_pending[1] >= size:
            return PENDING  # the memory being preallocated will do: a new segment would queue behind it
        if self._room_for(size) < size:
            self.drop_reserve()  # too small to serve this segment: its memory can
        if self._room_for(size) < size:
            self.drop_pool(except_layout=layout_id)
        if self._room_for(size) < size:
            # segments (or preallocated memory) still being created give their budget back when done
            return PENDING if self.pending or self._reserve_pending else None
        self.prefill(layout_id, size, len(self.live(layout_id)) + 1)
        return PENDING

    def give_back(self, seg: Segment, *, reuse: bool) -> None:
        """A segment no version uses any more: pooled for the next step of its layout, or unlinked
        (another layout's, or more than the rotation needs). One that queued frames still point
        into waits in ``draining`` first: reusing it would change bytes a reader has not received."""
        if seg.busy():
            self.draining.append(seg)
            return
        layout_id = self.owner.get(seg.name, (None,))[0]
        owned = sum(1 for lid, _ in self.owner.values() if lid == layout_id)
        rotation = {self.current_layout: self.rotation, self.spare_layout: self.spare_rotation}.get(layout_id, 0)
        if reuse and layout_id is not None and owned <= rotation:
            self.pool.setdefault(layout_id, []).append(seg)
        else:
            self.destroy(seg)

    def request_spare(self, layout_id: str, size: int) -> Segment | object | bool:
        """For background work (full assembly, at most one segment at a time): a pooled segment of
        ``layout_id``; else :data:`PENDING` after asking the background thread for one (counted as
        used from now on; :meth:`collect` pools it, the next call takes it); False when only
        dropping another layout's pool or evicting a version would make room. A failed creation
        is raised once (its StagerError)."""
        free = self.pool.get(layout_id)
        if free:
            return free.pop(0)
        if any(lid == layout_id for lid, _ in self.pending.values()):
            return PENDING
        failure = self.failures.pop(layout_id, None)
        if failure is not None:
            raise failure
        if self.used + size + self.trainer_headroom() > self.limit:
            return False
        self._start_factory()
        name = self._new_name()
        self.used += size
        self.pending[name] = (layout_id, size)
        self._requests.put((name, size, None))
        return PENDING

    def trainer_headroom(self) -> int:
        """Bytes the trainer's rotation (``rotation`` segments of the current layout) still has to
        create: background work leaves them free, so the next step never waits for it."""
        sizes = [seg.size for lid, seg in self.owner.values() if lid == self.current_layout]
        if not sizes:
            return 0
        have = len(sizes) + sum(1 for lid, _ in self.pending.values() if lid == self.current_layout)
        return max(0, self.rotation - have) * sizes[0]

    def destroy(self, seg: Segment) -> None:
        if self.owner.pop(seg.name, None) is not None:
            self.used -= seg.size
        seg.unlink()

    def drop_pool(self, except_layout: str | None = None, keep_layouts: set[str] = frozenset()) -> None:
        """Unlink pooled segments of every layout but ``except_layout`` and ``keep_layouts``."""
        for layout_id in list(self.pool):
            if layout_id != except_layout and layout_id not in keep_layouts:
                for seg in self.pool.pop(layout_id):
                    self.destroy(seg)

    def live(self, layout_id: str) -> list[str]:
        """Names of the layout's segments: pooled, in use, and still being created."""
        return [name for name, (owner, _) in self.owner.items() if owner == layout_id] + [
            name for name, (owner, _) in self.pending.items() if owner == layout_id
        ]

    def status(self) -> MemoryStatus:
        return {
            "used": self.used,
            "limit": self.limit,
            "pooled": sum(s.size for segs in self.pool.values() for s in segs),
            "draining": sum(s.size for s in self.draining),
            "preallocated": self.reserve.size if self.reserve is not None else 0,
        }

    def close(self) -> None:
        """Unlink every segment (daemon shutdown), waiting for those being created."""
        self._stopping.set()
        if self._thread is not None:
            self._requests.put(None)
            self.current_layout = None
            self.collect(block_for="*", timeout=60.0)
            self._thread.join(60.0)
        self.drop_reserve()
        for _, seg in list(self.owner.values()):
            self.destroy(seg)
        self.pool.clear()
        self.draining.clear()


def evictable(sealed: OrderedDict[int, Version], keep: int) -> list[Version]:
    """Sealed versions retention would drop now: beyond the newest ``keep``, unleased, oldest first."""
    steps = list(sealed)
    extra = steps[:-keep] if len(steps) > keep else []
    return [sealed[s] for s in extra if not leased(sealed[s])]


def reclaim_candidates(sealed: OrderedDict[int, Version]) -> list[Version]:
    """Unleased sealed versions that may go to make room, oldest first, never the newest."""
    steps = list(sealed)[:-1]
    return [sealed[s] for s in steps if not leased(sealed[s])]


def leased(v: Version) -> bool:
    """Held by a reader's lease (negative ids are the change-map thread's pins: they never keep a
    version visible, only its segment from reuse until the thread is done or yields)."""
    return any(lease > 0 for lease in v.leases)


class Retention:
    """Owns the budget and decides which sealed versions stay: retention, eviction, reclaim.

    It is built before the steps that wait for memory, so it never calls them: what may free
    memory (:meth:`enforce`, :meth:`collect`) is called by the part that caused it, which then
    lets waiting steps retry (``Steps.retry_waiting``, handed to the read side at construction).
    """

    def __init__(
        self, state, budget: SegmentBudget, *, yield_pins: Callable[[Callable, set | None], bool] = lambda _, __: False
    ):
        self.state, self.budget = state, budget
        self._yield_pins = yield_pins  # drops background pins (change maps) when only they hold memory back

    def take_segment(self, layout_id: str, size: int):
        """A segment for a new step (see :meth:`SegmentBudget.take`), evicting old versions if needed."""
        held = {v for v in self.state.orphans if v.leases and not leased(v)}
        if held:  # evicted versions a change map still reads: a staging step comes first
            self._yield_pins(self.unpinned, held)
        seg = self.budget.take(layout_id, size)
        while seg is None:  # over budget: make room from unleased older versions
            candidates = reclaim_candidates(self.state.sealed)
            if not candidates:
                if self._yield_pins(self.unpinned, None):
                    continue  # a staging step comes before a change map
                return None
            self.evict(candidates[0])
            seg = self.budget.take(layout_id, size)
        return seg

    def free(self, v: Version, *, reuse: bool) -> None:
        if v.segment is not None:
            self.budget.give_back(v.segment, reuse=reuse)
            v.segment = None

    def unpinned(self, v: Version) -> None:
        """A background pin of ``v`` ended: an abandoned version nobody leases any more goes (the
        caller then runs :meth:`enforce`)."""
        if not v.leases and v in self.state.orphans:
            self.state.orphans.discard(v)
            self.free(v, reuse=True)

    def evict(self, v: Version) -> None:
        self.state.sealed.pop(v.step, None)
        if v.leases:  # pinned by the change-map thread: its segment goes when the thread is done with it
            self.state.orphans.add(v)
            if self.state.keep > 1 and not leased(v):
                # its map had since its successor's seal, while both were kept anyway: one still being
                # made now is dropped (one made is recorded), and the segment is pooled as without maps.
                # With keep=1 a map could never be made that way: the pin holds until a step needs it.
                self._yield_pins(self.unpinned, {v})
        else:
            self.free(v, reuse=True)
        self.state.counters["evictions"] += 1
        log.debug("evicted step %d", v.step)

    def enforce(self) -> None:
        """Drop sealed versions beyond ``--keep`` (unleased only) and the pools of layouts no version
        uses any more (after a layout change); the caller then retries steps waiting for memory."""
        state = self.state
        for v in evictable(state.sealed, state.keep):
            self.evict(v)
        in_use = {
            v.record.id
            for v in (*state.sealed.values(), *state.staging.values(), *state.orphans)
            if v.record is not None
        }
        self.budget.drop_pool(
            except_layout=self.budget.current_layout, keep_layouts=in_use | {self.budget.spare_layout}
        )

    def collect(self) -> bool:
        """Called while segments are being created: True when some finished (waiting steps may take them)."""
        return self.budget.collect() > 0

    def memory_message(self, size: int) -> str:
        state = self.state
        leased = sorted({v.step for _, v in state.leases.values()})
        return (
            f"staging needs {size / 2**20:.1f} MiB but {self.budget.used / 2**20:.1f} of "
            f"{self.budget.limit / 2**20:.1f} MiB are in use (steps in flight: {sorted(state.staging)}, "
            f"leased versions: {leased}); release leases, lower --keep, raise --memory-limit, or pass a "
            "larger wait to StagingClient(backpressure_timeout=...)"
        )

    def status(self) -> RetentionStatus:
        state = self.state
        return {
            "policy": RETENTION_POLICY,
            "leased_steps": sorted({v.step for _, v in state.leases.values()}),
            "waiting_for_memory": sorted(s for s, v in state.staging.items() if v.wait_deadline is not None),
        }
