"""Read-side messages: leases, subscriptions, announcements and byte reads for remote readers.

A reader leases a sealed version (:class:`Acquire`), maps its segment when it runs on the
daemon's host, or asks for bytes (:class:`Read`) when it does not, and ends the lease
(:class:`Release`, or by leaving). A :class:`Subscribe`\\ d reader is pushed one
:class:`Announce` per sealed version, so nobody polls.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from .changes import KINDS
from .errors import ErrorCode, ProtocolError, short_repr
from .frames import Codec, Message, message, nonneg
from .layout import ReadItem, TensorLayout, layouts_from_wire, layouts_to_wire
from .messages import MODEL_INFO, QUANT
from .quant import QuantSpec

MAX_READ_ITEMS = 1024  # boxes in one Read
MAX_CHANGE_TENSORS = 1 << 16  # tensors named in one Changes request
MAX_CHANGE_BOXES = 1 << 14  # boxes in one Changes request, all tensors together (each costs the daemon's loop)
CHANGES_WANT = ("counts", "indices", "values")


@message("acquire")
class Acquire(Message):
    """Lease a sealed version (the newest when ``step`` is None) for reading."""

    step: int | None = None


@message("release")
class Release(Message):
    lease: int = 0


@message("subscribe")
class Subscribe(Message):
    """Push an :class:`Announce` to this connection for every version sealed from now on."""


@message("read")
class Read(Message):
    """Bytes of a leased version, one reply frame per :class:`ReadItem` (a box of a tensor, sent
    row-major). Readers on another host use it; same-host readers map the segment instead."""

    CODECS: ClassVar = {
        "items": Codec(
            list,
            lambda items: [i.to_wire() for i in items],
            lambda raw: tuple(ReadItem.from_wire(i) for i in raw[: MAX_READ_ITEMS + 1]),
        )
    }
    lease: int = 0
    items: tuple[ReadItem, ...] = ()

    def check(self) -> None:
        if not 0 < len(self.items) <= MAX_READ_ITEMS:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"read: send 1 to {MAX_READ_ITEMS} items per request")


@message("changes")
class Changes(Message):
    """What changed in a leased version since the reader's version ``since`` (a step it holds, with
    the ``since_seq`` its daemon gave that version, so a re-staged step number is not mistaken for
    it), for a reader of ``dtype`` (a wire name): per tensor of ``fqns`` (empty: all whole tensors)
    unchanged, changed element indices, or whole (``stager.protocol.changes``). ``want``: "counts"
    (kinds and counts only), "indices" (plus one frame of int32 indices, a reader that maps the
    segment gathers the values itself) or "values" (plus one frame of the changed values, gathered
    by the daemon in ``dtype``: what crosses the wire to a reader on another host).

    Optional (left out while empty; older peers neither send nor read them): ``boxes``, one entry
    per tensor of ``fqns``: the boxes ``[offset, shape]`` the reader reads from this node (a job
    spanning nodes, or replicas read elsewhere), so only changes inside them come back, as flat
    indices of the whole tensor; an empty entry: all the node holds. ``sums``, one entry per
    tensor: None (the reader proved it holds ``since`` itself), or the crc32 of the reader's copy
    in ``dtype``, one per block of this node's layout of the tensor, in its order; a tensor whose
    sums are not those of ``since`` is answered ``whole``. ``since_seq`` 0: the reader does not
    know it (its copy came from elsewhere): the newest ``since`` in the chain, proven by ``sums``."""

    OPTIONAL: ClassVar = frozenset({"boxes", "sums"})
    lease: int = 0
    since: int = 0
    since_seq: int = 0
    dtype: str = "bf16"
    want: str = "indices"
    fqns: list = dataclasses.field(default_factory=list)
    boxes: list = dataclasses.field(default_factory=list)
    sums: list = dataclasses.field(default_factory=list)

    def check(self) -> None:
        nonneg(self, "since", "since_seq")
        for name, ok in (("boxes", _boxes_ok), ("sums", _sums_ok)):
            value = getattr(self, name)
            if value and (len(value) != len(self.fqns) or not all(ok(v) for v in value)):
                raise ProtocolError(
                    ErrorCode.BAD_MESSAGE,
                    f"changes: {name} must be empty or one entry per tensor of fqns "
                    + (
                        "(a list of [offset, shape] int lists of one length)"
                        if name == "boxes"
                        else "(None or a list of crc32 ints)"
                    )
                    + f", not {short_repr(value)}",
                )
        if self.want not in CHANGES_WANT:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"changes: want must be one of {list(CHANGES_WANT)}, not {short_repr(self.want)}"
            )
        if len(self.fqns) > MAX_CHANGE_TENSORS or not all(isinstance(f, str) for f in self.fqns):
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"changes: fqns must be at most {MAX_CHANGE_TENSORS} tensor names (str); ask in batches",
            )
        if len(set(self.fqns)) != len(self.fqns):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "changes: fqns names a tensor twice; name each once")
        if sum(len(entry) for entry in self.boxes) > MAX_CHANGE_BOXES:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"changes: more than {MAX_CHANGE_BOXES} boxes in all; ask in batches"
            )


def _boxes_ok(entry) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) <= MAX_READ_ITEMS
        and all(
            isinstance(b, list)
            and len(b) == 2
            and all(isinstance(x, list) and len(x) == len(b[0]) for x in b)
            and all(type(n) is int and n >= 0 for x in b for n in x)
            for b in entry
        )
    )


def _sums_ok(entry) -> bool:
    return entry is None or (isinstance(entry, list) and all(type(n) is int and 0 <= n < 1 << 32 for n in entry))


# ------------------------------------------------------------------------------ replies


@message("acquire_reply")
class AcquireReply(Message):
    """A leased version: a :class:`TensorLayout` per tensor (one block covering the whole tensor
    unless the version is partial). ``seq`` counts the versions the daemon sealed (gaps: skipped
    ones); ``quant``: float8 tensors and their scales (``stager.protocol.quant``)."""

    CODECS: ClassVar = {
        "tensors": Codec(list, layouts_to_wire, layouts_from_wire),
        "quant": QUANT,
        "model_info": MODEL_INFO,
    }
    lease: int = 0
    step: int = 0
    seq: int = 0
    segment: str = ""
    size: int = 0
    tensors: tuple[TensorLayout, ...] = ()
    objects: dict = dataclasses.field(default_factory=dict)
    model_info: dict | None = None
    quant: dict[str, QuantSpec] = dataclasses.field(default_factory=dict)
    partial: bool = False


@message("subscribe_reply")
class SubscribeReply(Message):
    """Subscribed; the newest sealed version now (``step`` None: none yet) and its ``seq``."""

    step: int | None = None
    seq: int = 0


@message("announce")
class Announce(Message):
    """Pushed (id 0) to subscribers when a version is sealed. Sent without blocking: a reader
    that does not keep up loses announcements, never delays anyone, and sees the gap in ``seq``."""

    CODECS: ClassVar = {"model_info": MODEL_INFO}
    step: int = 0
    seq: int = 0
    tensors: int = 0
    nbytes: int = 0
    model_info: dict | None = None
    partial: bool = False


@message("read_reply")
class ReadReply(Message):
    """The bytes of each :class:`Read` item, one frame per item in request order."""

    count: int = 0

    def check(self) -> None:
        if self.count != len(self.frames):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "read_reply: one frame per item")


@message("changes_reply")
class ChangesReply(Message):
    """Per tensor ``[fqn, kind, count]`` (kind: unchanged, indices or whole), in request order; for
    ``want`` indices or values, frame 0 holds the int32 indices of the ``indices`` tensors, one after
    the other, and for values frame 1 their values in ``dtype``, in the same order. It may answer
    only the first tensors asked for (at least one): the rest would pass the daemon's bound on a
    reply's bytes, and the reader asks again for them. A tensor whose own changes pass it is
    answered ``whole``.

    Optional: ``checked`` (true): the daemon compared the ``sums`` of the request with the base's
    (a tensor whose sums differ is ``whole``). A daemon that predates ``sums`` drops them unread and
    answers without it: its deltas hold only for a base it knows by ``since_seq``, so a reader that
    proved its base by checksums reads those tensors whole."""

    OPTIONAL: ClassVar = frozenset({"checked"})
    step: int = 0
    since: int = 0
    dtype: str = "bf16"
    tensors: list = dataclasses.field(default_factory=list)
    checked: bool = False

    def check(self) -> None:
        for t in self.tensors:
            if not (
                isinstance(t, list)
                and len(t) == 3
                and isinstance(t[0], str)
                and t[1] in KINDS
                and type(t[2]) is int
                and t[2] >= 0
            ):
                raise ProtocolError(
                    ErrorCode.BAD_MESSAGE,
                    f"changes_reply: each tensor is [fqn, kind, count], kind one of {list(KINDS)}, not {short_repr(t)}",
                )
        if len(self.frames) > 2:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "changes_reply: at most two frames (indices, values)")
