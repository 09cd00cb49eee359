"""`stager load-hf DIR`: a Hugging Face checkpoint into the daemon as a sealed version.

The checkpoint (sharded safetensors + index, or one ``model.safetensors``) is checked first
(:mod:`.hf_checkpoint`: every header, the index, the files it names), then planned on meta
tensors: HF names go through the adapter's ``from_hf`` group by group (one tensor, or all experts
of one projection of one layer, which DeepSeek-V3's adapter merges into one grouped tensor), FP8
block-quantized weights (``w`` beside ``w_scale_inv``) become their dequantized tensor in the
training dtype, and whatever ``from_hf`` passes through unchanged is marked *direct*. Only then
is the step begun (:class:`~.ingest.IngestSession`, a one-rank staging client): a direct tensor's
bytes go from the file straight into the daemon's shared memory file (``sendfile``: the kernel
copies page cache to shared memory, this process never maps the segment; ``preadv`` into the
frames' buffers when the daemon is on another host); the others (permuted q/k rows, merged
experts, dequantized weights) are read into memory, converted, and written in, at most
``memory_budget`` bytes of them at a time. Tensors are copied in parallel by ``threads``
threads, files interleaved. Any failure aborts the step: no version is left behind.

The version's ``model_info`` records where it came from: ``adapter`` (a built-in name),
``hf_config`` (the checkpoint's own config.json, read here) and ``source``
(``{"format": "hf", "path", "files", "quantized"}``); ``prefix`` when given.

>>> load_hf("/models/Llama-3.2-1B", adapter="llama3", dtype="bfloat16")  # doctest: +SKIP
{'step': 0, 'nbytes': 2471559168, 'tensors': 147, 'seconds': 1.9, 'files': 1, 'quantized': 0}
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re
import threading
import time
from typing import Any

import torch

from stager.client.adapters import BUILT_IN, load_adapter, with_prefix
from stager.client.adapters.config import LOAD_HF, check_config
from stager.client.hook.flatten import COMPANION_SCALES
from stager.formats.hf_checkpoint import (
    RECIPE,
    CheckpointError,
    HFCheckpoint,
    StoredTensor,
    open_checkpoint,
    read_header,
    read_into,
    read_json,
    read_tensor,
)
from stager.protocol import ErrorCode, StagerError, dtype_name
from stager.protocol.dtypes import FLOAT8_DTYPES, parse_dtype
from stager.protocol.quant import QuantSpec, dequantize, scale_blocks

from .ingest import IngestSession, SegmentFile, SegmentRange, no_trainer_hint

log = logging.getLogger("stager.loaders")
_EXPERT = re.compile(r"\.experts\.\d+\.")
MEMORY_BUDGET = 1 << 30  # bytes of converted tensors held at once (a larger single group runs alone)


@dataclasses.dataclass(frozen=True)
class Source:
    """One HF tensor as the adapter sees it: its stored bytes, the dtype it is given in, and the
    scale it is dequantized with (FP8 block-quantized weights)."""

    stored: StoredTensor
    dtype: torch.dtype
    scale: StoredTensor | None = None
    block: tuple[int, ...] | None = None  # the block one scale value covers, as the config says


HF_FP8_BLOCK = 128  # DeepSeek-V3's (and HF's fine-grained FP8) blocks, when the config does not say


def weight_block_size(config: dict | None, data_shape=(), scale_shape=()) -> tuple[int, ...] | None:
    """The block one scale value covers in an FP8 checkpoint: the config's
    ``quantization_config.weight_block_size``; else 128 along each dimension where 128-wide blocks
    (the last one short) give the scale's size; else None (equal blocks).

    >>> weight_block_size({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    (128, 128)
    >>> weight_block_size(None, (300, 200), (3, 2)), weight_block_size(None, (6, 4), (3, 1))
    ((128, 128), None)
    """
    block = check_config("load-hf", LOAD_HF, config, fix="fix the checkpoint's config.json")[
        "quantization_config.weight_block_size"
    ]
    if block is not None:
        return tuple(block)
    if (
        scale_shape
        and len(scale_shape) == len(data_shape)
        and all(-(-d // HF_FP8_BLOCK) == s for d, s in zip(data_shape, scale_shape))
    ):
        return (HF_FP8_BLOCK,) * len(data_shape)
    return None


@dataclasses.dataclass
class Group:
    """HF tensors that ``from_hf`` converts together, and the native tensors they give:
    ``direct`` (native name -> HF name) are read straight into place, ``computed`` converted."""

    sources: dict[str, Source]
    direct: dict[str, str]
    computed: list[str]

    def compute_bytes(self, natives: dict) -> int:
        if not self.computed:
            return 0
        held = sum(_nbytes(s.stored.shape, s.dtype) for s in self.sources.values())
        return held + sum(_nbytes(natives[n][1], natives[n][0]) for n in self.computed)


@dataclasses.dataclass
class LoadPlan:
    """``natives``: every native tensor ``{name: (dtype, shape)}`` in plan order; ``groups`` in
    file order; ``quantized``: the number of dequantized tensors."""

    natives: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    groups: list[Group]
    quantized: int


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def group_key(hf_name: str) -> str:
    """HF tensors converted together: all experts of one projection of a layer share a key.

    >>> group_key("model.layers.3.mlp.experts.17.up_proj.weight"), group_key("model.norm.weight")
    ('model.layers.3.mlp.experts.*.up_proj.weight', 'model.norm.weight')
    """
    return _EXPERT.sub(".experts.*.", hf_name)


def training_dtype(config: dict | None) -> torch.dtype:
    """What FP8 weights are dequantized to by default: the config's ``torch_dtype`` (or ``dtype``)
    when it names a high-precision floating dtype, else bfloat16."""
    for key in ("torch_dtype", "dtype"):
        value = (config or {}).get(key)
        if isinstance(value, str):
            try:
                dtype = parse_dtype(value)
            except ValueError:
                continue
            if dtype.is_floating_point and dtype not in FLOAT8_DTYPES and dtype.itemsize > 1:
                return dtype
    return torch.bfloat16


def sources_of(ckpt: HFCheckpoint, cast: torch.dtype | None, fp8_dtype: torch.dtype) -> tuple[dict[str, Source], int]:
    """The HF tensors the adapter sees: FP8 data paired with its ``_scale_inv`` / ``_scale``
    (the scale itself is not a tensor of the model), each given in its target dtype."""
    tensors = ckpt.tensors
    scales: dict[str, str] = {}
    blocks: dict[str, tuple[int, ...] | None] = {}
    for name, t in tensors.items():
        if t.dtype in FLOAT8_DTYPES:
            for suffix in COMPANION_SCALES:
                scale = tensors.get(name + suffix)
                if scale is not None and scale.dtype.is_floating_point and scale.dtype not in FLOAT8_DTYPES:
                    blocks[name] = weight_block_size(ckpt.config, t.shape, scale.shape)
                    try:
                        scale_blocks(name, t.shape, scale.shape, blocks[name])
                    except StagerError as exc:
                        raise CheckpointError(scale.path, exc.message, scale.name) from None
                    scales[name] = name + suffix
                    break
    consumed = set(scales.values())
    out: dict[str, Source] = {}
    for name, t in tensors.items():
        if name in consumed:
            continue
        if name in scales:
            out[name] = Source(t, cast or fp8_dtype, tensors[scales[name]], blocks[name])
        elif cast is not None and t.dtype.is_floating_point and t.dtype not in FLOAT8_DTYPES:
            out[name] = Source(t, cast)
        else:
            out[name] = Source(t, t.dtype)
    return out, len(scales)


def _adapter_failure(group: dict[str, Source], adapter: Any, exc: Exception) -> CheckpointError:
    first = next(iter(group.values())).stored
    message = exc.message if isinstance(exc, StagerError) else f"{exc.__class__.__name__}: {exc}"
    name = first.name if len(group) == 1 else group_key(first.name)
    return CheckpointError(
        first.path,
        f"the {getattr(adapter, 'NAME', type(adapter).__name__)} adapter cannot map it ({message})"[:600],
        name,
    )


def plan_load(ckpt: HFCheckpoint, adapter: Any, *, cast: torch.dtype | None = None) -> LoadPlan:
    """Plan on meta tensors (no tensor bytes read): native names, dtypes and shapes, grouped."""
    sources, quantized = sources_of(ckpt, cast, training_dtype(ckpt.config))
    by_key: dict[str, dict[str, Source]] = {}
    for name, src in sources.items():
        by_key.setdefault(group_key(name), {})[name] = src
    natives: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    origin: dict[str, str] = {}
    groups: list[Group] = []
    for members in by_key.values():
        metas = {name: torch.empty(s.stored.shape, dtype=s.dtype, device="meta") for name, s in members.items()}
        try:
            out = adapter.from_hf(dict(metas))
        except Exception as exc:  # the adapter's own typed error, or a shape it could not view
            raise _adapter_failure(members, adapter, exc) from None
        direct: dict[str, str] = {}
        computed: list[str] = []
        for native, t in out.items():
            hf = next((n for n, m in metas.items() if m is t), None)
            if not isinstance(t, torch.Tensor):
                raise _adapter_failure(members, adapter, TypeError(f"from_hf gave {type(t).__name__} for {native}"))
            if native in natives:
                raise CheckpointError(
                    members[next(iter(members))].stored.path,
                    f"maps to native {native!r}, as {origin[native]} does",
                    next(iter(members)),
                )
            natives[native] = (t.dtype, tuple(t.shape))
            origin[native] = next(iter(members))
            src = members.get(hf) if hf is not None else None
            if src is not None and src.scale is None and src.dtype == src.stored.dtype:
                direct[native] = hf
            else:
                computed.append(native)
        groups.append(Group(members, direct, computed))
    return LoadPlan(natives, groups, quantized)


class _Budget:
    """Bytes of converted tensors held at once; one request larger than the budget runs alone."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


def _materialize(src: Source, fds: dict[str, int]) -> torch.Tensor:
    t = src.stored
    data = read_tensor(t, fds[t.path])
    if src.scale is not None:
        scale = read_tensor(src.scale, fds[src.scale.path])
        spec = QuantSpec(src.scale.name, "mul", dtype_name(src.dtype))
        return dequantize(data, scale, spec, src.dtype, src.block)
    return data if data.dtype == src.dtype else data.to(src.dtype)


def _copy_direct(src: StoredTensor, dst: torch.Tensor | SegmentRange, fds: dict, seg: SegmentFile | None) -> None:
    """A tensor stored as it is staged: its file bytes go into place with no copy in this process."""
    if not isinstance(dst, SegmentRange):
        read_into(src, dst, fds[src.path])
        return
    if src.dtype != dst.dtype or src.nbytes != dst.nbytes:
        raise CheckpointError(
            src.path, f"cannot be read into a {dst.dtype} tensor of shape {list(dst.shape)}", src.name
        )
    try:
        got = seg.copy_from(fds[src.path], src.start, dst)
    except OSError as exc:
        raise CheckpointError(src.path, f"cannot be read ({exc.strerror or exc})", src.name) from None
    if got < dst.nbytes:
        raise CheckpointError(
            src.path,
            f"ends {dst.nbytes - got} bytes short of the tensor's end: the file was truncated while loading",
            src.name,
        )


def _fill_group(
    group: Group, adapter: Any, plan: LoadPlan, dsts: dict, fds: dict, budget: _Budget, seg: SegmentFile | None = None
) -> None:
    for native, hf in group.direct.items():
        _copy_direct(group.sources[hf].stored, dsts[native], fds, seg)
    if not group.computed:
        return
    need = group.compute_bytes(plan.natives)
    budget.acquire(need)
    try:
        real = {name: _materialize(src, fds) for name, src in group.sources.items()}
        try:
            out = adapter.from_hf(real)
        except Exception as exc:
            raise _adapter_failure(group.sources, adapter, exc) from None
        del real
        for native in group.computed:
            t = out.get(native)
            dtype, shape = plan.natives[native]
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                first = next(iter(group.sources.values())).stored
                raise CheckpointError(
                    first.path,
                    f"the adapter gave {native!r} other names, shapes or dtypes for real tensors than for meta tensors",
                    first.name,
                )
            if isinstance(dsts[native], SegmentRange):
                seg.write(t, dsts[native])
            else:
                with torch.no_grad():
                    dsts[native].copy_(t)
    finally:
        budget.release(need)


def _interleave_by_file(groups: list[Group]) -> list[Group]:
    """Groups in round-robin over files, so the threads read different files at once."""
    per_file: dict[str, list[Group]] = {}
    for g in groups:
        per_file.setdefault(next(iter(g.sources.values())).stored.path, []).append(g)
    queues = list(per_file.values())
    out: list[Group] = []
    while queues:
        out.extend(q.pop(0) for q in queues)
        queues = [q for q in queues if q]
    return out


def fill(
    plan: LoadPlan,
    adapter: Any,
    dsts: dict[str, torch.Tensor | SegmentRange],
    *,
    threads: int,
    memory_budget: int = MEMORY_BUDGET,
    segment_file: SegmentFile | None = None,
) -> None:
    """Write every native tensor of ``plan`` into ``dsts``: tensors (e.g. the daemon's segment
    views, or buffers) or ranges of ``segment_file``."""
    paths = sorted(
        {s.stored.path for g in plan.groups for s in g.sources.values()}
        | {s.scale.path for g in plan.groups for s in g.sources.values() if s.scale is not None}
    )
    fds: dict[str, int] = {}
    budget = _Budget(memory_budget)
    futures: list[concurrent.futures.Future] = []
    try:
        for path in paths:
            try:
                fds[path] = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(path, f"cannot be opened ({exc.strerror or exc})") from None
        ordered = _interleave_by_file(plan.groups)
        if threads <= 1:
            for g in ordered:
                _fill_group(g, adapter, plan, dsts, fds, budget, segment_file)
            return
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="stager-load") as pool:
            futures = [pool.submit(_fill_group, g, adapter, plan, dsts, fds, budget, segment_file) for g in ordered]
            try:
                for f in concurrent.futures.as_completed(futures):
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        if any(not f.done() for f in futures):
            # interrupted again while the pool drained: writers still run, and a descriptor closed
            # under them could be reused by another file they would then write into
            if segment_file is not None:
                segment_file.leave_open()
        else:
            for fd in fds.values():
                os.close(fd)


def add_recipe_state(ckpt: HFCheckpoint, plan: LoadPlan) -> dict:
    """The training state an export carried beside the weights (``export-hf --recipe-state``):
    its tensors join the plan under their native names, read straight into place; returns the
    step and non-tensor state of ``recipe_state.json`` (``{}`` when there is none)."""
    path = os.path.join(ckpt.directory, RECIPE)
    meta_path = os.path.join(ckpt.directory, "recipe_state.json")
    if not os.path.exists(meta_path):
        return {}
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("objects", {}), dict):
        raise CheckpointError(meta_path, 'is not a recipe state ({"step": N, "objects": {...}})')
    if os.path.exists(path):
        for name, t in read_header(path).items():
            if name in plan.natives:
                raise CheckpointError(path, "is also a tensor of the model", name)
            plan.natives[name] = (t.dtype, t.shape)
            plan.groups.append(Group({name: Source(t, t.dtype)}, {name: name}, []))
    return meta


def resolve(adapter: str | Any | None, config: dict | None, prefix: str | None) -> tuple[Any, str | None]:
    """The adapter object (``prefix`` put before every native name) and the built-in name that the
    version's model_info records (None for a plug-in: staged data names only built-in adapters)."""
    spec = adapter if adapter is not None else "identity"
    obj = load_adapter(spec, config) if isinstance(spec, str) else spec
    name = spec if isinstance(spec, str) and spec in BUILT_IN else None
    return with_prefix(obj, prefix), name


def load_hf(
    directory: str,
    *,
    endpoint: str | None = None,
    adapter: str | Any | None = None,
    step: int | None = None,
    dtype: str | torch.dtype | None = None,
    prefix: str | None = None,
    threads: int | None = None,
    memory_budget: int = MEMORY_BUDGET,
    timeout: float = 30.0,
    backpressure_timeout: float = 0.0,
    recipe_state: bool = True,
) -> dict:
    """Load the HF checkpoint in ``directory`` into the daemon as sealed version ``step``.

    ``adapter``: built-in name (``llama3``, ``qwen3``, ``deepseek_v3``, default ``identity``: HF
    names kept), ``module:attr`` or an object with ``from_hf``; it gets the checkpoint's
    config.json. ``dtype``: cast floating tensors (and FP8 dequantization's target; default the
    config's torch_dtype, else bfloat16). ``prefix``: put before every native name (``"model."``
    for a job that stages ``{"model": ..., "optim": ...}``). Returns ``{"step", "nbytes",
    "tensors", "seconds", "files", "quantized"}``. ``recipe_state``: the optimizer and train state
    an ``export-hf --recipe-state`` put beside the weights come along (the step too, unless given).
    Raises :class:`CheckpointError` (naming the file and tensor) for a damaged checkpoint or a name
    the adapter does not know; nothing is sealed then.
    """
    started = time.monotonic()
    try:
        cast = parse_dtype(dtype) if dtype is not None else None
    except ValueError as exc:
        raise StagerError(ErrorCode.BAD_VALUE, str(exc)) from None
    ckpt = open_checkpoint(directory)
    adapter_obj, adapter_name = resolve(adapter, ckpt.config, prefix)
    plan = plan_load(ckpt, adapter_obj, cast=cast)
    recipe = add_recipe_state(ckpt, plan) if recipe_state else {}
    if step is None:
        step = recipe["step"] if type(recipe.get("step")) is int else 0
    model_info: dict[str, Any] = {
        "source": {"format": "hf", "path": ckpt.directory, "files": len(ckpt.files), "quantized": plan.quantized}
    }
    if adapter_name is not None:
        model_info["adapter"] = adapter_name
    if ckpt.config is not None:
        model_info["hf_config"] = ckpt.config
    if prefix:
        model_info["prefix"] = prefix
    # tensors of one file too are copied in parallel: the kernel's copies overlap in part (here 2
    # threads copy 10-20% faster than 1, bench/bench_shm_copy.py; allocating new pages takes the
    # segment file's lock)
    threads = threads or max(1, min(len(plan.groups), os.cpu_count() or 1, 8))
    try:
        with IngestSession(endpoint, step=step, timeout=timeout, backpressure_timeout=backpressure_timeout) as s:
            dsts = s.begin(plan.natives, mapped=False)
            fill(plan, adapter_obj, dsts, threads=threads, memory_budget=memory_budget, segment_file=s.segment_file)
            sealed = s.commit(objects=recipe.get("objects") or {}, model_info=model_info)
    except StagerError as exc:
        raise no_trainer_hint(exc) from None
    seconds = time.monotonic() - started
    log.info(
        "loaded %s as step %d: %d tensors, %.2f GiB in %.2fs",
        ckpt.directory,
        sealed["step"],
        sealed["tensors"],
        sealed["nbytes"] / 2**30,
        seconds,
    )
    return {**sealed, "seconds": round(seconds, 3), "files": len(ckpt.files), "quantized": plan.quantized}
