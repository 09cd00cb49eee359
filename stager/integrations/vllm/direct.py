"""The direct path: an update written straight into the engine's serving tensors, no layerwise reload.

vLLM's layerwise reload rebuilds each layer on the side, loads it, runs the layer's
``process_weights_after_loading`` and copies the result back: about ten times a memcpy of the
bytes on CPU. For a parameter that holds the checkpoint tensor's bytes in the same layout (a
norm, an embedding's first rows), the update is a copy into it. A linear layer on the CPU
backend keeps no weight at all: ``process_weights_after_loading`` (vLLM's
``dispatch_cpu_unquantized_gemm``) packs it into a oneDNN / sgl handle and drops ``layer.weight``;
an in-place write would reach nothing (measured: the handle is a copy). Its update is that same
function run on the new weight: the checkpoint shards of a merged layer (q/k/v, gate/up), which
is a zero-copy view when they lie next to each other in the daemon's memory, else one copy into a
buffer of the layer's size. Embeddings on CPU keep their weight and also a packed copy (the LM
head's GEMM): the copy is made again after the write.

A :class:`Plan` is only built from proof: after a complete layerwise update, with the version
still leased, each checkpoint name is mapped to the parameter vLLM's loader filled (same name, or
the model's ``packed_modules_mapping`` and the layer's ``output_sizes`` at tensor parallel size 1),
its loader is one that only copies (the default loader, the linear and vocab-embedding loaders),
and the engine's tensors are checked against the version: a copied parameter holds exactly those
bytes; a packed layer rebuilt from the shards gives the same outputs, bit for bit, as the one vLLM
built. Anything else (a quantized method, tensor parallelism, a loader that transforms, a mismatch)
leaves the engine on the layerwise reload. Written against vLLM 0.32 (checked by the real-engine tests).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.model_executor.model_loader.reload import layerwise as _layerwise
from vllm.model_executor.parameter import ModelWeightParameter
from vllm.platforms import current_platform

from stager.protocol.changes import apply

log = logging.getLogger("stager.integrations.vllm")

# loaders that copy the checkpoint tensor (whole, a row range of a merged layer, the first rows of a
# padded vocabulary) and do nothing else: what makes the engine's tensor the loaded tensor
COPY_LOADERS = {
    "default_weight_loader",
    "ColumnParallelLinear.weight_loader",
    "RowParallelLinear.weight_loader",
    "ReplicatedLinear.weight_loader",
    "MergedColumnParallelLinear.weight_loader",
    "QKVParallelLinear.weight_loader",
    "VocabParallelEmbedding.weight_loader",
    # the v2 loaders, for an unquantized ModelWeightParameter (checked): a row range, then a copy
    "ColumnParallelLinear.weight_loader_v2",
    "RowParallelLinear.weight_loader_v2",
    "MergedColumnParallelLinear.weight_loader_v2",
    "QKVParallelLinear.weight_loader_v2",
}
PLAIN = (torch.nn.Parameter, ModelWeightParameter)  # exact classes: loaded as the tensor is
REPACKED = (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)  # exact classes: no quantized subclass


class NotProvable(Exception):
    """A checkpoint tensor the direct path cannot prove it writes as the layerwise reload would."""


@dataclasses.dataclass
class Target:
    """Where one checkpoint tensor goes: rows ``[row, row + rows)`` of ``module.<param>``."""

    module: torch.nn.Module
    param: str
    row: int
    rows: int
    packed: bool  # the module keeps no weight (packed on CPU): rebuilt from all its shards
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass
class Plan:
    targets: dict[str, Target]
    # a packed module's shards, in row order: (name, target) each
    shards: dict[int, list[str]]

    def covers(self, specs: Iterable[tuple[str, Any, tuple[int, ...]]]) -> str | None:
        """None when every tensor of ``specs`` has a proven target of that shape and each packed
        module gets all its shards; else why not."""
        names = set()
        for name, _, shape in specs:
            t = self.targets.get(name)
            if t is None:
                return f"{name} has no proven target"
            if tuple(shape) != t.shape:
                return f"{name}: shape {list(shape)}, the plan's {list(t.shape)}"
            names.add(name)
        for shard_names in self.shards.values():
            got = [n for n in shard_names if n in names]
            if got and len(got) != len(shard_names):
                return f"{shard_names[0]}: a packed layer's shards come in part ({len(got)} of {len(shard_names)})"
        return None


def _loader_name(module: torch.nn.Module, param: str) -> str:
    """The name of the loader vLLM's load used for ``module.<param>`` (from the layer's reload
    metadata: the serving tensor of a packed layer is a bare empty parameter); "" for a parameter
    of a class whose loading may do more than copy."""
    meta = _layerwise.get_layerwise_info(module).restore_metadata[0].get(param)
    loaded = meta if meta is not None else getattr(module, param)
    if type(loaded) not in PLAIN:
        return ""
    loader = _layerwise._get_original_loader(loaded)
    return getattr(getattr(loader, "__func__", loader), "__qualname__", repr(loader))


def _resolve(model: torch.nn.Module, modules: dict[str, torch.nn.Module], name: str, shape: tuple[int, ...]) -> Target:
    """The target of checkpoint tensor ``name``, by vLLM's own naming (same name, or packed)."""
    mod_name, _, param = name.rpartition(".")
    shard, shard_count = 0, 1
    module = modules.get(mod_name)
    if module is None or getattr(module, param, None) is None:
        packed = getattr(model, "packed_modules_mapping", None) or {}
        parent, _, leaf = mod_name.rpartition(".")
        for merged, parts in packed.items():
            if leaf in parts and f"{parent}.{merged}" in modules:
                module = modules[f"{parent}.{merged}"]
                shard = parts.index(leaf)
                shard_count = len(parts)
                break
        else:
            raise NotProvable(f"{name}: no parameter of that name, nor a packed layer holding it")
    if type(getattr(module, "quant_method", None)) not in (*REPACKED, type(None)):
        raise NotProvable(f"{name}: {type(module.quant_method).__name__} transforms the weights")
    if getattr(module, "tp_size", 1) != 1:
        raise NotProvable(f"{name}: tensor parallel size {module.tp_size} (only whole tensors are proven)")
    loader = _loader_name(module, param)
    if loader not in COPY_LOADERS:
        raise NotProvable(f"{name}: its loader {loader or type(getattr(module, param)).__name__} may transform it")
    tensor = getattr(module, param)
    row, rows = 0, shape[0] if shape else 1
    if shard_count > 1:
        sizes = list(getattr(module, "output_sizes", []))
        if len(sizes) != shard_count or sizes[shard] != rows:
            raise NotProvable(f"{name}: the packed layer's output sizes {sizes} do not place it")
        row = sum(sizes[:shard])
    packed = tensor.numel() == 0 and isinstance(getattr(module, "quant_method", None), UnquantizedLinearMethod)
    if not packed:
        fits = (
            tuple(tensor.shape[1:]) == tuple(shape[1:]) and tensor.shape[0] >= row + rows
            if shape
            else tensor.numel() == 1
        )
        if not fits or not tensor.is_contiguous():
            raise NotProvable(f"{name}: the engine's tensor is {list(tensor.shape)}, the checkpoint's {list(shape)}")
    return Target(module, param, row, rows, packed, tuple(shape), tensor.dtype)


def _whole(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The shards of a packed layer as one [N, K] tensor: a view when they lie back to back in one
    storage (the daemon's segment), else one copy."""
    first = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    adjacent = all(t.is_contiguous() and t.dtype == first.dtype and t.device == first.device for t in tensors) and all(
        b.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() and b.data_ptr() == a.data_ptr() + a.nbytes
        for a, b in zip(tensors, tensors[1:])
    )
    if adjacent:
        return first.as_strided((rows, *first.shape[1:]), first.stride())
    return torch.cat(tensors)


def _repack(module: torch.nn.Module, weight: torch.Tensor | None = None) -> None:
    """vLLM's own processing of ``module`` run again (on CPU: pack the GEMM weight), from
    ``weight`` for a packed linear (which keeps no weight once packed)."""
    if weight is not None:
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
    module.quant_method.process_weights_after_loading(module)
    if weight is not None and module.weight.numel() != 0:
        raise RuntimeError(f"{type(module).__name__} kept its weight after packing")  # it would alias the lease


def _repack_on_first_use(module: torch.nn.Module) -> None:
    """The packed copy of a module that keeps its weight (an input embedding: its forward is a lookup
    in ``weight``; vLLM also packs it for a GEMM it serves only as a tied LM head), made from that
    weight by vLLM's own function when the GEMM is first called: exact, and never paid when unused
    (0.42 s for a 32000 x 1024 fp32 embedding here, ten times its copy)."""

    def first_use(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        module.quant_method.process_weights_after_loading(module)  # sets module.cpu_linear from module.weight
        return module.cpu_linear(x, weight, bias)

    module.cpu_linear = first_use


def _needs_repack(module: torch.nn.Module) -> bool:
    return (
        current_platform.is_cpu()
        and type(getattr(module, "quant_method", None)) in REPACKED
        and hasattr(module, "cpu_linear")
    )


def _owners(model: torch.nn.Module, tensor: torch.Tensor) -> list[torch.nn.Module]:
    """Every module that serves with ``tensor`` (a tied LM head shares the embedding's)."""
    return [m for m in model.modules() if any(p is tensor for p in m._parameters.values())]


def build(
    model: torch.nn.Module,
    items: Callable[[list[str]], Iterator[tuple[str, torch.Tensor]]],
    groups: list[list[str]],
    specs: list[tuple[str, Any, tuple[int, ...]]],
) -> tuple[Plan | None, str]:
    """The plan of ``model`` proven against the version it serves (just loaded by the layerwise
    reload), read again through ``items``; (None, why) when any tensor is unproven."""
    modules = dict(model.named_modules())
    try:
        targets = {name: _resolve(model, modules, name, tuple(shape)) for name, _, shape in specs}
    except NotProvable as exc:
        log.info("stager: updates use vLLM's layerwise reload: %s", exc)
        return None, str(exc)
    shards: dict[int, list[str]] = {}
    for name, t in sorted(targets.items(), key=lambda kv: kv[1].row):
        if t.packed:
            shards.setdefault(id(t.module), []).append(name)
    plan = Plan(targets, shards)
    try:
        with torch.no_grad():
            for group in groups:
                got = dict(items(group))
                for name, tensor in got.items():
                    t = targets[name]
                    if not t.packed:
                        held = (
                            getattr(t.module, t.param).data.narrow(0, t.row, t.rows)
                            if tensor.dim()
                            else getattr(t.module, t.param).data
                        )
                        if held.dtype != tensor.dtype or not torch.equal(held, tensor.to(held.device)):
                            raise NotProvable(f"{name}: the engine's tensor differs from the version it loaded")
                for names in shards.values():
                    if names[0] in got:
                        _prove_packed(targets[names[0]].module, [got[n] for n in names], names[0])
    except NotProvable as exc:
        log.info("stager: updates use vLLM's layerwise reload: %s", exc)
        return None, str(exc)
    log.info(
        "stager: updates write the engine's tensors directly (%d tensors, %d packed layers proven)",
        len(targets),
        len(shards),
    )
    return plan, ""


def _prove_packed(module: torch.nn.Module, tensors: list[torch.Tensor], name: str) -> None:
    """The layer rebuilt from ``tensors`` computes what vLLM's build computes, bit for bit; it
    then serves (equal), or vLLM's build is put back."""
    weight, old = module.weight, module.__dict__.get("cpu_linear")
    x = torch.randn(7, tensors[0].shape[1], generator=torch.Generator().manual_seed(0)).to(tensors[0].dtype)
    before = module.quant_method.apply(module, x)
    try:
        _repack(module, _whole(tensors))
        after = module.quant_method.apply(module, x)
    except Exception as exc:
        after, problem = None, f"{type(exc).__name__}: {exc}"
    else:
        problem = None if torch.equal(before, after) else "rebuilt from the version, it computes other outputs"
    if problem is not None:
        module.weight = weight
        if old is not None:
            module.cpu_linear = old
        raise NotProvable(f"{name}: {problem}")


class Writer:
    """One direct update: tensors written group by group, one group behind the reads (a read that
    fails right after a group arrived leaves the engine untouched). ``written``: whether any engine
    tensor changed (a failure afterwards leaves two versions)."""

    def __init__(self, model: torch.nn.Module, plan: Plan):
        self.model = model
        self.plan = plan
        self.written = False
        self._pending: dict[str, torch.Tensor] = {}
        self._patches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._owners: dict[int, list[torch.nn.Module]] = {}

    def add(self, group: dict[str, torch.Tensor], patches: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        """Write the previous group, then hold this one: whole tensors, and ``patches`` (a delta
        update, :mod:`.delta`): ``{name: (flat indices, values)}`` of copied parameters."""
        self.flush()
        self._pending = group
        self._patches = patches or {}

    def flush(self) -> None:
        group, self._pending = self._pending, {}
        patches, self._patches = self._patches, {}
        if not group and not patches:
            return
        repack: dict[int, torch.nn.Module] = {}
        with torch.no_grad():
            for name, tensor in [*group.items(), *patches.items()]:
                t = self.plan.targets[name]
                patch = tensor if isinstance(tensor, tuple) else None
                dtype = patch[1].dtype if patch is not None else tensor.dtype
                if dtype != t.dtype:  # the subscriber reads in the engine's dtype: never reached
                    raise RuntimeError(f"{name}: {dtype} read for an engine tensor of {t.dtype}")
                if t.packed:
                    continue
                dst = getattr(t.module, t.param)
                self.written = True
                # a padded vocabulary's extra rows stay as the vocab loader left them (zeros)
                region = dst.data.narrow(0, t.row, t.rows) if len(t.shape) else dst.data
                if patch is None:
                    region.copy_(tensor)
                else:  # the changed elements only; the region is contiguous (whole rows of a contiguous tensor)
                    apply(region, *patch)
                for owner in self._owners_of(dst):  # a packed copy made from this weight (the LM head's GEMM)
                    if getattr(owner, "weight", None) is dst and _needs_repack(owner):
                        repack[id(owner)] = owner
            for names in self.plan.shards.values():
                if names[0] in group:
                    self.written = True
                    _repack(self.plan.targets[names[0]].module, _whole([group[n] for n in names]))
            for owner in repack.values():
                if owner is getattr(self.model, "lm_head", None):
                    _repack(owner)  # serves every token: packed now, within the update
                else:
                    _repack_on_first_use(owner)

    def _owners_of(self, tensor: torch.Tensor) -> list[torch.nn.Module]:
        if id(tensor) not in self._owners:
            self._owners[id(tensor)] = _owners(self.model, tensor)
        return self._owners[id(tensor)]


def check(
    plan: Plan, items: Callable[[list[str]], Iterator[tuple[str, torch.Tensor]]], groups: list[list[str]]
) -> list[str]:
    """The checkpoint tensors whose engine copy differs from what ``items`` delivers (the version,
    read again): a copied parameter byte for byte, a packed layer by its outputs on a fixed input
    against the layer rebuilt from the version (bit for bit: the same kernel on the same bytes)."""
    bad: list[str] = []
    with torch.no_grad():
        for group in groups:
            got = {n: t for n, t in items(group) if n in plan.targets}
            for name, tensor in got.items():
                t = plan.targets[name]
                if not t.packed:
                    held = getattr(t.module, t.param).data
                    held = held.narrow(0, t.row, t.rows) if tensor.dim() else held
                    if held.dtype != tensor.dtype or not torch.equal(held, tensor.to(held.device)):
                        bad.append(name)
            for names in plan.shards.values():
                if names[0] in got and not _same_outputs(plan.targets[names[0]].module, [got[n] for n in names]):
                    bad.extend(names)  # the packed weight cannot be read back: which shard is unknown
    return bad


def _same_outputs(module: torch.nn.Module, tensors: list[torch.Tensor]) -> bool:
    """Whether the serving ``module`` computes what it computes rebuilt from ``tensors``; the
    serving one is put back either way (the check changes nothing)."""
    weight, serving = module.weight, module.__dict__.get("cpu_linear")
    x = torch.randn(7, tensors[0].shape[1], generator=torch.Generator().manual_seed(1)).to(tensors[0].dtype)
    held = module.quant_method.apply(module, x)
    try:
        _repack(module, _whole(tensors))
        want = module.quant_method.apply(module, x)
    finally:
        module.weight = weight
        if serving is not None:
            module.cpu_linear = serving
    return torch.equal(held, want)
