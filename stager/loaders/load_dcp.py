"""`stager load-dcp DIR`: a DCP checkpoint into the daemon as a sealed version.

The checkpoint is read without running its code (:mod:`.safe_dcp`: ``.metadata`` through an
unpickler that admits only DCP's metadata classes, the files it names checked). Its tensors are
planned from the metadata, the step is begun as a one-rank staging session
(:class:`~.ingest.IngestSession`), and DCP's own reader loads every tensor straight into the
daemon's shared memory: each file byte is read once, into its place. Non-tensor items are pickles
and are never unpickled; the train state of a checkpoint written by ``stager write-dcp`` comes
back from its manifest (JSON), with the adapter, HF config and prefix it was staged with. Any failure
aborts the step: no version is left behind.

>>> load_dcp("/ckpt/dcp/step-00001000")  # doctest: +SKIP
{'step': 1000, 'nbytes': 536870912, 'tensors': 18, 'partial': False, 'seconds': 0.41, 'objects': 2}
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from stager.formats.integrity import MANIFEST
from stager.formats.safe_dcp import METADATA, DamagedCheckpoint, load_into, safe_reader
from stager.protocol import ErrorCode, StagerError

from .ingest import IngestSession, no_trainer_hint

log = logging.getLogger("stager.loaders")


def _manifest(directory: str) -> dict:
    """stager's manifest beside the checkpoint (step, train state), {} when there is none."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DamagedCheckpoint(path, f"cannot be read as JSON ({exc})") from None
    return manifest if isinstance(manifest, dict) else {}


def keep_tensor(name: str, model_only: bool) -> bool:
    """``--model-only``: drop the optimizer state (``optim.*``), keep the rest.

    >>> keep_tensor("optim.state.w.exp_avg", True), keep_tensor("model.w", True)
    (False, True)
    """
    return not (model_only and name.startswith("optim."))


def load_dcp(
    directory: str,
    *,
    endpoint: str | None = None,
    step: int | None = None,
    model_only: bool = False,
    timeout: float = 30.0,
    backpressure_timeout: float = 0.0,
) -> dict:
    """Load the DCP checkpoint in ``directory`` into the daemon as sealed version ``step``
    (default: the step in stager's manifest, else 0). Returns ``{"step", "nbytes", "tensors",
    "partial", "seconds", "objects", "skipped"}`` (``skipped``: non-tensor items not loaded).
    Raises :class:`~.safe_dcp.DamagedCheckpoint` / :class:`~.safe_dcp.UnsafeCheckpoint` naming the
    file; nothing is sealed then."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    started = time.monotonic()
    directory = os.path.abspath(directory)
    if not os.path.isfile(os.path.join(directory, METADATA)):
        raise DamagedCheckpoint(
            directory,
            f"holds no {METADATA}: not a DCP checkpoint (a step directory of write-dcp, e.g. /ckpt/dcp/step-00001000)",
        )
    reader = safe_reader(directory)
    items = reader.metadata.state_dict_metadata
    tensors = {
        name: (md.properties.dtype, tuple(md.size))
        for name, md in items.items()
        if isinstance(md, TensorStorageMetadata) and keep_tensor(name, model_only)
    }
    if not tensors:
        raise DamagedCheckpoint(directory, "holds no tensors to load")
    manifest = _manifest(directory)
    objects = {} if model_only else manifest.get("objects") or {}
    if not isinstance(objects, dict):
        objects = {}
    skipped = sum(1 for name, md in items.items() if not isinstance(md, TensorStorageMetadata) and name not in objects)
    if step is None:
        step = manifest.get("step") if isinstance(manifest.get("step"), int) else 0
    staged = manifest.get("model_info") if isinstance(manifest.get("model_info"), dict) else {}
    model_info: dict[str, Any] = {k: v for k, v in staged.items() if k in ("adapter", "hf_config", "prefix")}
    model_info["source"] = {"format": "dcp", "path": directory}
    try:
        with IngestSession(endpoint, step=step, timeout=timeout, backpressure_timeout=backpressure_timeout) as s:
            load_into(reader, dict(s.begin(tensors)))  # straight into the daemon's shared memory
            sealed = s.commit(objects=objects, model_info=model_info)
    except StagerError as exc:
        if exc.code == ErrorCode.RANK_CONFLICT:
            raise no_trainer_hint(exc) from None
        raise
    seconds = time.monotonic() - started
    log.info("loaded %s as step %d: %d tensors in %.2fs", directory, sealed["step"], sealed["tensors"], seconds)
    return {**sealed, "seconds": round(seconds, 3), "objects": len(objects), "skipped": skipped}
