"""Restoring a training state dict from a sealed version, in place: the way back in after a crash.

Every rank fills its own tensors from one version and reads only the box it owns:
- DTensor local shards of any placement, and plain tensors;
- the state dicts ``get_model_state_dict`` / ``get_optimizer_state_dict(flatten_optimizer_state_dict=True)``
  give, nested under any keys.
The bytes come as a view of the daemon's shared memory on the same host, or as frames from another
host or node. Any box of a tensor can be read, so a job with another world size or parallelism than
the one that staged restores as well: the restore reshards.

Every name, shape and dtype is checked on every rank before any byte is written. The ranks then
agree (two small all_gathers): if any rank's check or read fails, every rank raises a typed error
naming that rank and tensor, so no rank goes on training from a state the others do not share.
Non-tensor leaves come back as staged. Device tensors are filled through two pinned host buffers on
a side stream: shared memory -> pinned buffer (a memcpy) -> device (an async DMA), the two
overlapping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import msgpack
import torch

from stager.protocol import ErrorCode, StagerError

from .flatten import flatten_state_dict, local_box, unwrap

PINNED_CHUNK = 64 << 20  # bytes per pinned buffer (two of them) for host -> device copies


def _bad(message: str) -> StagerError:
    return StagerError(ErrorCode.BAD_VALUE, message)


def restore_plan(snapshot: Any, tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, tuple, tuple]]:
    """``[(fqn, local tensor, global offset, local shape)]`` to fill, each checked against the
    version (name, global shape, dtype) before anything is read."""
    plan = []
    missing = [fqn for fqn in tensors if fqn not in snapshot]
    if missing:
        raise _bad(
            f"{missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: not in step "
            f"{snapshot.step}, which holds {len(snapshot)} tensors (e.g. {', '.join(list(snapshot)[:3])}); "
            "restore from a version of this model and state-dict layout"
        )
    for fqn, tensor in tensors.items():
        shape, dtype = snapshot.meta(fqn)
        local, gshape, offset, lshape = local_box(tensor)
        local = unwrap(fqn, local)  # float8 training wrappers: the high-precision weight inside
        if tuple(gshape) != tuple(shape) or local.dtype != dtype:
            raise _bad(
                f"{fqn}: step {snapshot.step} holds {str(dtype).removeprefix('torch.')}{list(shape)}, "
                f"the model has {str(local.dtype).removeprefix('torch.')}{list(gshape)}; restore into the "
                "model the version was staged from (or convert the version)"
            )
        plan.append((fqn, local, tuple(offset), tuple(lshape)))
    return plan


def _set_objects(state_dict: MutableMapping, objects: Mapping[str, Any]) -> None:
    """Put the staged non-tensor leaves back (dotted names, as staging flattened them): into the
    keys the state dict has, and under a mapping it gives (``"train": {}``) whatever was staged
    there. A top-level name the state dict does not have is not added; a tensor is never replaced.

    >>> sd = {"train": {"step": 0}, "model": {}}
    >>> _set_objects(sd, {"train.step": 7, "train.data.pos": 3, "other": 1}); sd
    {'train': {'step': 7, 'data': {'pos': 3}}, 'model': {}}
    """
    for fqn, value in objects.items():
        node = state_dict
        parts = fqn.split(".")
        i = 0
        while i < len(parts):
            j = next((j for j in range(len(parts), i, -1) if ".".join(parts[i:j]) in node), None)
            if j is None:  # not in the state dict: created only inside a mapping the caller gave
                if node is not state_dict:
                    for part in parts[i:-1]:
                        node = node.setdefault(part, {})
                    node[parts[-1]] = value
                break
            key = ".".join(parts[i:j])
            if isinstance(node[key], torch.Tensor):
                break
            if j == len(parts):
                node[key] = value
                break
            if not isinstance(node[key], MutableMapping):
                break
            node, i = node[key], j


def _as_error(exc: Exception) -> StagerError:
    return exc if isinstance(exc, StagerError) else StagerError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _agree(error: StagerError | None, doing: str, value: Any = None) -> list[Any]:
    """Every rank's ``value``, once every rank got through ``doing``; raises on every rank (the
    first failing rank's error, named) when any failed. One process: ``[value]`` or its error."""
    if not _distributed():
        if error is not None:
            raise error
        return [value]
    from .job_join import all_gather_bytes

    mine = [value, None if error is None else [str(getattr(error.code, "value", error.code)), error.message]]
    answers = [msgpack.unpackb(b) for b in all_gather_bytes(msgpack.packb(mine))]
    if error is not None:
        raise error
    failed = [(rank, why) for rank, (_, why) in enumerate(answers) if why]
    if failed:
        rank, (code, message) = failed[0]
        known = {c.value for c in ErrorCode}
        raise StagerError(
            ErrorCode(code) if code in known else ErrorCode.UNAVAILABLE,
            f"rank {rank} failed while {doing}, so no rank restored: {message}",
        )
    return [v for v, _ in answers]


class PinnedUpload:
    """Host -> device copies through two reused pinned buffers on a side stream (CUDA only)."""

    def __init__(self, device: torch.device, chunk: int | None = None):
        chunk = chunk or PINNED_CHUNK
        self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))  # the destinations may still be in use
        self.buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.events: list = [None, None]
        self.next = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if not dst.is_contiguous() or dst.dtype != src.dtype:
            self.finish()
            dst.copy_(src)
            return
        out = dst.view(-1).view(torch.uint8)
        data = src.contiguous().view(-1).view(torch.uint8)
        chunk = self.buffers[0].numel()
        for start in range(0, data.numel(), chunk):
            i, n = self.next, min(chunk, data.numel() - start)
            if self.events[i] is not None:
                self.events[i].synchronize()  # its previous DMA is done: the buffer may be refilled
            self.buffers[i][:n].copy_(data[start : start + n])
            with torch.cuda.stream(self.stream):
                out[start : start + n].copy_(self.buffers[i][:n], non_blocking=True)
                self.events[i] = torch.cuda.Event()
                self.events[i].record(self.stream)
            self.next ^= 1

    def finish(self) -> None:
        self.stream.synchronize()


def _fill(plan: list[tuple[str, torch.Tensor, tuple, tuple]], snap: Any) -> None:
    uploads: dict[torch.device, PinnedUpload] = {}
    try:
        with torch.no_grad():
            for fqn, local, offset, lshape in plan:
                if not local.numel():
                    continue
                src = snap.get(fqn, offsets=offset, sizes=lshape)
                if local.device.type == "cuda":
                    if local.device not in uploads:
                        uploads[local.device] = PinnedUpload(local.device)
                    uploads[local.device].copy(local, src)
                else:
                    local.copy_(src)
    finally:
        for upload in uploads.values():
            upload.finish()


def restore_state_dict(state_dict: MutableMapping, subscriber: Callable[[], Any], *, step: int | None = None) -> int:
    """Fill ``state_dict`` in place from version ``step`` (default: the newest; under
    torch.distributed every rank restores rank 0's newest) read through the reader
    ``subscriber()`` opens (closed here); returns the step restored. A collective: every rank
    calls it. See :meth:`stager.client.StagingClient.restore`."""
    snap = None
    plan = None
    error = None
    sub = None
    try:
        try:
            tensors = flatten_state_dict(state_dict, objects=False)[0]
            sub = subscriber()
            snap = sub.latest() if step is None else sub.at(step)
        except Exception as exc:  # every rank must reach the agreement, whatever failed here
            error = _as_error(exc)
        chosen = _agree(error, "finding the version to restore", None if snap is None else snap.step)[0]
        try:
            if snap.step != chosen:  # another rank saw an older newest (one sealed in between): rank 0's
                snap.release()
                snap = sub.at(chosen)
            plan = restore_plan(snap, tensors)
        except Exception as exc:
            error = _as_error(exc)
        _agree(error, f"checking step {chosen} against its state dict")
        try:
            _fill(plan, snap)
        except Exception as exc:
            error = _as_error(exc)
        _agree(error, f"reading step {chosen}")
        _set_objects(state_dict, snap.objects)
        return snap.step
    finally:
        if snap is not None:
            snap.release()
        if sub is not None:
            sub.close()
