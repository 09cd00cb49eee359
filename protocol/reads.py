"""Read-side messages: leases, subscriptions, announcements and byte reads for remote readers.

A reader leases a sealed version (:class:`Acquire`), maps its segment when it runs on the
daemon's host, or asks for bytes (:class:`Read`) when it does not, and ends the lease
(:class:`Release`, or by leaving). A :class:`Subscribe`\\ d reader is pushed one
:class:`Announce` per sealed version, so nobody polls.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from .errors import ErrorCode, ProtocolError
from .messages import Message, register

_NONE = type(None)
MAX_READ_ITEMS = 1024  # boxes in one Read


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Acquire(Message):
    """Lease a sealed version (the newest when ``step`` is None) for reading."""

    TYPE: ClassVar[str] = "acquire"
    SCHEMA: ClassVar = {"step": (int, _NONE)}
    step: int | None = None


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Release(Message):
    TYPE: ClassVar[str] = "release"
    SCHEMA: ClassVar = {"lease": (int,)}
    lease: int = 0


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Subscribe(Message):
    """Push an :class:`Announce` to this connection for every version sealed from now on."""

    TYPE: ClassVar[str] = "subscribe"


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Read(Message):
    """Bytes of a leased version, one reply frame per item. An item is ``[fqn, offsets, sizes]``:
    the box of the tensor starting at ``offsets`` with extent ``sizes`` (both None: all of it),
    sent row-major. Readers on another host use it; same-host readers map the segment instead."""

    TYPE: ClassVar[str] = "read"
    SCHEMA: ClassVar = {"lease": (int,), "items": (list,)}
    lease: int = 0
    items: list = dataclasses.field(default_factory=list)

    def check(self) -> None:
        if not 0 < len(self.items) <= MAX_READ_ITEMS:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"read: send 1 to {MAX_READ_ITEMS} items per request")
        for item in self.items:
            ok = isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
            if ok and (item[1] is None) != (item[2] is None):
                ok = False
            if ok and item[1] is not None:
                ok = isinstance(item[1], list) and isinstance(item[2], list) and len(item[1]) == len(item[2]) and all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in item[1] + item[2])
            if not ok:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"read: item {item!r} must be [fqn, offsets, sizes] "
                                                           "with equal-length lists of ints >= 0, or [fqn, None, None]")


# ------------------------------------------------------------------------------ replies


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class AcquireReply(Message):
    """A leased version. ``tensors``: ``[fqn, dtype, shape, blocks]`` where ``blocks`` is a list
    of ``[byte_offset, global_offset, block_shape]`` (one block covering the whole tensor unless
    the version is partial). ``seq`` counts the versions the daemon sealed (gaps: skipped ones);
    ``quant``: float8 tensors and their scales (``stager.protocol.quant``)."""

    TYPE: ClassVar[str] = "acquire_reply"
    SCHEMA: ClassVar = {
        "lease": (int,),
        "step": (int,),
        "seq": (int,),
        "segment": (str,),
        "size": (int,),
        "tensors": (list,),
        "objects": (dict,),
        "model_info": (dict, _NONE),
        "quant": (dict,),
        "partial": (bool,),
    }
    lease: int = 0
    step: int = 0
    seq: int = 0
    segment: str = ""
    size: int = 0
    tensors: list = dataclasses.field(default_factory=list)
    objects: dict = dataclasses.field(default_factory=dict)
    model_info: dict | None = None
    quant: dict = dataclasses.field(default_factory=dict)
    partial: bool = False


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class SubscribeReply(Message):
    """Subscribed; the newest sealed version now (``step`` None: none yet) and its ``seq``."""

    TYPE: ClassVar[str] = "subscribe_reply"
    SCHEMA: ClassVar = {"step": (int, _NONE), "seq": (int,)}
    step: int | None = None
    seq: int = 0


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Announce(Message):
    """Pushed (id 0) to subscribers when a version is sealed. Sent without blocking: a reader
    that does not keep up loses announcements, never delays anyone, and sees the gap in ``seq``."""

    TYPE: ClassVar[str] = "announce"
    SCHEMA: ClassVar = {"step": (int,), "seq": (int,), "tensors": (int,), "nbytes": (int,),
                        "model_info": (dict, _NONE), "partial": (bool,)}
    step: int = 0
    seq: int = 0
    tensors: int = 0
    nbytes: int = 0
    model_info: dict | None = None
    partial: bool = False


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class ReadReply(Message):
    """The bytes of each :class:`Read` item, one frame per item in request order."""

    TYPE: ClassVar[str] = "read_reply"
    SCHEMA: ClassVar = {"count": (int,)}
    count: int = 0

    def check(self) -> None:
        if self.count != len(self.frames):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "read_reply: one frame per item")
