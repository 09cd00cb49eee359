"""`stager convert SRC OUT --to {dcp,hf,torch}`: one command per conversion, built on the loaders
and writers (HF -> DCP, DCP -> HF, DCP or HF -> one ``torch.save`` file). Not a consumer: it runs
a daemon of its own (``stager.dev.launch``) and a loader and a writer against it.

A private daemon is started for the conversion (an owner-only ipc socket in a temporary
directory), the checkpoint is loaded into it (``load-hf`` / ``load-dcp``: each file byte read once,
into shared memory), and the version is written by the same writer as ``write-dcp`` / ``export-hf``
(``OUT/step-N``, published atomically), or as one ``torch.save`` file ``OUT`` (written to a
temporary file, fsynced, renamed). The daemon goes when the conversion is done or fails.

>>> convert("/models/Llama-3.2-1B", "/ckpt/titan", to="dcp", adapter="llama3")  # doctest: +SKIP
'/ckpt/titan/step-00000000'
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch

from stager.formats.safe_dcp import METADATA
from stager.protocol import ErrorCode, StagerError
from stager.protocol.shm import SHM_DIR
from stager.writers.persist import exact_storage, fsync_path

FORMATS = ("dcp", "hf", "torch")


def source_format(src: str) -> str:
    """``dcp`` (a ``.metadata``) or ``hf`` (``*.safetensors``) for the checkpoint directory ``src``."""
    if os.path.isfile(os.path.join(src, METADATA)):
        return "dcp"
    if glob.glob(os.path.join(src, "*.safetensors")):
        return "hf"
    raise StagerError(
        ErrorCode.BAD_VALUE,
        f"{src}: neither a DCP checkpoint ({METADATA}) nor a Hugging Face one "
        "(*.safetensors); pass a step directory of write-dcp or an HF model dir",
    )


def _size(src: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(src, "*")) if os.path.isfile(p))


def save_torch(snapshot: Any, path: str, *, model_only: bool = False) -> str:
    """One ``torch.save`` file of the version (tensors by native name, plus the train state unless
    ``model_only``): written beside ``path``, fsynced, renamed."""
    state: dict[str, Any] = {
        n: exact_storage(t) for n, t in snapshot.items() if not (model_only and n.startswith("optim."))
    }
    if not model_only:
        state.update({k: v for k, v in snapshot.objects.items() if k not in state})
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        torch.save(state, tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(path))
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def convert(
    src: str,
    out: str,
    *,
    to: str,
    adapter: str | None = None,
    dtype: str | None = None,
    model_only: bool = False,
    prefix: str | None = None,
    hf_config: str | None = None,
    max_shard_size: str = "5GB",
    step: int | None = None,
) -> str:
    """Convert the checkpoint directory ``src`` (HF or DCP, told apart by its files) to ``to``;
    returns the path written. ``adapter`` maps HF names (load from HF, export to HF); ``dtype``
    casts floating tensors; ``model_only`` drops the optimizer state and train state."""
    if to not in FORMATS:
        raise StagerError(ErrorCode.BAD_VALUE, f"--to must be one of {', '.join(FORMATS)}, not {to!r}")
    src = os.path.abspath(src)
    kind = source_format(src)
    if kind == to:
        raise StagerError(ErrorCode.BAD_VALUE, f"{src} is already a {kind} checkpoint")
    from stager.client import Subscriber
    from stager.dev.launch import DaemonProcess

    # the private daemon's limit: an upper bound (it allocates what the version needs), with room for
    # FP8 weights dequantized or cast wider (up to 4x their bytes on disk), within /dev/shm
    shm = os.statvfs(SHM_DIR)
    limit = min(4 * _size(src) + (64 << 20), shm.f_blocks * shm.f_frsize)
    with DaemonProcess(args=("--memory-limit", str(limit), "--keep", "1")) as daemon:
        if kind == "hf":
            from stager.loaders.load_hf import load_hf

            loaded = load_hf(
                src,
                endpoint=daemon.endpoint,
                adapter=adapter,
                dtype=dtype,
                prefix=prefix,
                step=step,
                recipe_state=not model_only,
            )
        else:
            from stager.loaders.load_dcp import load_dcp

            loaded = load_dcp(src, endpoint=daemon.endpoint, step=step, model_only=model_only)
        if to == "dcp":
            from stager.writers.write_dcp import write_dcp

            return write_dcp(out, endpoint=daemon.endpoint, step=loaded["step"])[0]
        if to == "hf":
            from stager.writers.export_hf import export_hf

            return export_hf(
                out,
                endpoint=daemon.endpoint,
                step=loaded["step"],
                adapter=adapter,
                dtype=dtype,
                prefix=prefix,
                hf_config=hf_config,
                max_shard_size=max_shard_size,
                progress=False,
            )[0]
        with Subscriber(daemon.endpoint) as sub, sub.at(loaded["step"]) as snap:
            return save_torch(snap, out, model_only=model_only)
