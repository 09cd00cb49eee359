"""The daemon's lifecycle: serving, draining after SIGTERM, stopped; SIGHUP reopens the logs.

SIGTERM (or SIGINT) starts a drain: the steps in flight may finish sealing (their remaining
begins, puts and commits are served), every new stage is refused with ``unavailable`` ("the
daemon is shutting down"), readers are told with an unsolicited error (id 0) and keep their
leases until the daemon exits. The drain ends when nothing is in flight or after
``drain_timeout`` seconds (what is still in flight then fails). A second SIGTERM/SIGINT stops at
once. Signal handlers only set flags: the loop thread acts on them (within one tick).

>>> life = Lifecycle(drain_timeout=30, clock=lambda: 100.0)
>>> life.request_stop("SIGTERM"); life.phase, life.should_exit(in_flight=1)
('draining', False)
>>> life.should_exit(in_flight=0)
True
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Container

from stager.protocol import Begin, ErrorCode, Message, StagerError

SERVING = "serving"
DRAINING = "draining"
STOPPING = "stopping"


def refusal(phase: str, msg: Message, in_flight: Container[int]) -> StagerError | None:
    """The error a request gets in ``phase``, None when it is served: while draining, a Begin of a
    step that is not in flight (a new stage) is refused; everything else is served.

    >>> refusal(DRAINING, Begin(step=7), {6}).code.value, refusal(DRAINING, Begin(step=6), {6})
    ('unavailable', None)
    """
    if phase == SERVING or not isinstance(msg, Begin) or msg.step in in_flight:
        return None
    return StagerError(
        ErrorCode.UNAVAILABLE,
        f"the daemon is shutting down (pid {os.getpid()}): step {msg.step} was not "
        "staged; staging resumes once a daemon serves this endpoint again",
    )


class Lifecycle:
    """Phase and deadlines; pure bookkeeping (the socket loop asks it what to do)."""

    def __init__(self, drain_timeout: float, clock=time.monotonic):
        self.drain_timeout, self._clock = drain_timeout, clock
        self.phase = SERVING
        self.reason = ""
        self.deadline: float | None = None
        self.reopen_requested = False
        self.announced = False  # readers were told about the drain

    def request_stop(self, reason: str) -> None:
        """First call: drain; a second one (or ``reason="now"``): stop at once."""
        if self.phase == SERVING and reason != "now":
            self.phase, self.reason = DRAINING, reason
            self.deadline = self._clock() + self.drain_timeout
        else:
            self.phase, self.reason = STOPPING, self.reason or reason

    def should_exit(self, in_flight: int) -> bool:
        if self.phase == STOPPING:
            return True
        if self.phase == DRAINING:
            return in_flight == 0 or self._clock() >= self.deadline
        return False

    def drain_message(self, endpoint: str) -> str:
        return (
            f"the daemon at {endpoint} (pid {os.getpid()}) is shutting down ({self.reason}): it "
            "finishes the steps in flight, refuses new stages, then exits; leases end then, subscribe again "
            "once a daemon serves this endpoint"
        )

    def install_signals(self) -> bool:
        """SIGTERM/SIGINT drain (twice: stop), SIGHUP asks for a log reopen; main thread only."""
        if threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop("SIGTERM"))
        signal.signal(signal.SIGINT, lambda *_: self.request_stop("SIGINT"))
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "reopen_requested", True))
        return True
