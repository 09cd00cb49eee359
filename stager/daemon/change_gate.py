"""Change maps yield to staging: the map thread never works while a step is in flight.

From a step's first Begin until it seals or fails, the trainer's copy into the step's segment needs
the node's cores; a change map made meanwhile would compete with it (on 2 cores, ~1.2x the
trainer's ``wait_copied()`` for a step of 1000 small tensors). The loop says when the first step
begins and when the last one ends (:meth:`Gate.hold`, called by
:class:`~stager.daemon.steps.Steps`); the map thread asks :meth:`Gate.wait` before it begins a
map, between regions and between chunks of a region (at most ``SPAN_CHUNK`` elements or
``SPAN_GROUP`` tensors, ~1 ms of work), and goes on from there once no step is in flight. A map the
steps leave no time for is dropped when its base goes, as any map not made by then.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Gate:
    """Whether map work may run now: closed while steps are in flight. One waiter (the map thread)."""

    def __init__(self):
        self._cond = threading.Condition()
        self.held = False  # steps are in flight (set by the loop, read by the map thread)
        self.waiting = False  # the map thread has work and waits for the steps in flight (status)
        self.yields = 0  # times map work stopped for a step in flight (status)

    def hold(self, busy: bool) -> None:
        """Steps are in flight (``busy``), or none is any more (the loop's thread)."""
        if busy == self.held:
            return
        with self._cond:
            self.held = busy
            self._cond.notify_all()

    def wake(self) -> None:
        """Something ``wait``'s ``stop`` reads changed (a map dropped, the daemon closing)."""
        with self._cond:
            self._cond.notify_all()

    def wait(self, stop: Callable[[], bool]) -> None:
        """Return once no step is in flight, or ``stop()`` (asked again after each :meth:`wake`)."""
        if not self.held or stop():  # the way through: one attribute read, no lock
            return
        with self._cond:
            if not self.held or stop():
                return
            self.yields += 1
            self.waiting = True
            try:
                while self.held and not stop():
                    self._cond.wait()
            finally:
                self.waiting = False
