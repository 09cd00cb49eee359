"""`stager export-hf`: write sealed versions as Hugging Face checkpoints, beside the trainer.

Each export goes to ``OUT/step-00000042`` (and ``OUT/latest`` points at the newest): sharded
``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, or one
``model.safetensors`` when it fits a shard, plus ``config.json`` and any HF asset files. The
directory is written under a temporary name, fsynced and renamed: an interrupted export never
leaves a directory that looks complete. Tensors are converted one at a time (the snapshot is
read zero-copy from the daemon), so the extra memory is about one tensor.

>>> export_hf("/ckpt/hf", adapter="llama3", hf_config="config.json", dtype="bfloat16")  # doctest: +SKIP
'/ckpt/hf/step-00001000'
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from typing import Any, Iterator

import torch

from stager.adapters import load_adapter, to_hf_items
from stager.protocol import ErrorCode, StagerError
from stager.integrity import MANIFEST, entry, write_manifest
from stager.persist import for_each_version, step_directory
from stager.safetensors_io import write_safetensors

log = logging.getLogger("stager.export")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SKIP_ASSETS = re.compile(r"(\.safetensors|\.bin|\.pt|\.index\.json)$|^config\.json$")


def parse_shard_size(text: str | int) -> int:
    """HF's size convention: ``"5GB"`` = 5 * 10**9 bytes, ``"5GiB"`` = 5 * 2**30.

    >>> parse_shard_size("5GB"), parse_shard_size("2MiB")
    (5000000000, 2097152)
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if not match:
        raise ValueError(f"cannot read shard size {text!r}; write e.g. 5GB, 500MB or 2GiB")
    number, unit, binary = match.groups()
    power = " KMGT".index(unit or " ")
    return int(float(number) * ((1 << 10 * power) if binary else 10 ** (3 * power)))


def plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Greedy, in order: indices of the tensors per shard; a tensor larger than a shard goes alone.

    >>> plan_shards([4, 4, 4, 9, 1], 8)
    [[0, 1], [2], [3], [4]]
    """
    shards: list[list[int]] = []
    current, used = [], 0
    for i, size in enumerate(sizes):
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        shards.append(current)
    return shards


def _load_config(hf_config: dict | str | None, model_info: dict | None) -> dict:
    if hf_config is None:
        hf_config = (model_info or {}).get("hf_config")
    if isinstance(hf_config, str):
        with open(hf_config) as f:
            hf_config = json.load(f)
    if not isinstance(hf_config, dict):
        raise StagerError(ErrorCode.BAD_VALUE, "no HF config: pass hf_config (a dict or a config.json path), or "
                                               "stage with model_info={'hf_config': ...}")
    return hf_config


class _Progress:
    """One line on a terminal (stderr), silent otherwise."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, max(total, 1), 0
        self.enabled = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            pct = 100 * self.done / self.total
            sys.stderr.write(f"\r{self.label}: {pct:5.1f}% {self.done / 2**30:.2f}/{self.total / 2**30:.2f} GiB")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def export_snapshot(snapshot: Any, out_dir: str, *, adapter: str | Any | None = None,
                    hf_config: dict | str | None = None, hf_assets: str | None = None,
                    dtype: str | torch.dtype | None = None, max_shard_size: str | int = "5GB") -> str:
    """Write one snapshot (a mapping name -> tensor with ``step`` and ``model_info``) to ``out_dir/step-N``."""
    model_info = getattr(snapshot, "model_info", None) or {}
    config = _load_config(hf_config, model_info)
    spec = adapter if adapter is not None else model_info.get("adapter", "identity")
    adapter_obj = load_adapter(spec, config) if isinstance(spec, str) else spec
    cast = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise StagerError(ErrorCode.BAD_VALUE, f"dtype must be one of {sorted(DTYPES)}")
    max_bytes = parse_shard_size(max_shard_size)
    names = list(snapshot.keys())

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return cast if cast is not None and t.is_floating_point() else t.dtype

    # Plan on meta tensors: names, shapes and dtypes of the HF tensors without touching data.
    plan: list[tuple[str, tuple, torch.dtype, str]] = []  # hf name, shape, dtype, native source
    for name in names:
        t = snapshot[name]
        meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
        for hf_name, hf_t in to_hf_items(adapter_obj, [(name, meta)]):
            plan.append((hf_name, tuple(hf_t.shape), out_dtype(hf_t), name))
    if len({p[0] for p in plan}) != len(plan):
        raise StagerError(ErrorCode.BAD_VALUE, "the adapter maps two tensors to the same HF name")
    sizes = [torch.Size(shape).numel() * dt.itemsize for _, shape, dt, _ in plan]
    shards = plan_shards(sizes, max_bytes)

    progress = _Progress(f"export step {snapshot.step}", sum(sizes))
    manifest: dict[str, dict] = {}
    with step_directory(out_dir, snapshot.step) as tmp:
        weight_map = {}
        for number, indices in enumerate(shards, 1):
            filename = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            specs = [(plan[i][0], plan[i][1], plan[i][2]) for i in indices]

            def produce(indices=indices) -> Iterator[tuple[str, torch.Tensor]]:
                cache_name, cache = None, {}
                for i in indices:
                    hf_name, _, want, source = plan[i]
                    if source != cache_name:  # convert each native tensor once per shard
                        cache_name, cache = source, dict(to_hf_items(adapter_obj, [(source, snapshot[source])]))
                    tensor = cache.pop(hf_name).to(want).contiguous()
                    manifest[hf_name] = entry(tensor)  # of the bytes as written
                    yield hf_name, tensor

            write_safetensors(os.path.join(tmp, filename), specs, produce, {"format": "pt"}, on_bytes=progress)
            weight_map.update({spec[0]: filename for spec in specs})
        if len(shards) > 1:
            _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})
        config = dict(config)
        if cast is not None:
            config["torch_dtype"] = str(cast).removeprefix("torch.")
        _write_json(os.path.join(tmp, "config.json"), config)
        if hf_assets:
            for asset in sorted(os.listdir(hf_assets)):
                src = os.path.join(hf_assets, asset)
                if os.path.isfile(src) and not _SKIP_ASSETS.search(asset) and asset != MANIFEST:
                    shutil.copyfile(src, os.path.join(tmp, asset))
        write_manifest(tmp, snapshot.step, "hf", manifest)
    final = os.path.join(out_dir, f"step-{snapshot.step:08d}")
    log.info("exported step %d to %s (%d files, %.2f GiB)", snapshot.step, final, len(shards), sum(sizes) / 2**30)
    return final


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def export_hf(out_dir: str, *, endpoint: str | None = None, step: int | None = None, follow: bool = False,
              every: int = 1, keep: int | None = None, max_exports: int | None = None, poll: float = 1.0,
              **options: Any) -> list[str]:
    """Export the version ``step`` (default: the newest) or, with ``follow``, each new version at
    least ``every`` steps after the last export, until interrupted (or ``max_exports``); the ``keep``
    newest exports are kept. ``options``: adapter, hf_config, hf_assets, dtype, max_shard_size
    (see :func:`export_snapshot`)."""
    return for_each_version(lambda snap: export_snapshot(snap, out_dir, **options), out_dir, endpoint=endpoint,
                            step=step, follow=follow, every=every, keep=keep, max_writes=max_exports, poll=poll)
