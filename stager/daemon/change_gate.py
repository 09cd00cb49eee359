"""Change maps yield to staging: the map thread never works while a step is in flight.

From a step's first Begin until it seals or fails, the trainer's copy into the step's segment needs
the node's cores; a change map made meanwhile would compete with it (on 2 cores, ~1.2x the
trainer's ``wait_copied()`` for a step of 1000 small tensors). The loop says when the first step
begins and when the last one ends (:meth:`Gate.hold`, called by
:class:`~stager.daemon.steps.Steps`); the map thread asks :meth:`Gate.wait` before it begins a
map, between regions and between chunks of a region (at most ``SPAN_CHUNK`` elements or
``SPAN_GROUP`` tensors, ~1 ms of work), and goes on from there once no step is in flight. A map the
steps leave no time for is dropped when its base goes, as any map not made by then.

Steps in flight without a break for :data:`MAX_HOLD_S` (a trainer that begins each step before the
last one sealed, a rank waiting for its partners or for memory) no longer hold map work back: it goes
on beside them, on its niced thread, until a moment comes with no step in flight (counted as
``overridden``): else such a trainer would get no map at all, and every delta read would be a full one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

MAX_HOLD_S = 2.0  # steps in flight this long without a break: map work goes on beside them


class Gate:
    """Whether map work may run now: closed while steps are in flight. One waiter (the map thread)."""

    def __init__(self):
        self._cond = threading.Condition()
        self.held = False  # steps are in flight (set by the loop, read by the map thread)
        self.waiting = False  # the map thread has work and waits for the steps in flight (status)
        self.yields = 0  # times map work stopped for a step in flight (status)
        self.overridden = 0  # times it went on because steps were in flight for MAX_HOLD_S without a break
        self._since = 0.0  # time.monotonic() when steps in flight began, without a break since
        self._counted = -1.0  # the _since of the stretch last counted as overridden

    def hold(self, busy: bool) -> None:
        """Steps are in flight (``busy``), or none is any more (the loop's thread)."""
        if busy == self.held:
            return
        with self._cond:
            self.held = busy
            self._since = time.monotonic()
            self._cond.notify_all()

    def closed(self) -> bool:
        """Map work must wait now: steps are in flight, for less than MAX_HOLD_S without a break."""
        return self.held and time.monotonic() - self._since < MAX_HOLD_S

    def _override(self) -> None:
        """Map work goes on beside steps in flight (counted once per unbroken stretch of them)."""
        if self.held and self._counted != self._since:
            self._counted = self._since
            self.overridden += 1

    def wake(self) -> None:
        """Something ``wait``'s ``stop`` reads changed (a map dropped, the daemon closing)."""
        with self._cond:
            self._cond.notify_all()

    def wait(self, stop: Callable[[], bool]) -> float:
        """Return once no step is in flight (or steps have been for MAX_HOLD_S without a break), or ``stop()``
        (asked again after each :meth:`wake`); the seconds it waited."""
        if not self.held or stop():  # the way through: one attribute read, no lock
            return 0.0
        with self._cond:
            if not self.closed() or stop():
                self._override()
                return 0.0
            self.yields += 1
            self.waiting = True
            began = time.monotonic()
            try:
                while self.closed() and not stop():
                    self._cond.wait(max(1e-3, MAX_HOLD_S - (time.monotonic() - self._since)))
            finally:
                self.waiting = False
            if not stop():
                self._override()
            return time.monotonic() - began
