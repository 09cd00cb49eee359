"""A leased, sealed version as seen by one reader: native or HF names, optional cast, fp8 handling.

Reads are lazy: a tensor is produced when asked for. Same-host tensors that need no transform
are zero-copy views of the daemon's shared memory; a cast, a dequantization or an adapter's
permutation makes a new tensor. Remote readers fetch only what they ask for.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from stager.protocol import Box, ErrorCode, StagerError, TensorLayout
from stager.protocol.dtypes import DTYPES
from stager.protocol.layout import check_box, dense_strides, narrow_box, shard_box
from stager.protocol.quant import QuantSpec, dequantize

from ..adapters import fill_hf, hf_items, is_lora, to_hf_items
from . import delta
from .version import LeasedVersion
from .views import ViewEntry, arrange, native_box
from .wire_cast import index_only, narrows


class Snapshot(Mapping):
    """A leased version: ``{name: tensor}`` in the subscriber's view.

    ``step``, ``seq`` (the daemon's count of sealed versions), ``skipped`` (versions sealed since
    the one this subscriber's iteration gave before), ``objects`` (non-tensor leaves),
    ``model_info``, ``quant`` and ``partial`` describe it. The lease, and the shared memory behind
    zero-copy tensors, is held until :meth:`release`, the end of a ``with`` block, or the reader's
    exit: copy what must outlive it.

    >>> with Subscriber(view="hf").latest() as snap:  # doctest: +SKIP
    ...     model.load_weights(snap.items())                          # vLLM style
    ...     w = snap.get("model.layers.0.mlp.down_proj.weight", shard=(1, tp_rank, tp_size))
    """

    # ``subscriber`` is the Subscriber that leased it (not imported here: it imports this module)
    def __init__(
        self,
        subscriber: Any,
        version: LeasedVersion,
        entries: dict[str, ViewEntry],
        adapter: Any,
        wanted: set[str] | None,
    ):
        self._subscriber = subscriber
        self._version = version
        self._adapter = adapter
        self.lease = version.lease
        self.step = version.step
        self.seq = version.seq
        self.skipped = 0
        self.objects = version.objects
        self.model_info = version.model_info
        self.partial = version.partial
        self.quant: dict[str, QuantSpec] = dict(version.quant)
        self.view = subscriber.view
        self._dtype = subscriber.dtype
        self._keep_fp8 = subscriber.keep_fp8
        self._entries = {n: e for n, e in entries.items() if wanted is None or n in wanted}
        self._eager: dict[str, torch.Tensor] | None = None
        self._released = False
        self._scale_names = {spec.scale for spec in self.quant.values()}

    # ------------------------------------------------------------------ mapping

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        if self._adapter is not None and not entry.source:
            return self._eager_hf()[name]
        native = self._native(entry.source, cast=self._wire_cast(entry.source, self._dtype))
        return dict(self._convert(entry.source, native, only=name))[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(
        self,
        names: Iterable[str] | None = None,  # type: ignore[override]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` pairs in staging order, each native tensor read and converted once:
        what an inference engine's ``load_weights(iterable)`` takes. ``names``: only these (names
        of the view; the others' bytes are not fetched), still in staging order."""
        self._check()
        entries = self._entries if names is None else {n: self._entry(n) for n in names}
        if self._adapter is not None and any(not e.source for e in entries.values()):
            yield from ((n, t) for n, t in self._eager_hf().items() if n in entries)
            return
        casts = {e.source: self._dtype for e in entries.values() if self._wire_cast(e.source, self._dtype)}
        for fqn, t in self._natives(entries, casts):
            yield from self._convert(fqn, t, wanted=entries)

    def load_into(
        self, out: Mapping[str, torch.Tensor], *, since: int | None = None, verify_base: bool | None = None
    ) -> list[str]:
        """Copy tensors of this version into existing ones, ``out = {name in this view: tensor}``
        (an inference engine's parameters, a model's ``state_dict()``), casting to each one's dtype;
        returns the names written, in staging order. Shapes are checked before any byte is read.
        Unlike :meth:`items` nothing is allocated per tensor: the adapter's transforms (the rotary
        permutation) write straight into ``out``, so a new reader's first version costs what a
        later one does.

        ``since=N``: ``out`` holds step N: only the elements that changed since are moved
        (:mod:`.delta`: the change maps of each node's daemon; on its host they are gathered from
        shared memory, from elsewhere only they and their indices cross the wire). That ``out``
        holds N is proven by an earlier ``load_into`` of this process (torch's version counter),
        else (loaded from disk, by another process; or always, with ``verify_base=True``) by
        checksums of ``out`` compared with N's, which the daemon keeps with its maps (~0.3 s of CPU
        per GiB; ``verify_base=False``: never). Tensors not proven, and those a daemon has no map
        for, are read in full: the result is always that of a full read.

        >>> params = dict(model.named_parameters())                  # doctest: +SKIP
        >>> with Subscriber(view="hf").latest() as snap, torch.no_grad():
        ...     snap.load_into(params)
        >>> with sub.latest() as snap, torch.no_grad():              # doctest: +SKIP
        ...     snap.load_into(params, since=step)                     # the step params hold
        """
        self._check()
        entries = {}
        for name, dst in out.items():
            entry = entries[name] = self._entry(name)
            if not isinstance(dst, torch.Tensor) or tuple(dst.shape) != tuple(entry.shape) or not dst.is_contiguous():
                what = list(dst.shape) if isinstance(dst, torch.Tensor) else type(dst).__name__
                raise StagerError(
                    ErrorCode.BAD_VALUE,
                    f"{name}: step {self.step} holds shape {list(entry.shape)}, "
                    f"the tensor to load it into is {what}: pass a contiguous "
                    "tensor of the staged shape (or read it with get())",
                )
        patched = delta.load_changes(
            self, entries, out, since, verify_base
        )  # the ledger forgets out's tensors until done
        for name in patched:
            del entries[name]
        written = self._load_whole(out, entries) | patched
        names = [n for n in self._entries if n in written]
        delta.note_loaded(self, out, names)
        return names

    def _load_whole(self, out: Mapping[str, torch.Tensor], entries: dict[str, ViewEntry]) -> set[str]:
        """Read ``entries`` (checked) whole into ``out``; the names written."""
        if self._adapter is not None and any(not e.source for e in entries.values()):
            for name, t in self._eager_hf().items():  # a whole-dict adapter: converted once, then copied
                if name in entries:
                    out[name].copy_(t)
            return set(entries)
        targets = {name: out[name] for name in entries}
        written: set[str] = set()
        if self._adapter is None:
            # the bytes land in the destination itself (copied from shared memory, or a frame's, or
            # each node's parts): no temporary
            version = self._version
            casts = {n: targets[n].dtype for n in entries if self._wire_cast(n, targets[n].dtype)}
            into = {
                n: targets[n]
                for n, e in entries.items()
                if (n not in self.quant or self._keep_fp8)
                and (targets[n].dtype == DTYPES[version.merged[n].dtype] or n in casts)
            }
            order = {n: i for i, n in enumerate(self._entries)}
            for name, _ in version.stream(sorted(into, key=order.__getitem__), into, casts):
                written.add(name)
                del entries[name]
        for fqn, t in self._natives(entries, self._target_casts(entries, targets)):
            if self._adapter is None:
                targets[fqn].copy_(t)
                written.add(fqn)
            else:
                written.update(fill_hf(self._adapter, fqn, t, targets))
        return written

    def _natives(
        self, entries: Mapping[str, ViewEntry], casts: Mapping[str, torch.dtype] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(fqn, tensor)`` of each native tensor behind ``entries``, in staging order, read once
        (dequantized unless keep_fp8); ``casts``: native tensors fetched in the dtype they are turned into."""
        order = {n: i for i, n in enumerate(self._entries)}
        wanted = sorted(entries, key=order.__getitem__)
        sources = list(dict.fromkeys(entries[n].source for n in wanted))
        # scales first (they are small): each float8 tensor is then dequantized as it arrives
        scale_names = list(
            dict.fromkeys(self.quant[s].scale for s in sources if s in self.quant and not self._keep_fp8)
        )
        scales: dict[str, torch.Tensor] = {}
        for i, (fqn, raw) in enumerate(self._version.stream(scale_names + sources, casts=casts)):
            if i < len(scale_names):
                scales[fqn] = raw
            else:
                yield fqn, self._native(fqn, raw, scales)

    def get(self, name: str, *, shard: tuple[int, int, int] | None = None, offsets=None, sizes=None) -> torch.Tensor:
        """``name``, or only the part a reader needs: ``shard=(dim, rank, world)`` (an inference
        tensor-parallel rank's slice, split as ``torch.chunk`` does) or ``offsets`` and ``sizes``.
        Slices are taken after the view's transform; remote readers receive only the slice's bytes
        when the view is a strided view of the staged tensor (renames, transposes, picked experts)."""
        entry = self._entry(name)
        if shard is not None:
            offsets, sizes = shard_box(entry.shape, *shard)
        else:
            offsets, sizes = check_box(name, entry.shape, offsets, sizes)
        version = self._version
        if self.fetches_box(name):  # fetched: only the box's bytes
            mapped = native_box(version.merged[entry.source].shape, entry.strided, offsets, sizes)
            if mapped is not None:
                block = version.read(
                    entry.source, Box(mapped[0], mapped[1]), cast=self._wire_cast(entry.source, self._dtype)
                )
                return self._cast(arrange(block, mapped[2], sizes))
        return narrow_box(self[name], offsets, sizes)

    def fetches_box(self, name: str) -> bool:
        """Whether :meth:`get` of a box of ``name`` fetches only that box: its bytes are not mapped on
        this host (another host's daemon, or ``remote``) and the view is a strided view of the staged
        tensor, not dequantized. Otherwise ``get`` narrows the tensor as :meth:`__getitem__` gives it:
        on the daemon's host a view of its memory (no byte is copied), else read whole."""
        entry = self._entry(name)
        return bool(
            entry.source
            and entry.strided is not None
            and entry.source not in self.quant
            and self._version.mapped(entry.source) is None
        )

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """``(shape, dtype)`` of ``name`` in this view (before the subscriber's cast), from the
        layout: no bytes are read. ``snap.meta("norm.weight")`` -> ``((4096,), torch.bfloat16)``."""
        entry = self._entry(name)
        return entry.shape, entry.dtype

    def specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """``[(name, dtype, shape)]`` of the view in staging order, from the layout (no bytes read):
        what :func:`~stager.client.adapters.hf_names` plans from."""
        self._check()
        return [(n, e.dtype, e.shape) for n, e in self._entries.items()]

    def placement(self) -> dict[str, list[tuple[tuple[int, ...], tuple[int, ...], list[str]]]] | None:
        """A multi-node job's version: per native tensor its regions ``(offset, shape, [nodes
        holding it])`` (what a per-node writer plans from); None for a single node's version."""
        self._check()
        return self._version.placement()

    def regions(self, fqn: str) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        """``[(global_offset, tensor)]`` of the parts of native tensor ``fqn`` this version holds:
        the whole tensor, or each part a partial version holds (the job spans nodes)."""
        self._check()
        return self._version.regions(fqn)

    def is_zero_copy(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a view of the daemon's shared memory (no copy was made): valid only
        while this version is leased, so copy it to keep it. Same-host reads of tensors that need
        no transform are; casts, permutations and frames from another host are the reader's own."""
        self._check()
        return self._version.shares(t)

    # ------------------------------------------------------------------ conversion

    def _entry(self, name: str) -> ViewEntry:
        self._check()
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not in step {self.step}'s {self.view} view"
                + (" (or not among the subscriber's names)" if self._subscriber.names else "")
            ) from None

    def _native(
        self, fqn: str, raw: torch.Tensor | None = None, scales: dict | None = None, cast: torch.dtype | None = None
    ) -> torch.Tensor:
        t = raw if raw is not None else self._version.read(fqn, cast=cast)
        spec = self.quant.get(fqn)
        if spec is not None and not self._keep_fp8:
            scale = (scales or {}).get(spec.scale)
            scale = scale if scale is not None else self._version.read(spec.scale)
            t = dequantize(t, scale, spec, self._dtype)
        return t

    def _convert(
        self, fqn: str, t: torch.Tensor, only: str | None = None, wanted: Any = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The view's tensors of native tensor ``fqn`` (``t``: as :meth:`_native` gives it)."""
        items = [(fqn, t)] if self._adapter is None else hf_items(self._adapter, fqn, t)
        wanted = self._entries if wanted is None else wanted
        for name, out in items:
            if name in wanted and (only is None or name == only):
                yield name, self._cast(out)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self._dtype
        if dtype is None or t.dtype == dtype or not t.is_floating_point():
            return t
        if self._keep_fp8 and t.dtype.itemsize == 1:
            return t  # fp8 data stays fp8 on request
        return t.to(dtype)

    def _wire_cast(self, fqn: str, to: torch.dtype | None) -> torch.dtype | None:
        """``to`` when native ``fqn`` may be fetched already cast to it (:mod:`.wire_cast`: the
        reader's own cast would give the same bytes), else None."""
        if fqn in self.quant or fqn in self._scale_names or not index_only(self._adapter):
            return None
        return to if narrows(self._version.merged[fqn].dtype, to) else None

    def _target_casts(
        self, entries: Mapping[str, ViewEntry], targets: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.dtype]:
        """Per native tensor, the dtype to fetch it in for :meth:`load_into`: that of every
        destination it fills, when they agree and :meth:`_wire_cast` allows it."""
        wanted: dict[str, set[torch.dtype]] = {}
        for name, e in entries.items():
            wanted.setdefault(e.source, set()).add(targets[name].dtype)
        return {fqn: next(iter(d)) for fqn, d in wanted.items() if len(d) == 1 and self._wire_cast(fqn, next(iter(d)))}

    def _eager_hf(self) -> dict[str, torch.Tensor]:
        if self._eager is None:  # plug-in adapters convert whole dicts
            native = {f: self._native(f) for f in self._version.merged if f not in self._scales()}
            self._eager = {n: self._cast(t) for n, t in to_hf_items(self._adapter, native.items())}
        return self._eager

    def _scales(self) -> set[str]:
        return set() if self._keep_fp8 else {s.scale for s in self.quant.values()}

    # ------------------------------------------------------------------ lease

    def _check(self) -> None:
        if self._released:
            raise StagerError(ErrorCode.UNKNOWN_LEASE, f"snapshot of step {self.step} was released")

    def release(self) -> None:
        """End the lease: the daemon may reuse the memory, so drop the tensors first."""
        if not self._released:
            self._released = True
            self._eager = None
            self._version.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Snapshot(step={self.step}, view={self.view!r}, tensors={len(self._entries)}, partial={self.partial})"


def view_entries(
    tensors: tuple[TensorLayout, ...], quant: dict[str, QuantSpec], adapter: Any, keep_fp8: bool, index_cache: dict
) -> dict[str, ViewEntry]:
    """The names a reader sees: whole native tensors minus the scales dequantization consumes, or
    their HF names (cached per layout: the adapter runs on meta tensors once per layout)."""
    hidden = set() if keep_fp8 else {spec.scale for spec in quant.values()}
    native = []
    for t in tensors:
        if t.fqn in hidden or not t.complete or (adapter is not None and is_lora(t.fqn)):
            continue  # partial tensors (the job spans nodes) are read with Snapshot.regions(); LoRA is no HF tensor
        shown = DTYPES[quant[t.fqn].dtype] if t.fqn in quant and not keep_fp8 else t.torch_dtype
        native.append((t.fqn, shown, t.shape))
    if adapter is None:
        return {fqn: ViewEntry(fqn, fqn, shape, dt, (shape, dense_strides(shape), 0)) for fqn, dt, shape in native}
    key = (id(adapter), tuple(native))
    entries = index_cache.get(key)
    if entries is None:
        from .views import hf_index

        if len(index_cache) > 8:
            index_cache.clear()
        entries = index_cache[key] = hf_index(adapter, native)
    return entries
