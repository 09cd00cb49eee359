"""Delta updates: an engine at step N brought to step M by moving only what changed (the daemon's change maps).

The engine is at N when its last update completed whole (every name, no failure since): the backend
records N's step, the daemon's seq for it and the daemon session (:class:`Base`). The daemon is asked
(one ``counts`` request, before any weight changes) what changed from N to M in the engine's dtype
(``stager serve --change-maps float32,bfloat16``: the union of the per-version maps, values from M).
A daemon without that chain (maps off, not kept, another session, a layout change) gives no
:class:`Delta`: the update reads the version in full, as before. Otherwise:

- tensors that did not change are not read at all;
- on the direct path (:mod:`.direct`), a copied parameter (norm, embedding, an unpacked weight) gets
  its changed elements written in place: their values gathered from the daemon's shared memory on
  its host, or indices plus values as frames from another (through the llama3 adapter's rotary
  permutation too: the indices are mapped to the HF rows); one the map calls dense is read whole;
- a linear the CPU backend packs (no ``layer.weight`` kept: nothing to patch) is rebuilt only if one
  of its shards changed, from M's tensors (zero-copy views on the daemon's host);
- on vLLM's layerwise reload (the direct plan not proven), only the layers that changed are fed, each
  with all its checkpoint tensors (a layer fed in part would be built with garbage in the rest); the
  layers fed nothing get their serving tensors back untouched.

Verification (``verify=True``) still compares every tensor with M: what a delta did not write is right
only if the engine held N, which is the one thing a delta cannot check for itself.

vLLM's own sparse path, ``load_checkpoint_weight_patches`` (NaN-masked ``copy_`` through
``model.load_weights``), is not used: on the CPU backend its loads into packed linears fail (they keep
no weight), and for the rest it builds a full NaN tensor per patched tensor (bench/bench_vllm.py
``--delta`` measures it against this path).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from stager.client.readers.engine_changes import TensorChange, base_of, changes_since
from stager.protocol.changes import INDICES, UNCHANGED

from . import plan as _plan
from .direct import Plan


@dataclasses.dataclass(frozen=True)
class Base:
    """The version the engine's weights hold, as a change map's start: step, the daemon's seq for it,
    the daemon session, the dtype the engine reads in."""

    step: int
    seq: int
    session: str
    dtype: torch.dtype


def base(snap, dtype: torch.dtype) -> Base | None:
    """The :class:`Base` of a version an update just loaded whole (None: no map can start from it)."""
    got = base_of(snap)
    return None if got is None else Base(*got, dtype)


@dataclasses.dataclass
class Delta:
    """What changed from the engine's base to the leased step, per checkpoint name (kinds and counts)."""

    since: int
    changes: dict[str, TensorChange]

    def changed(self, name: str) -> bool:
        return self.changes[name].kind != UNCHANGED

    def stats(self) -> dict:
        kinds = [c.kind for c in self.changes.values()]
        return {
            "since": self.since,
            "unchanged": kinds.count(UNCHANGED),
            "indices": kinds.count(INDICES),
            "whole": len(kinds) - kinds.count(UNCHANGED) - kinds.count(INDICES),
            "elements": sum(c.count for c in self.changes.values() if c.kind == INDICES),
        }


def find(snap, held: Base | None, names: list[str]) -> tuple[Delta | None, str]:
    """The changes from ``held`` to ``snap``'s step for ``names`` (one request, nothing written), or
    (None, why the update reads in full)."""
    if held is None:
        return None, "the engine's weights are not one complete version known to stager"
    got = changes_since(snap, names, (held.step, held.seq, held.session), held.dtype, values=False)
    if got is None:
        return None, f"the daemon has no change map from step {held.step} in {held.dtype} (stager serve --change-maps)"
    return Delta(held.step, got), ""


@dataclasses.dataclass
class Work:
    """One layer group's share of a delta update on the direct path."""

    whole: list[str]  # read whole: copied tensors the map calls whole, every shard of a changed packed layer
    patch: list[str]  # copied tensors with changed element indices
    skipped: int


def direct_work(direct: Plan, delta: Delta, group: list[str]) -> Work:
    """What the direct path reads for ``group``: packed layers are rebuilt from all their shards when
    one changed; copied tensors are patched, read whole, or skipped."""
    whole, patch, skipped = [], [], 0
    changed_modules = {id(direct.targets[n].module) for n in group if direct.targets[n].packed and delta.changed(n)}
    for name in group:
        t = direct.targets[name]
        if t.packed:
            if id(t.module) in changed_modules:
                whole.append(name)
            else:
                skipped += 1
        elif not delta.changed(name):
            skipped += 1
        elif delta.changes[name].kind == INDICES:
            patch.append(name)
        else:
            whole.append(name)
    return Work(whole, patch, skipped)


def patches(snap, held: Base, names: list[str]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """``{name: (indices, values)}`` for ``names`` (copied parameters the map gives indices for), and
    the names that came without them (seen through a transform other than a rename or a row order,
    or changed since the first request):
    read those whole."""
    if not names:
        return {}, []
    got = changes_since(snap, names, (held.step, held.seq, held.session), held.dtype, values=True)
    if got is None:  # the maps went between two requests of one update (evicted): read these whole
        return {}, list(names)
    out, whole = {}, []
    for name in names:
        c = got[name]
        if c.kind == INDICES and c.indices is not None:
            out[name] = (c.indices, c.values)
        elif c.kind != UNCHANGED:
            whole.append(name)
    return out, whole


def changed_layers(model: torch.nn.Module, delta: Delta, names: Iterable[str]) -> list[str]:
    """The names to feed vLLM's layerwise reload: every checkpoint tensor of a layer (vLLM module) with
    one that changed. Names whose module is not found by vLLM's naming (same name, or the model's
    ``packed_modules_mapping``: fused experts, say) go together per decoder layer."""
    names = list(names)
    modules = dict(model.named_modules())
    packed = getattr(model, "packed_modules_mapping", None) or {}
    groups = {n: i for i, g in enumerate(_plan.layer_groups(names)) for n in g}

    def key(name: str) -> str:
        mod, _, _ = name.rpartition(".")
        if mod in modules:
            return mod
        parent, _, leaf = mod.rpartition(".")
        for merged, parts in packed.items():
            if leaf in parts and f"{parent}.{merged}" in modules:
                return f"{parent}.{merged}"
        return f"group {groups[name]}"

    keys = {n: key(n) for n in names}
    hit = {keys[n] for n in names if delta.changed(n)}
    return [n for n in names if keys[n] in hit]
