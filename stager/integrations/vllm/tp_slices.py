"""A tensor-parallel worker reads only its rank's slice of each tensor, learned from vLLM's own loaders.

vLLM's loaders narrow each checkpoint tensor to the rank's part: along the output dim of a
column-parallel linear (q/k/v by heads, gate/up by halves), the input dim of a row-parallel one,
the vocabulary of an embedding. How differs per layer type and per vLLM version, so it is not
computed here: it is watched. On an update that reads a tensor whole, the tensor goes to the
loader as a :class:`Probe` (a real tensor, sharing its data) that records what is done with it.
If the loader only asks metadata (shape, dtype, ...) and takes one ``narrow(dim, start, length)``
of it (or the same basic slice along one dim; vLLM's layerwise reload replays each loader, so
the same narrow twice), that box is the name's slice. Any other use (``copy_`` from it, ``clone``,
``to``, ``view``, indexing, another narrow, a probe still alive once the update ended: something
kept it) makes the name whole. The data of that update are today's: the probe is the tensor.

Later updates of a worker whose reads are fetched (:meth:`Snapshot.fetches_box`: not on the
daemon's host, where tensors are views of its memory and the loader touches only the slice's
pages) read a sliced name's box alone (``Snapshot.get(name, offsets=, sizes=)``) into that region
of a ``torch.empty`` of the whole shape (pages outside it are never written) and hand the loader
that, again as a probe that expects the learned narrow: anything else first fills the rest of the
tensor from the version (a whole read), then runs, and the name is whole from then on. Learned
slices are keyed by (name, shape, dtype, tp rank, tp size) and dropped with :meth:`Slices.forget`
(re-init, shutdown, ``forget_base``). Needs torch only (vLLM: :func:`worker_rank_size`);
tests/test_vllm_tp_slices.py.
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

log = logging.getLogger("stager.integrations.vllm")

Box = tuple[int, int, int]  # (dim, start, length)
Event = tuple  # ("narrow", dim, start, length) or ("use", what)

_T = torch.Tensor
# what a loader may ask of a probe without reading its data
META = {
    *(
        getattr(_T, attr).__get__
        for attr in (
            "shape",
            "dtype",
            "device",
            "ndim",
            "is_meta",
            "is_cuda",
            "is_cpu",
            "layout",
            "requires_grad",
            "itemsize",
            "nbytes",
            "is_quantized",
            "is_sparse",
        )
    ),
    _T.size,
    _T.dim,
    _T.ndimension,
    _T.numel,
    _T.nelement,
    _T.element_size,
    _T.is_floating_point,
    _T.is_complex,
    _T.is_contiguous,
    _T.get_device,
    _T.__len__,
}
NARROWS = {_T.narrow, torch.narrow}


def _int(x: Any) -> bool:
    return type(x) is int  # not bool, not a tensor or symbolic size


def narrow_event(shape: tuple[int, ...], args: tuple, kwargs: dict) -> Event:
    """A ``narrow(dim, start, length)`` of a tensor of ``shape`` (``args`` after the tensor) as an event."""
    try:
        names = ("dim", "start", "length")
        values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        dim, start, length = (values[n] for n in names)
    except KeyError:
        return ("use", "narrow")
    if len(args) + len(kwargs) != 3 or not all(map(_int, (dim, start, length))) or not shape:
        return ("use", "narrow")
    dim = dim + len(shape) if dim < 0 else dim
    if not 0 <= dim < len(shape):
        return ("use", "narrow")
    start = start + shape[dim] if start < 0 else start
    if start < 0 or length < 1 or start + length > shape[dim]:
        return ("use", "narrow")
    return ("narrow", dim, start, length)


def slice_event(shape: tuple[int, ...], index: Any) -> Event:
    """``t[index]`` of a tensor of ``shape`` as an event: a narrow when it is a basic slice (step 1)
    along one dim, every other dim whole (``t[a:b]``, ``t[:, a:b]``, ``t[..., a:b]``)."""
    idx = index if isinstance(index, tuple) else (index,)
    ellipses = [k for k, i in enumerate(idx) if i is Ellipsis]
    if len(ellipses) > 1 or not shape:
        return ("use", "__getitem__")
    if ellipses:
        k = ellipses[0]
        idx = idx[:k] + (slice(None),) * (len(shape) - len(idx) + 1) + idx[k + 1 :]
    if len(idx) > len(shape):
        return ("use", "__getitem__")
    idx = idx + (slice(None),) * (len(shape) - len(idx))
    found = None
    for dim, (i, n) in enumerate(zip(idx, shape)):
        if not isinstance(i, slice) or not all(x is None or _int(x) for x in (i.start, i.stop, i.step)):
            return ("use", "__getitem__")
        start, stop, step = i.indices(n)
        if step != 1:
            return ("use", "__getitem__")
        if (start, stop) == (0, n):
            continue
        if found is not None or stop <= start:
            return ("use", "__getitem__")
        found = ("narrow", dim, start, stop - start)
    return found or ("use", "__getitem__")


def classify(func: Any, args: tuple, kwargs: dict, probe: torch.Tensor) -> Event | None:
    """What the call ``func(*args, **kwargs)`` does with ``probe``: None (metadata only), a narrow of
    it, or another use."""
    try:
        if func in META:
            return None
    except TypeError:  # an unhashable callable: not metadata
        pass
    first = args[0] if args else None
    if first is probe:
        shape = tuple(_plain_shape(probe))
        if func in NARROWS:
            return narrow_event(shape, args[1:], kwargs)
        if func is _T.__getitem__ and len(args) == 2 and not kwargs:
            return slice_event(shape, args[1])
    return ("use", getattr(func, "__name__", type(func).__name__))


def verdict(events: Iterable[Event], shape: tuple[int, ...]) -> Box | None:
    """The box a name's loader reads, from what was seen of it during a whole update; None: whole
    (another use, several different narrows, none at all, or a narrow that keeps all of it)."""
    boxes = set()
    for event in events:
        if event[0] != "narrow":
            return None
        boxes.add(tuple(event[1:]))
    if len(boxes) != 1:
        return None
    dim, start, length = boxes.pop()
    return None if length == shape[dim] else (dim, start, length)


def box_of(shape: tuple[int, ...], box: Box) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(offsets, sizes)`` of ``box`` in a tensor of ``shape`` (what ``Snapshot.get`` takes)."""
    dim, start, length = box
    offsets = tuple(start if d == dim else 0 for d in range(len(shape)))
    sizes = tuple(length if d == dim else n for d, n in enumerate(shape))
    return offsets, sizes


def _plain_shape(t: torch.Tensor) -> torch.Size:
    with torch._C.DisableTorchFunctionSubclass():
        return t.shape


class Watch:
    """What was seen of one name's probes in one update. ``expect`` and ``fill`` (sliced reads): the
    learned narrow, and what completes the tensor before any other use runs."""

    def __init__(self, expect: Box | None = None, fill: Callable[[], None] | None = None):
        self.events: list[Event] = []
        self.expect = expect
        self.fill = fill
        self.open = True

    def see(self, event: Event | None) -> None:
        if not self.open or event is None:
            return
        self.events.append(event)
        if self.fill is not None and event != ("narrow", *(self.expect or ())):
            self.complete()

    def complete(self) -> None:
        """Read the rest of a sliced tensor (once), outside vLLM's copy counter: that fill is not the loader's copy."""
        fill, self.fill = self.fill, None
        if fill is not None:
            with _disable_current_modes():
                fill()


class Probe(torch.Tensor):
    """A real tensor (the same data) that tells its :class:`Watch` what is done with it."""

    _watch: Watch

    @staticmethod
    def wrap(t: torch.Tensor, watch: Watch) -> Probe:
        probe = torch.Tensor._make_subclass(Probe, t)
        probe._watch = watch
        return probe

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for probe in _probes(args, kwargs):
            probe._watch.see(classify(func, args, kwargs, probe))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func is _T.detach and isinstance(args[0], Probe) and type(out) is torch.Tensor:
            # nn.Parameter(probe) needs a detach of the same type; the name is whole already (a use)
            out = Probe.wrap(out, args[0]._watch)
        return out


def _probes(args: tuple, kwargs: dict) -> list[Probe]:
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Probe):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, Probe))
    return out


def worker_rank_size() -> tuple[int, int]:
    """This vLLM worker's tensor-parallel rank and size ((0, 1) outside vLLM's distributed setup)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    try:
        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError):  # no model-parallel group: one worker holds whole tensors
        return 0, 1


class Slices:
    """One worker's learned slices, and the reads of an update through them (see the module doc).

    ``items(snap, names)`` replaces ``snap.items(names)`` in the loader's feed: ``(name, tensor,
    bytes read)``. ``end(ok)`` after the update's loaders ran (vLLM's reload finished) and before
    the lease ends: what was seen becomes what is known (``ok``), or is dropped (a failed update)."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size
        self.enabled = True
        self._boxes: dict[tuple, Box | None] = {}
        self._seen: list[tuple[tuple, Watch, weakref.ref]] = []

    def forget(self) -> None:
        self._boxes.clear()  # an update in flight keeps its watches: its sliced tensors may still need a fill

    def learned(self) -> dict[str, Box | None]:
        return {key[0]: box for key, box in self._boxes.items()}

    def items(self, snap: Any, names: list[str]) -> Iterator[tuple[str, torch.Tensor, int]]:
        if self.size <= 1 or not self.enabled:
            yield from ((n, t, t.nbytes) for n, t in snap.items(names))
            return
        keys, sliced = {}, []
        for name in names:
            shape, dtype = snap.meta(name)
            key = keys[name] = (name, tuple(shape), dtype, self.rank, self.size)
            if self._boxes.get(key) is not None and snap.fetches_box(name):
                sliced.append(name)
        learn = {n for n in names if keys[n] not in self._boxes and snap.fetches_box(n)}
        rest = [n for n in names if n not in sliced]
        whole = snap.items(rest)
        if sliced:  # read now: a fill (Watch.complete) never runs while a stream of reads is suspended
            whole = iter(list(whole))
        for name in sliced:
            yield name, *self._sliced(snap, name, keys[name])
        for name, tensor in whole:
            nbytes = tensor.nbytes
            if name in learn:
                tensor = self._watched(tensor, keys[name], Watch())
            yield name, tensor, nbytes

    def _sliced(self, snap: Any, name: str, key: tuple) -> tuple[torch.Tensor, int]:
        box = self._boxes[key]
        offsets, sizes = box_of(key[1], box)
        part = snap.get(name, offsets=offsets, sizes=sizes)
        full = torch.empty(key[1], dtype=part.dtype)  # virtual: only the box's pages are written
        full.narrow(*box).copy_(part)

        def fill() -> None:
            log.info("stager: %s: its loader does more than narrow it to %s: read whole from now on", name, box)
            full.copy_(snap.get(name))

        return self._watched(full, key, Watch(expect=box, fill=fill)), part.nbytes

    def _watched(self, tensor: torch.Tensor, key: tuple, watch: Watch) -> Probe:
        probe = Probe.wrap(tensor, watch)
        self._seen.append((key, watch, weakref.ref(probe)))
        return probe

    def end(self, ok: bool) -> int:
        """Close this update's watches; with ``ok``, record each name's verdict. Returns how many names
        were read as slices in it."""
        seen, self._seen = self._seen, []
        if not seen:
            return 0
        alive = [ref() is not None for _, _, ref in seen]
        if any(alive):  # a cycle may hold the loader's last references
            gc.collect()
            alive = [ref() is not None for _, _, ref in seen]
        sliced = 0
        for (key, watch, _), kept in zip(seen, alive):
            if ok and kept:  # something holds the tensor: it must hold all of it
                watch.see(("use", "kept after the update"))
            sliced += watch.expect is not None
            watch.open = False
            if ok:
                self._boxes[key] = verdict(watch.events, key[1])
        return sliced
