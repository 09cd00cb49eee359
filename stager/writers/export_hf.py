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

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm import tqdm

from stager.client.adapters import HFTensor, hf_items, hf_names, is_lora, is_per_tensor, resolve_adapter, to_hf_items
from stager.client.adapters.fp8_scope import QUANTIZE_CHOICES, fp8_scope, scale_name
from stager.client.readers.snapshot import Snapshot
from stager.formats.integrity import MANIFEST, entry, spec_entry, write_manifest
from stager.formats.safetensors_io import write_safetensors
from stager.protocol import ErrorCode, StagerError
from stager.protocol.dtypes import parse_dtype
from stager.protocol.fp8_block import E4M3, quantize_block_fp8, scale_shape
from stager.writers.export_peft import write_peft
from stager.writers.persist import for_each_version, step_directory, step_path

log = logging.getLogger("stager.export")
RECIPE_TENSORS, RECIPE_JSON = "recipe_state.safetensors", "recipe_state.json"
PEFT_DIR = "adapter"  # a full export's LoRA in PEFT format: PeftModel.from_pretrained(base, "<export>/adapter")
_SKIP_ASSETS = re.compile(r"(\.safetensors|\.bin|\.pt|\.index\.json)$|^(config|recipe_state)\.json$")


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


def _layout(snapshot: Any) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``[(name, dtype, shape)]``: a Snapshot's from its layout (no bytes read); a plain mapping's
    from its (in-memory) tensors."""
    if isinstance(snapshot, Snapshot):
        return snapshot.specs()
    return [(name, t.dtype, tuple(t.shape)) for name, t in snapshot.items()]


def _hf_tensors(snapshot: Any, adapter: Any, plan: list[HFTensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The planned HF tensors in plan order, reading each needed native tensor once, in staging
    order (a remote snapshot streams them with requests in flight); about one native tensor's
    conversions are held at a time. A whole-dict adapter converts the whole snapshot once."""
    if is_per_tensor(adapter):
        sources = list(dict.fromkeys(p.source for p in plan))
        native = snapshot.items(sources) if isinstance(snapshot, Snapshot) else ((n, snapshot[n]) for n in sources)
        converted = (item for name, t in native for item in hf_items(adapter, name, t))
    else:
        converted = iter(to_hf_items(adapter, snapshot.items()))
    pending: dict[str, torch.Tensor] = {}
    planned = {p.name for p in plan}
    for p in plan:
        while p.name not in pending:
            item = next(converted, None)
            if item is None:
                raise StagerError(
                    ErrorCode.BAD_VALUE,
                    f"{p.name}: planned (from meta tensors) but the adapter did not "
                    "produce it from the data; the adapter must give the same names "
                    "for meta and real tensors",
                )
            if item[0] in planned:  # an exporter of some files only: the others' tensors are dropped
                pending[item[0]] = item[1]
            item = None  # held only in pending: a tensor is freed as soon as it is written
        yield p.name, pending.pop(p.name)


def _export_tensors(snapshot: Any, ep: ExportPlan, indices: list[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """The planned tensors ``indices`` in order: :func:`_hf_tensors`, with each FP8 weight quantized as it
    comes (from its precision as staged: one rounding) into its e4m3 data and scales."""
    weight_of = {s: w for w, s in ep.quant.items()}
    by_name = {t.name: t for t in ep.tensors}
    wanted = [ep.tensors[i].name for i in indices]
    sources = list(dict.fromkeys(weight_of.get(n, n) for n in wanted))
    converted = _hf_tensors(snapshot, ep.adapter, [by_name[n] for n in sources])
    keep = set(wanted)
    held: dict[str, torch.Tensor] = {}
    for name in wanted:
        if name not in held:
            hf_name, tensor = next(converted)
            if hf_name in ep.quant:
                data, scale_inv = quantize_block_fp8(tensor, ep.block)
                held.update((n, t) for n, t in ((hf_name, data), (ep.quant[hf_name], scale_inv)) if n in keep)
            else:
                held[hf_name] = tensor
            tensor = None  # held only in held: freed once written
        yield name, held.pop(name)


@dataclasses.dataclass
class ExportPlan:
    """What an export writes, from the layout alone: HF tensors, their dtypes and sizes, and the
    files (indices into ``tensors`` per file, and each file's name)."""

    adapter: Any
    config: dict
    cast: torch.dtype | None
    tensors: list[HFTensor]
    dtypes: list[torch.dtype]
    sizes: list[int]
    files: list[list[int]]
    names: list[str]
    quant: dict[str, str] = dataclasses.field(default_factory=dict)  # FP8: weight name -> its scales' name
    block: tuple[int, int] | None = None  # FP8: the rows and columns one scale covers (None: not quantized)


def plan_export(
    snapshot: Any,
    *,
    adapter: str | Any | None = None,
    hf_config: dict | str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    prefix: str | None = None,
    quantize: str | None = None,
) -> ExportPlan:
    """The export of ``snapshot`` planned from its layout on meta tensors: no data touched. ``quantize``:
    ``"fp8-block"`` plans the weights an FP8 checkpoint of the architecture quantizes as e4m3 plus their
    ``weight_scale_inv`` right after them (:mod:`stager.client.adapters.fp8_scope`)."""
    model_info = getattr(snapshot, "model_info", None) or {}
    adapter_obj, config, _ = resolve_adapter(adapter, hf_config, model_info, require_config=True, prefix=prefix)
    try:
        cast = parse_dtype(dtype) if dtype is not None else None
    except ValueError as exc:
        raise StagerError(ErrorCode.BAD_VALUE, str(exc)) from None
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise StagerError(ErrorCode.BAD_VALUE, f"quantize must be one of {QUANTIZE_CHOICES}, not {quantize!r}")
    max_bytes = parse_shard_size(max_shard_size)
    plan = hf_names(adapter_obj, [x for x in _layout(snapshot) if not is_lora(x[0])])  # LoRA: export_peft
    want = [cast if cast is not None and p.dtype.is_floating_point else p.dtype for p in plan]
    config = dict(config)
    # a version loaded from an FP8 checkpoint carries its quantization_config: true only of an FP8 export
    quantization = config.pop("quantization_config", None)
    quant: dict[str, str] = {}
    block = None
    if quantize is not None:
        scope = fp8_scope(adapter_obj, {**config, "quantization_config": quantization})
        block = scope.block
        config["quantization_config"] = scope.quantization_config()
        plan, want = _plan_fp8(plan, want, scope, quant)
    sizes = [torch.Size(p.shape).numel() * dt.itemsize for p, dt in zip(plan, want)]
    files = plan_shards(sizes, max_bytes)
    names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{n:05d}-of-{len(files):05d}.safetensors" for n in range(1, len(files) + 1)]
    )
    return ExportPlan(adapter_obj, config, cast, plan, want, sizes, files, names, quant, block)


def _plan_fp8(
    plan: list[HFTensor], want: list[torch.dtype], scope, quant: dict[str, str]
) -> tuple[list[HFTensor], list[torch.dtype]]:
    """``plan`` with each weight ``scope`` quantizes as e4m3 and its fp32 scales right after it (so a file
    holds both, and the exporter keeps one tensor's quantization at a time); ``quant`` gets their names."""
    # partial: (name, shape) of weights with edge blocks
    out = []
    dtypes = []
    partial = []
    for p, dt in zip(plan, want):
        if not scope.eligible(p.name, p.shape, p.dtype):
            out.append(p)
            dtypes.append(dt)
            continue
        scale = HFTensor(scale_name(p.name), p.source, scale_shape(p.shape, scope.block), torch.float32, None)
        out += [p, scale]
        dtypes += [E4M3, torch.float32]
        quant[p.name] = scale.name
        if p.shape[0] % scope.block[0] or p.shape[1] % scope.block[1]:
            partial.append((p.name, list(p.shape)))
    if partial:  # vLLM and DeepSeek's loaders read them; transformers tells the block from the scale grid
        log.warning(
            "%d FP8 weights (e.g. %s %s) have partial %s blocks: vLLM and stager load-hf read them, "
            "transformers (5.23) refuses or misreads them",
            len(partial),
            *partial[0],
            list(scope.block),
        )
    return out, dtypes


def write_files(
    snapshot: Any,
    ep: ExportPlan,
    which: list[int],
    tmp: str,
    manifest: dict,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> dict[str, str]:
    """Write the planned files ``which`` (indices into ``ep.files``) into ``tmp``, each native
    tensor read once; their manifest entries go to ``manifest``. Returns their weight map."""
    tensors = _export_tensors(snapshot, ep, [i for f in which for i in ep.files[f]])
    crcs: dict[str, str] = {}  # of the bytes as written, computed while writing them
    weight_map = {}
    for f in which:
        indices = ep.files[f]
        specs = [(ep.tensors[i].name, ep.tensors[i].shape, ep.dtypes[i]) for i in indices]

        def produce(indices=indices) -> Iterator[tuple[str, torch.Tensor]]:
            for i in indices:
                hf_name, tensor = next(tensors)
                tensor = tensor.to(ep.dtypes[i]).contiguous()
                yield hf_name, tensor
                manifest[hf_name] = entry(tensor, crcs.pop(hf_name))  # resumed once it is written

        write_safetensors(
            os.path.join(tmp, ep.names[f]), specs, produce, {"format": "pt"}, on_bytes=on_bytes, checksums=crcs
        )
        weight_map.update({spec[0]: ep.names[f] for spec in specs})
    return weight_map


def write_recipe_state(
    snapshot: Any, ep: ExportPlan, tmp: str, prefix: str | None, manifest: dict, skip_lora: bool = False
) -> int:
    """The training state beside the weights, so a run resumes from this HF checkpoint (torchtune's
    recipe state, without pickle): every staged tensor the export does not carry (the optimizer's),
    under its native name, in ``recipe_state.safetensors``, and the step and non-tensor state in
    ``recipe_state.json``. ``load-hf`` brings both back. Their manifest entries go to ``manifest``
    (``stager verify`` checks them). Returns the tensors written."""
    from stager.formats.integrity import json_objects

    exported = {p.source for p in ep.tensors}
    if "" in exported:  # a whole-dict adapter says nothing per tensor: the model is what is under the prefix
        prefix = prefix if prefix is not None else (getattr(snapshot, "model_info", None) or {}).get("prefix")
        exported = {n for n, _, _ in _layout(snapshot) if prefix is None or n.startswith(prefix)}
    rest = [
        (n, tuple(shape), dt)
        for n, dt, shape in _layout(snapshot)
        if n not in exported and not (skip_lora and is_lora(n))
    ]
    if rest:
        names = [n for n, _, _ in rest]
        items = snapshot.items(names) if isinstance(snapshot, Snapshot) else ((n, snapshot[n]) for n in names)
        crcs: dict[str, str] = {}
        write_safetensors(
            os.path.join(tmp, RECIPE_TENSORS),
            rest,
            lambda: ((n, t.contiguous()) for n, t in items),
            {"format": "pt"},
            checksums=crcs,
        )
        manifest.update({n: spec_entry(dt, shape, crcs[n]) for n, shape, dt in rest})
    _write_json(
        os.path.join(tmp, RECIPE_JSON),
        {"step": snapshot.step, "objects": json_objects(getattr(snapshot, "objects", {}) or {})},
    )
    return len(rest)


def finish_export(tmp: str, ep: ExportPlan, step: int, weight_map: dict, manifest: dict, hf_assets: str | None) -> None:
    """What is written once every file is: the index (sharded), config.json, assets, manifest."""
    missing = [t.name for t in ep.tensors if t.name not in weight_map]
    if missing:  # never publish an export with a hole (e.g. writers that planned apart)
        raise StagerError(
            ErrorCode.INTERNAL,
            f"{len(missing)} planned tensors were not written (e.g. {missing[0]}); "
            "nothing was published, please report this",
        )
    if len(ep.files) > 1:
        _write_json(
            os.path.join(tmp, "model.safetensors.index.json"),
            {"metadata": {"total_size": sum(ep.sizes)}, "weight_map": weight_map},
        )
    config = dict(ep.config)
    if ep.cast is not None:
        config["torch_dtype"] = str(ep.cast).removeprefix("torch.")
    _write_json(os.path.join(tmp, "config.json"), config)
    if hf_assets:
        for asset in sorted(os.listdir(hf_assets)):
            src = os.path.join(hf_assets, asset)
            if os.path.isfile(src) and not _SKIP_ASSETS.search(asset) and asset != MANIFEST:
                shutil.copyfile(src, os.path.join(tmp, asset))
    write_manifest(tmp, step, "hf", manifest)


def export_snapshot(
    snapshot: Any,
    out_dir: str,
    *,
    adapter: str | Any | None = None,
    hf_config: dict | str | None = None,
    hf_assets: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    progress: bool | None = None,
    on_export: Callable[[dict], None] | None = None,
    prefix: str | None = None,
    recipe_state: bool = False,
    peft: bool = False,
    adapter_only: bool = False,
    lora_alpha: float | None = None,
    base_model: str | None = None,
    quantize: str | None = None,
) -> str:
    """Write one snapshot to ``out_dir/step-N``: a leased :class:`~stager.client.Snapshot` (native
    view) or any mapping name -> tensor with ``step`` and ``model_info``.

    The adapter and HF config are this call's (``adapter``: built-in name, ``module:attr`` or an
    object; ``hf_config``: dict or config.json path), else the staged model_info's (see
    :func:`~stager.client.adapters.resolve_adapter`; ``prefix``: only the tensors under it are the
    model, e.g. ``"model."``). ``recipe_state``: the optimizer and train state go along
    (:func:`write_recipe_state`), so a run resumes from the export. ``peft``: the version's LoRA
    weights also go out in PEFT's format (:mod:`.export_peft`; ``lora_alpha`` unless staged in
    ``model_info["lora"]``), in the export's ``adapter/``; ``adapter_only``: only them, at the top,
    for the base model ``base_model`` (a path or hub id that adapter_config.json names). ``quantize="fp8-block"``:
    the weights an FP8 checkpoint of the architecture quantizes are written as e4m3 plus fp32
    ``weight_scale_inv`` (vLLM's quantizer, :mod:`stager.protocol.fp8_block`), with config.json's
    ``quantization_config``; without it, a staged config's ``quantization_config`` is left out (the
    tensors are not quantized). Shapes come from the layout and each
    native tensor's bytes are read once. ``progress``: a progress bar on stderr (default: when
    stderr is a terminal). Returns the directory. The export's own time (plan, read, convert,
    write, fsync, rename) and size are logged at INFO and given to ``on_export`` as
    ``{"exported": dir, "step": N, "seconds": s, "bytes": tensor bytes, "files": safetensors files}``.

    >>> export_snapshot(snap, "/ckpt/hf", dtype="bfloat16", on_export=print)  # doctest: +SKIP
    {'exported': '/ckpt/hf/step-00000007', 'step': 7, 'seconds': 4.2, 'bytes': 2471559168, 'files': 1}
    '/ckpt/hf/step-00000007'
    """
    started = time.monotonic()
    if adapter_only and os.path.exists(os.path.join(step_path(out_dir, snapshot.step), "config.json")):
        raise StagerError(
            ErrorCode.BAD_VALUE,
            f"{step_path(out_dir, snapshot.step)} is a full export: an adapter-only "
            "export would replace it; give the adapter its own --out",
        )
    ep = plan_export(
        snapshot,
        adapter=adapter,
        hf_config=hf_config,
        dtype=dtype,
        max_shard_size=max_shard_size,
        prefix=prefix,
        quantize=quantize,
    )
    manifest: dict[str, dict] = {}
    show = sys.stderr.isatty() if progress is None else progress
    with (
        tqdm(
            total=sum(ep.sizes),
            desc=f"export step {snapshot.step}",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not show,
            file=sys.stderr,
            leave=False,
        ) as bar,
        step_directory(out_dir, snapshot.step) as tmp,
    ):
        if peft or adapter_only:
            names = [n for n, _, _ in _layout(snapshot)]
            if adapter_only:
                write_peft(snapshot, names, ep.adapter, tmp, alpha=lora_alpha, base=base_model, manifest=manifest)
            else:  # a subdirectory: from_pretrained of the export itself gives the base model, not base + LoRA
                os.makedirs(os.path.join(tmp, PEFT_DIR))
                write_peft(
                    snapshot,
                    names,
                    ep.adapter,
                    os.path.join(tmp, PEFT_DIR),
                    alpha=lora_alpha,
                    base=step_path(os.path.abspath(out_dir), snapshot.step),
                )
        if adapter_only:
            write_manifest(tmp, snapshot.step, "peft", manifest)
        else:
            weight_map = write_files(snapshot, ep, list(range(len(ep.files))), tmp, manifest, bar.update)
            if recipe_state:
                write_recipe_state(snapshot, ep, tmp, prefix, manifest, skip_lora=peft)
            finish_export(tmp, ep, snapshot.step, weight_map, manifest, hf_assets)
    final = step_path(out_dir, snapshot.step)
    seconds = time.monotonic() - started
    total = sum(ep.sizes)
    log.info(
        "exported step %d to %s in %.2fs (%d files, %.2f GiB, %.2f GB/s)",
        snapshot.step,
        final,
        seconds,
        len(ep.files),
        total / 2**30,
        total / 1e9 / max(seconds, 1e-9),
    )
    if on_export is not None:
        on_export(
            {
                "exported": final,
                "step": snapshot.step,
                "seconds": round(seconds, 3),
                "bytes": total,
                "files": len(ep.files),
            }
        )
    return final


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def export_hf(
    out_dir: str,
    *,
    endpoint: str | None = None,
    step: int | None = None,
    follow: bool = False,
    every: int = 1,
    keep: int | None = None,
    max_exports: int | None = None,
    on_written: Callable[[str], None] | None = None,
    on_report: Callable[[dict], None] | None = None,
    **options: Any,
) -> list[str]:
    """Export the version ``step`` (default: the newest) or, with ``follow``, each new version at
    least ``every`` steps after the last export (woken by the daemon's announcements), until
    interrupted (or ``max_exports``); the ``keep`` newest exports are kept. ``options``: adapter,
    hf_config, hf_assets, dtype, max_shard_size, progress, on_export (see :func:`export_snapshot`)."""
    return for_each_version(
        lambda snap: export_snapshot(snap, out_dir, **options),
        out_dir,
        endpoint=endpoint,
        step=step,
        follow=follow,
        every=every,
        keep=keep,
        max_writes=max_exports,
        on_written=on_written,
        on_report=on_report,
    )
