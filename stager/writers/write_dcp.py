"""`stager write-dcp`: resumable PyTorch DCP checkpoints of sealed versions, written off the trainer.

The snapshot already holds every tensor whole (model and, when staged, optimizer state) plus the
non-tensor train state, under the same dotted FQNs that DCP gives a nested state dict. So the
checkpoint loads with plain ``torch.distributed.checkpoint.load`` into any world size and
parallelism (DCP reshards on load), and ``dcp_to_torch_save`` converts it.

>>> write_dcp("/ckpt/dcp", step=1000)  # doctest: +SKIP
['/ckpt/dcp/step-00001000']
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from stager.formats.integrity import entry, write_manifest
from stager.formats.safe_dcp import quiet_single_process_dcp
from stager.protocol import ErrorCode, StagerError
from stager.writers.persist import exact_storage, for_each_version, step_directory, step_path

log = logging.getLogger("stager.writers.persist")
quiet_single_process_dcp()


def write_snapshot_dcp(snapshot: Any, out_dir: str, on_write: Callable[[dict], None] | None = None) -> str:
    """Write one leased snapshot as a DCP checkpoint in ``out_dir/step-N``; returns that path.
    ``on_write`` gets ``{"written": dir, "step": N, "seconds": s, "bytes": tensor bytes, "files":
    data files}`` (seconds: this write's own time, lease excluded)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    if getattr(snapshot, "partial", False):
        raise StagerError(
            ErrorCode.PARTIAL,
            f"step {snapshot.step} holds only this node's part of some tensors; "
            "a DCP checkpoint of a multi-node job needs every node's part",
        )
    started = time.monotonic()
    # zero-copy views of the daemon's memory, each over exactly its own bytes (DCP would clone it)
    state: dict[str, Any] = {name: exact_storage(t) for name, t in snapshot.items()}
    for name, value in snapshot.objects.items():
        if name in state:
            raise StagerError(ErrorCode.BAD_VALUE, f"{name} is both a tensor and a non-tensor value")
        state[name] = value
    with step_directory(out_dir, snapshot.step) as tmp:
        # one writer process does what every trainer rank did in parallel: give DCP the cores
        writer = dcp.FileSystemWriter(tmp, thread_count=max(1, min(8, os.cpu_count() or 1)))
        try:
            metadata = dcp.save(state, storage_writer=writer, no_dist=True)
        except CheckpointException as exc:
            # DCP wraps what went wrong, a ^C included: a ^C stays a ^C (exit 130), the rest is typed
            causes = [cause for cause, _ in exc.failures.values()]
            if any(isinstance(c, KeyboardInterrupt) for c in causes):
                raise KeyboardInterrupt from None
            raise StagerError(
                ErrorCode.INTERNAL if not causes else ErrorCode.BAD_VALUE,
                f"DCP could not save step {snapshot.step}: {causes[0] if causes else exc}",
            ) from None
        write_manifest(
            tmp,
            snapshot.step,
            "dcp",
            {name: entry(t) for name, t in snapshot.items()},
            snapshot.objects,
            snapshot.model_info,
        )
    final = step_path(out_dir, snapshot.step)
    log.info("wrote DCP checkpoint of step %d to %s", snapshot.step, final)
    if on_write is not None:
        on_write(
            {
                "written": final,
                "step": snapshot.step,
                "seconds": round(time.monotonic() - started, 3),
                "bytes": sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor)),
                "files": data_files(metadata),
            }
        )
    return final


def data_files(metadata: Any, items: Any = None) -> int:
    """How many data files DCP wrote (of ``items``, its metadata indices: default all of them)."""
    storage = metadata.storage_data or {}
    return len({storage[i].relative_path for i in (storage if items is None else items)})


def write_dcp(
    out_dir: str,
    *,
    endpoint: str | None = None,
    step: int | None = None,
    follow: bool = False,
    every: int = 1,
    keep: int | None = None,
    max_writes: int | None = None,
    on_written: Callable[[str], None] | None = None,
    on_report: Callable[[dict], None] | None = None,
    on_write: Callable[[dict], None] | None = None,
) -> list[str]:
    """Write the version ``step`` (default: the newest), or with ``follow`` each new version at
    least ``every`` steps apart; the ``keep`` newest checkpoints stay. ``on_write``: see
    :func:`write_snapshot_dcp`."""
    return for_each_version(
        lambda snap: write_snapshot_dcp(snap, out_dir, on_write),
        out_dir,
        endpoint=endpoint,
        step=step,
        follow=follow,
        every=every,
        keep=keep,
        max_writes=max_writes,
        on_written=on_written,
        on_report=on_report,
    )
