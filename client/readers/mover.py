"""The mover: the one place where bytes go from byte sources into a reader's tensors.

It takes the wanted boxes in order, each planned as reads of (node, box) (:func:`.planner.plan_box`).
What a source maps is taken as a view (no copy); the rest is fetched, each source keeping up to its
``max_in_flight`` fetches started, every source at once, a read larger than a source moves at once
split into row ranges (:func:`.planner.split_rows`). Each box is given back as soon as its last part
landed, in the order asked: a socket never idles while the reader converts what arrived, and memory
stays bounded by the boxes in flight. A box read in one piece from one fetch and wanted nowhere in
particular is the source's tensor itself (a frame: no copy).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from stager.protocol import Box, ErrorCode, StagerError
from stager.protocol.layout import narrow_box

from .planner import Read, split_rows
from .sources import ByteSource, Fetch

LOOKAHEAD = 64  # boxes started but not given back yet (views of mapped memory cost nothing; fetches are windowed)


@dataclasses.dataclass
class Want:
    """Box ``box`` of tensor ``fqn`` (of ``dtype``), read as ``reads``; into ``out`` when given.
    ``cast``: the dtype the reader turns it into, asked of sources that cast (``casts``) so fetched
    bytes cross the wire in it; the box then comes in ``cast`` or, mapped, in ``dtype``."""

    fqn: str
    box: Box
    dtype: torch.dtype
    reads: list[Read]
    out: torch.Tensor | None = None
    cast: torch.dtype | None = None


class _Landing:
    """A wanted box on its way: its destination (made when its first part lands) and the parts to come."""

    __slots__ = ("want", "left", "result", "whole")

    def __init__(self, want: Want):
        self.want = want
        self.left = 0
        self.result = want.out
        self.whole = False

    def dest(self, box: Box, at: tuple[int, ...]) -> torch.Tensor:
        if self.result is None:
            self.result = torch.empty(self.want.box.shape, dtype=self.want.cast or self.want.dtype)
        return narrow_box(self.result, at, box.shape)


Failed = Callable[[str, StagerError, str], StagerError]  # (node, error, fqn) -> the error to raise


def move(
    wants: Iterable[Want], sources: Mapping[str, ByteSource], failed: Failed
) -> Iterator[tuple[Want, torch.Tensor]]:
    """``(want, tensor)`` for each of ``wants``, in order. A source's error is raised as
    ``failed(node, error, fqn)`` (a multi-node reader names the node that did not answer).
    Stopped early (closed, or a source failed), the fetches still in flight are dropped
    (:meth:`.sources.Fetch.drop`): a transfer that may still land keeps its destination."""
    flight: dict[str, deque[tuple[Fetch, _Landing]]] = {node: deque() for node in sources}
    try:
        yield from _move(wants, sources, failed, flight)
    finally:
        for fetches in flight.values():
            for fetch, _ in fetches:
                drop = getattr(fetch, "drop", None)  # optional: a fetch holding nothing needs none
                if drop is not None:
                    drop()


def _move(
    wants: Iterable[Want],
    sources: Mapping[str, ByteSource],
    failed: Failed,
    flight: dict[str, deque[tuple[Fetch, _Landing]]],
) -> Iterator[tuple[Want, torch.Tensor]]:
    pending = iter(wants)
    landing: deque[_Landing] = deque()
    queue: deque[tuple[_Landing, str, Box, tuple[int, ...]]] = deque()  # parts to fetch, in order
    more = True
    while True:
        while True:  # start what the sources have room for, in order: a full source holds back the parts behind
            if queue:
                lnd, node, box, at = queue[0]
                src = sources[node]
                if len(flight[node]) >= src.max_in_flight:
                    break
                queue.popleft()
                try:
                    fetch = _fetch(src, lnd, box, at)
                except StagerError as exc:
                    raise failed(node, exc, lnd.want.fqn) from None
                flight[node].append((fetch, lnd))
                continue
            if not more or (landing and landing[0].left == 0) or len(landing) >= LOOKAHEAD:
                break
            want = next(pending, None)
            if want is None:
                more = False
                break
            landing.append(_start(want, sources, queue, failed))
        while landing and landing[0].left == 0:
            lnd = landing.popleft()
            yield lnd.want, lnd.dest(lnd.want.box, (0,) * len(lnd.want.box.shape)) if lnd.result is None else lnd.result
        if not landing:
            if not more:
                return
            continue
        head = landing[0]  # fetches start in order: on every source holding a part of it, its parts come first
        node = next((n for n, f in flight.items() if f and f[0][1] is head), None)
        if node is None:
            raise StagerError(
                ErrorCode.INTERNAL, f"{head.want.fqn}: a part was never started (a byte source with max_in_flight < 1?)"
            )
        fetch, lnd = flight[node].popleft()
        try:
            t = fetch.wait()
        except StagerError as exc:
            raise failed(node, exc, lnd.want.fqn) from None
        if lnd.whole:
            lnd.result = t
        lnd.left -= 1


def read_one(want: Want, sources: Mapping[str, ByteSource], failed: Failed) -> torch.Tensor:
    """One wanted box: :func:`move` for one, without its bookkeeping when one mapped block holds it."""
    if len(want.reads) == 1:
        read = want.reads[0]
        try:
            view = sources[read.node].map(want.fqn, read.box)
        except StagerError as exc:
            raise failed(read.node, exc, want.fqn) from None
        if view is not None:
            return view if want.out is None else want.out.copy_(view)
    return next(move([want], sources, failed))[1]


def _fetch(src: ByteSource, lnd: _Landing, box: Box, at: tuple[int, ...]) -> Fetch:
    out = None if lnd.whole else lnd.dest(box, at)
    if lnd.want.cast is None:
        return src.fetch(lnd.want.fqn, box, out)
    return src.fetch(lnd.want.fqn, box, out, dtype=lnd.want.cast)  # type: ignore[call-arg]


def _start(want: Want, sources: Mapping[str, ByteSource], queue: deque, failed: Failed) -> _Landing:
    """Land what the sources map at once; queue the rest, split as each source moves it (by the
    tensor's own bytes: what a daemon reads to cast a part is bounded as an uncast part is)."""
    if want.cast is not None and not all(getattr(sources[r.node], "casts", False) for r in want.reads):
        want.cast = None  # a source that moves only the tensor's dtype: the reader casts, as before
        # (a destination given in the reader's dtype is still passed: every source casts into ``out``)
    lnd = _Landing(want)
    parts = []
    for read in want.reads:
        src = sources[read.node]
        try:
            view = src.map(want.fqn, read.box)
        except StagerError as exc:
            raise failed(read.node, exc, want.fqn) from None
        if view is not None:
            if len(want.reads) == 1:  # the mapped memory itself (zero-copy), or copied once where asked
                lnd.result = view if want.out is None else want.out.copy_(view)
            else:
                lnd.dest(read.box, read.at).copy_(view)
            continue
        most = src.max_read_bytes
        if want.cast not in (None, want.dtype) and getattr(src, "max_cast_bytes", None):  # cast: its bytes bound it
            most = min(most, src.max_cast_bytes * want.dtype.itemsize // want.cast.itemsize)
        for piece in split_rows(read.box, want.dtype.itemsize, most):
            at = tuple(a + p - r for a, p, r in zip(read.at, piece.offset, read.box.offset))
            parts.append((lnd, read.node, piece, at))
    lnd.left = len(parts)
    lnd.whole = len(parts) == 1 and len(want.reads) == 1 and want.out is None
    queue.extend(parts)
    return lnd
