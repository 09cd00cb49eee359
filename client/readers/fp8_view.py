"""FP8 on read: ``Subscriber(view="hf", quantize="fp8-block")`` gives each weight an FP8 checkpoint of the
architecture quantizes (:mod:`stager.client.adapters.fp8_scope`) as e4m3 ``<module>.weight`` plus fp32
``<module>.weight_scale_inv``, HF's checkpoint names, what vLLM's ``load_weights`` takes for a model served
with ``quantization="fp8"`` and block scales.

The quantizer is :func:`stager.protocol.fp8_block.quantize_block_fp8` (vLLM's ``per_block_cast_to_fp8``,
bit for bit), applied by the reader to the HF tensor as the adapter gives it, before the subscriber's
``dtype`` cast: fp32 master weights are rounded once, to e4m3, not to bf16 first. ``export-hf --quantize
fp8-block`` writes the same bytes. A reader on the daemon's host quantizes what it maps (0.12-0.27 s per
100 MiB of bf16 on one core here, against 11-17 ms for a bf16 ``load_into``: bench/bench_fp8.py). A remote
reader asks the daemon to quantize each weight the adapter only renames or reorders the rows of
(``LeasedVersion.read_fp8``, per request: :mod:`stager.daemon.read_fp8`; for the rotary permutation of q and
k the daemon gathers the rows in HF order first, so its blocks are the HF tensor's), so e4m3 and scales cross
the wire, the same bytes; weights the adapter computes otherwise are read as staged and quantized here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch

from stager.protocol import ErrorCode, StagerError
from stager.protocol.dtypes import FLOAT8_DTYPES
from stager.protocol.fp8_block import E4M3, quantize_block_fp8, scale_shape

from ..adapters import hf_items, to_hf_items
from ..adapters.fp8_scope import QUANTIZE_CHOICES, Fp8Scope, fp8_scope, scale_name
from .snapshot import Snapshot
from .version import LeasedVersion
from .views import ViewEntry


class Quantized(NamedTuple):
    """A weight FP8 block-quantized by its daemon (what :meth:`Fp8Snapshot._native` gives for it)."""

    data: torch.Tensor
    scale_inv: torch.Tensor


def renamed(entry: ViewEntry, native_shape: tuple[int, ...]) -> bool:
    """Whether the view's tensor ``entry`` is its whole native tensor renamed (same shape, same order) or
    with its rows reordered (``entry.rows``: the rotary permutation; the daemon gathers them first)."""
    return len(native_shape) == 2 and entry.whole_native(native_shape)


def check_quantize(quantize: str | None, view: str, dtype: torch.dtype | None, keep_fp8: bool) -> None:
    """A Subscriber's ``quantize`` against its other options (ValueError, as for a wrong ``view``)."""
    if quantize is None:
        if dtype in FLOAT8_DTYPES:  # a plain cast has no scale: values past 448 would be NaN, small ones zero
            raise ValueError(
                f"dtype {dtype} would cast without scales: ask for quantize='fp8-block' (e4m3 weights "
                "plus weight_scale_inv, view='hf'), or keep_fp8=True for float8 data as staged"
            )
        return
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES} or None, not {quantize!r}")
    if view != "hf":
        raise ValueError("quantize='fp8-block' picks weights by their HF names: pass view='hf'")
    if keep_fp8:
        raise ValueError("quantize='fp8-block' and keep_fp8=True both choose how float8 data is served: pass one")
    if dtype in FLOAT8_DTYPES:
        raise ValueError(
            f"dtype {dtype} with quantize='fp8-block': dtype is that of the tensors left in high "
            "precision (norms, embeddings), e.g. torch.bfloat16"
        )


def fp8_entries(entries: dict[str, ViewEntry], scope: Fp8Scope) -> tuple[dict[str, ViewEntry], dict[str, str]]:
    """The view's entries with each quantized weight as e4m3 and its scales right after it, and
    ``{weight: scale name}``. Neither is a strided view of a staged tensor (a remote slice reads the whole
    weight: the scales need whole blocks)."""
    out: dict[str, ViewEntry] = {}
    quantized: dict[str, str] = {}
    for name, e in entries.items():
        if scope.eligible(name, e.shape, e.dtype):
            scale = scale_name(name)
            if scale in entries:
                raise StagerError(
                    ErrorCode.BAD_VALUE,
                    f"{name}: the version already holds a tensor named {scale}, "
                    "which its FP8 scales would replace; rename that tensor, or "
                    "keep the module in high precision (quantization_config."
                    "modules_to_not_convert)",
                )
            out[name] = ViewEntry(name, e.source, e.shape, E4M3, None)
            out[scale] = ViewEntry(scale, e.source, scale_shape(e.shape, scope.block), torch.float32, None)
            quantized[name] = scale
        else:
            out[name] = e
    return out, quantized


class Fp8Snapshot(Snapshot):
    """A :class:`Snapshot` whose in-scope weights are read FP8 block-quantized. ``fp8``: ``{weight name:
    scale name}``; ``fp8_block``: the rows and columns one scale covers."""

    def __init__(
        self,
        subscriber: Any,
        version: LeasedVersion,
        entries: dict[str, ViewEntry],
        adapter: Any,
        wanted: set[str] | None,
        hf_config: dict | None,
        cache: dict,
    ):
        if adapter is None:
            raise StagerError(ErrorCode.BAD_VALUE, "quantize='fp8-block' reads HF names: pass view='hf'")
        scope = fp8_scope(adapter, hf_config)
        key = ("fp8", id(entries), scope)
        cached = cache.get(key)
        if cached is None or cached[0] is not entries:  # the view's entries are cached per layout: so are these
            cached = cache[key] = (entries, *fp8_entries(entries, scope))
        super().__init__(subscriber, version, cached[1], adapter, wanted)
        self.fp8_block = scope.block
        self.fp8 = {w: s for w, s in cached[2].items() if w in self._entries or s in self._entries}
        self._fp8_sources = {cached[1][w].source for w in cached[2]}
        # native tensor -> its quantized weight, where the weight is the native tensor renamed: its daemon
        # may quantize it (read_fp8), the same bytes as quantizing it here
        self._renamed = {
            cached[1][w].source: w
            for w in self.fp8
            if entries[w].source
            and renamed(entries[w], version.merged[entries[w].source].shape)
            and entries[w].source not in self.quant
        }
        self._rows = {fqn: entries[w].rows for fqn, w in self._renamed.items() if entries[w].rows is not None}

    def _native(
        self, fqn: str, raw: torch.Tensor | None = None, scales: dict | None = None, cast: torch.dtype | None = None
    ) -> Any:
        if raw is None and fqn in self._renamed:  # quantized by its daemon when remote: e4m3 and scales cross
            quantized = self._version.read_fp8(fqn, self.fp8_block, self._rows.get(fqn))
            if quantized is not None:
                return Quantized(*quantized)
        return super()._native(fqn, raw, scales, cast)

    def _natives(
        self, entries: Mapping[str, ViewEntry], casts: Mapping[str, torch.dtype] | None = None
    ) -> Iterator[tuple[str, Any]]:
        """:meth:`Snapshot._natives`; renamed weights come from :meth:`_native` (the daemon quantizes them
        when it can), in staging order between runs of the others, which are streamed."""
        order = {n: i for i, n in enumerate(self._entries)}
        run: dict[str, ViewEntry] = {}
        done = set()  # a weight's source, read once for the weight and its scales
        for name in sorted(entries, key=order.__getitem__):
            source = entries[name].source
            if source not in self._renamed:
                run[name] = entries[name]
                continue
            if run:
                yield from super()._natives(run, casts)
                run = {}
            if source not in done:
                done.add(source)
                yield source, self._native(source)
        if run:
            yield from super()._natives(run, casts)

    def _wire_cast(self, fqn: str, to: torch.dtype | None) -> torch.dtype | None:
        # a weight quantized to e4m3 is rounded once, from the staged precision: never fetched cast
        return None if fqn in self._fp8_sources else super()._wire_cast(fqn, to)

    def _convert(
        self, fqn: str, t: torch.Tensor, only: str | None = None, wanted: Any = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        wanted = self._entries if wanted is None else wanted
        keep = lambda n: n in wanted and (only is None or n == only)  # noqa: E731
        if isinstance(t, Quantized):  # a renamed weight, quantized by its daemon
            name = self._renamed[fqn]
            for n, x in ((name, t.data), (self.fp8[name], t.scale_inv)):
                if keep(n):
                    yield n, x
            return
        for name, out in hf_items(self._adapter, fqn, t):
            yield from self._quantized(name, out, keep)

    def _quantized(self, name: str, t: torch.Tensor, keep) -> Iterator[tuple[str, torch.Tensor]]:
        """``name``'s tensors in this view that ``keep`` accepts: e4m3 data and scales, or the cast tensor."""
        scale = self.fp8.get(name)
        if scale is None:
            if keep(name):
                yield name, self._cast(t)
            return
        if not (keep(name) or keep(scale)):
            return
        data, scale_inv = quantize_block_fp8(t, self.fp8_block)
        for n, x in ((name, data), (scale, scale_inv)):
            if keep(n):
                yield n, x

    def load_into(self, out: Mapping[str, torch.Tensor]) -> list[str]:
        """:meth:`Snapshot.load_into`; quantized weights and their scales are quantized, then copied (an
        engine's e4m3 parameters and fp32 scales). Every shape, and the dtype of every quantized weight and
        scale, is checked before any byte is written: ``copy_`` would cast e4m3 values into a bf16 parameter
        without their scales."""
        scales = set(self.fp8.values())
        quantized = [n for n in out if n in self.fp8 or n in scales]
        if not quantized:
            return super().load_into(out)
        for name in quantized:
            entry, dst = self._entry(name), out[name]
            if not isinstance(dst, torch.Tensor) or tuple(dst.shape) != tuple(entry.shape):
                what = list(dst.shape) if isinstance(dst, torch.Tensor) else type(dst).__name__
                raise StagerError(
                    ErrorCode.BAD_VALUE,
                    f"{name}: step {self.step} holds shape {list(entry.shape)} "
                    f"(FP8 block-quantized), the tensor to load it into is {what}",
                )
            if dst.dtype != entry.dtype:
                what = "its FP8 block scales" if name in scales else "an FP8 block-quantized weight"
                raise StagerError(
                    ErrorCode.BAD_VALUE,
                    f"{name}: step {self.step} holds {what} as {entry.dtype}, the "
                    f"tensor to load it into is {dst.dtype}; load it into a "
                    f"{entry.dtype} tensor (an engine's FP8 parameter), or read "
                    "without quantize='fp8-block' for high-precision weights",
                )
        plain = {n: t for n, t in out.items() if n not in self.fp8 and n not in scales}
        written = set(super().load_into(plain)) if plain else set()
        for name, t in self.items(quantized):
            out[name].copy_(t)
            written.add(name)
        return [n for n in self._entries if n in written]

    def _eager_hf(self) -> dict[str, torch.Tensor]:
        if self._eager is None:  # a whole-dict adapter: converted once, quantized as it comes
            native = {f: self._native(f) for f in self._version.merged if f not in self._scales()}
            self._eager = {
                n: x
                for name, t in to_hf_items(self._adapter, native.items())
                for n, x in self._quantized(name, t, lambda n: True)
            }
        return self._eager
