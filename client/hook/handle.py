"""StageHandle: the progress of one ``StagingClient.stage()`` call, shared by the train thread
(which waits on it) and the client's worker thread (which completes it)."""

from __future__ import annotations

import threading

import torch

from stager.protocol import ErrorCode, StagerError


class StageHandle:
    """The progress of one ``stage()`` call."""

    def __init__(self, step: int, strict: bool):
        self.step = step
        self.error: StagerError | None = None
        self.result: dict | None = None  # {"step", "nbytes", "tensors", "partial"} once sealed
        self._strict = strict
        self._copied = threading.Event()
        self._done = threading.Event()
        self._cuda_events: list = []
        self._copied_ok = False

    def wait_copied(self, timeout: float | None = None) -> bool:
        """Block until the data has left the live tensors; True if it did, False if staging failed
        (strict clients raise instead). On CUDA this makes the current stream wait for the copy,
        so the host returns as soon as the copies are queued."""
        if not self._copied.wait(timeout):
            raise StagerError(ErrorCode.TIMEOUT, f"step {self.step}: not copied within {timeout}s")
        for event in self._cuda_events:  # the trainer's stream waits for the copies, the host does not
            torch.cuda.current_stream(event.device).wait_event(event)
        if self._copied_ok:
            return True  # a seal that fails later does not matter to the live tensors
        if self._strict:
            raise self.error
        return False

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the daemon sealed this step; returns its summary, raises StagerError if it failed."""
        if not self._done.wait(timeout):
            raise StagerError(ErrorCode.TIMEOUT, f"step {self.step}: not sealed within {timeout}s")
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def skipped(self) -> bool:
        """True when this step was not staged because the daemon showed no sign of life in time
        (``error.code`` is NO_SIGN_OF_LIFE); training goes on, the next ``stage()`` tries again."""
        return self.error is not None and self.error.code == ErrorCode.NO_SIGN_OF_LIFE

    # The completion side, called by the client's worker thread (never by the train loop). Each
    # sets what the waiting side reads before the event that releases it.

    def copied(self, cuda_events: list | tuple = ()) -> None:
        """The data has left the live tensors (or, on CUDA, its copies are queued behind
        ``cuda_events``, which :meth:`wait_copied` makes the trainer's stream wait for)."""
        self._cuda_events = list(cuda_events)
        self._copied_ok = True
        self._copied.set()

    def fail(self, error: StagerError) -> None:
        """Staging this step failed (or was skipped): both waits end, with ``error``."""
        self.error = error
        self._copied.set()
        self._done.set()

    def seal(self, result: dict) -> None:
        """The daemon sealed this step; ``result`` is what :meth:`wait` returns."""
        self.result = result
        self._done.set()

    def __repr__(self) -> str:
        state = "sealed" if self.result else ("skipped" if self.skipped else "failed" if self.error else "pending")
        return f"StageHandle(step={self.step}, {state})"
