"""A training loop in lockstep that stages every step, for the tests and stress campaigns that
stop the daemon under a job (tests/test_hung_daemon.py, stress/hung_daemon.py).

Each step runs one all_reduce (as a step's collectives make the ranks move together), so every
rank stops at the same step once the file ``done`` appears in the control directory; it calls
``wait_copied()`` right after ``stage()`` (no overlap with the step: the worst case for the loop).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from stager.client import StageHandle, StagerError, StagingClient


@dataclasses.dataclass
class LockstepStep:
    """One step: its handle, when ``stage()`` was called (monotonic), the seconds spent in
    ``stage()`` + ``wait_copied()``, whether the copy was done, and the error of a
    ``wait_copied()`` that did not return in time (then ``copied`` is False)."""

    step: int
    handle: StageHandle
    t: float
    stall: float
    copied: bool
    error: StagerError | None = None


def lockstep_stages(
    client: StagingClient, state_dict: dict, tensor: torch.Tensor, control_dir: str, *, copy_timeout: float = 120.0
) -> Iterator[LockstepStep]:
    """Stage ``state_dict`` every step until ``control_dir/done`` exists, ``tensor`` (one of its
    tensors) filled with the step number first; yields each step once its copy returned."""
    flag = torch.zeros(1)
    step = 0
    while True:
        flag.fill_(float(os.path.exists(os.path.join(control_dir, "done"))))
        dist.all_reduce(flag)  # the step's collective: every rank stops at the same step
        if flag.item():
            return
        step += 1
        tensor.fill_(step)
        t0 = time.monotonic()
        handle = client.stage(state_dict, step=step)
        try:
            copied, error = handle.wait_copied(copy_timeout), None
        except StagerError as exc:  # not even skipped within copy_timeout
            copied, error = False, exc
        yield LockstepStep(step, handle, t0, time.monotonic() - t0, copied, error)
