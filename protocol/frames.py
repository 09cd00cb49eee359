"""The frame layout and the message base class: how every stager message becomes bytes.

Frame layout (protocol version 1), documented here once
---------------------------------------------------------
A message is one ZeroMQ multipart message (the daemon's ROUTER socket adds the peer
identity frame in front; nothing else does):

    frame 0      msgpack map  {"v": PROTOCOL_VERSION, "t": <type>, "id": <request id>, "b": <body>}
    frame 1..n   raw bytes    out-of-band tensor data, referenced by position from the body

``<type>`` is a short string naming the message class (``Message.TYPE``); ``<body>`` is a
msgpack map of the class's fields. A reply carries the ``id`` of the request it answers.
Only msgpack's own types appear in frame 0 (no extension types are produced or trusted)
and tensor bytes never pass through msgpack: no pickle anywhere.

Fields with a typed form (plans, placements, tensor layouts, read items, quantization specs)
are declared in ``CODECS``: the wire form is checked against ``SCHEMA``, then turned into the
typed value by the codec's decoder, which raises :class:`ProtocolError` naming what is wrong.
A decoded message therefore holds only values of its declared types; a malformed one never
reaches a handler. The encoding of each message is pinned by golden-bytes tests: changing it
means bumping :data:`PROTOCOL_VERSION`.

Same-host tensor bytes do not travel in messages at all: they go through shared-memory
segments named in ``BeginReply`` / ``AcquireReply`` (see :mod:`stager.protocol.shm`). Only peers
on another host send bytes as frames (``Put``) and read them as frames (``ReadReply``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import msgpack

from .errors import ErrorCode, ProtocolError, StagerError, short_repr

PROTOCOL_VERSION = 1
MAX_DEPTH = 16  # nesting of msgpack containers accepted in a header (checked before any handler)

_REGISTRY: dict[str, type[Message]] = {}
NONE = type(None)


@dataclasses.dataclass(frozen=True)
class Codec:
    """Turns a field's typed value into its wire form (of type ``wire``) and back (``decode`` validates)."""

    wire: type
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]
    optional: bool = False  # None passes through unchanged

    def wire_types(self) -> tuple[type, ...]:
        return (self.wire, NONE) if self.optional else (self.wire,)

    def to_wire(self, value: Any) -> Any:
        return None if value is None and self.optional else self.encode(value)

    def from_wire(self, value: Any) -> Any:
        return None if value is None and self.optional else self.decode(value)


@dataclasses.dataclass(kw_only=True)
class Message:
    """Base class: ``encode()`` gives the frames, :func:`decode` turns frames back into a message."""

    TYPE: ClassVar[str] = ""
    # field name -> accepted wire types, checked on decode before any handler sees the value
    SCHEMA: ClassVar[dict[str, tuple[type, ...]]] = {}
    # field name -> codec between the typed value and the wire form
    CODECS: ClassVar[dict[str, Codec]] = {}
    # fields added after a message first shipped: left out of the body while empty (an older peer's
    # bytes stay the same) and their default when absent (an older peer's message still parses)
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    id: int = 0
    frames: list = dataclasses.field(default_factory=list, repr=False)

    def body(self) -> dict[str, Any]:
        codecs = self.CODECS
        return {
            name: codecs[name].to_wire(getattr(self, name)) if name in codecs else getattr(self, name)
            for name in self.SCHEMA
            if name not in self.OPTIONAL or not _empty(getattr(self, name))
        }

    def encode(self) -> list:
        """Frames of this message: the msgpack header, then the out-of-band buffers."""
        header = {"v": PROTOCOL_VERSION, "t": self.TYPE, "id": self.id, "b": self.body()}
        try:
            packed = msgpack.packb(header, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(
                ErrorCode.BAD_VALUE,
                f"{self.TYPE} message cannot be encoded: {exc}. Only int, float, str, bool, None, "
                "bytes, lists and dicts of those can be sent as values.",
            ) from None
        return [packed, *self.frames]

    def check(self) -> None:
        """Semantic checks beyond field types; overridden where a message needs them."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in ("id", *self.SCHEMA))
        return f"{type(self).__name__}({fields})"


_WIRE = {int: (int,), str: (str,), bool: (bool,), float: (float, int), dict: (dict,), list: (list,)}


def _wire_types(hint: Any) -> tuple[type, ...]:
    """The msgpack types a field of annotation ``hint`` may arrive as (``X | None`` adds None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in ((NONE,) if arg is NONE else _wire_types(arg)))
    wire = _WIRE.get(origin or hint)
    if wire is None:
        raise TypeError(f"annotation {hint!r} has no wire form: give the field a codec")
    return wire


def _empty(value: Any) -> bool:
    """An optional field left out of the body: its empty default (a False flag is one; a 0 is not)."""
    return value is None or value is False or (isinstance(value, (list, dict)) and not value)


def message(kind: str) -> Callable[[type], type]:
    """Class decorator for a message: makes it a keyword-only dataclass with wire type ``kind``,
    derives its ``SCHEMA`` from the field annotations (codec fields: from the codec), in field
    order, and registers it so :func:`decode` knows it. The field order is part of the encoding."""

    def wrap(cls: type) -> type:
        cls = dataclasses.dataclass(kw_only=True, repr=False)(cls)
        cls.TYPE = kind
        hints = typing.get_type_hints(cls)
        codecs = cls.CODECS
        cls.SCHEMA = {
            f.name: codecs[f.name].wire_types() if f.name in codecs else _wire_types(hints[f.name])
            for f in dataclasses.fields(cls)
            if f.name not in ("id", "frames")
        }
        if kind in _REGISTRY:
            raise ValueError(f"message type {kind!r} is registered twice")
        _REGISTRY[kind] = cls
        return cls

    return wrap


def message_types() -> dict[str, type[Message]]:
    """Every registered message class by wire type (for tests and documentation)."""
    return dict(_REGISTRY)


def decode(frames: Sequence) -> Message:
    """Parse the frames of one message; raises :class:`ProtocolError` for anything malformed.

    >>> from stager.protocol import Ping
    >>> decode(Ping(id=7).encode())
    Ping(id=7)
    """
    if not frames:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "empty message: send at least the header frame")
    raw = frames[0]
    raw = raw.bytes if hasattr(raw, "bytes") else raw
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"header frame is not valid msgpack ({exc.__class__.__name__})"
        ) from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "header frame must be a msgpack map")
    rid = header.get("id")
    try:
        return _parse(header, frames)
    except ProtocolError as exc:
        if type(rid) is int:
            exc.request_id = rid  # so the error reply still reaches the request's waiter
        raise


def _too_deep(value: Any, limit: int) -> bool:
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth >= limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def _parse(header: dict, frames: Sequence) -> Message:
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {short_repr(version)} is not supported; this peer speaks version "
            f"{PROTOCOL_VERSION}. Use the same stager release for the daemon and its clients.",
        )
    kind = header.get("t")
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"unknown message type {short_repr(kind)}; known: {sorted(_REGISTRY)}"
        )
    rid, body = header.get("id"), header.get("b")
    if type(rid) is not int or not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{cls.TYPE}: header needs an int 'id' and a map 'b'")
    if _too_deep(body, MAX_DEPTH):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{cls.TYPE}: values nested deeper than {MAX_DEPTH} levels")
    return _build(cls, rid, body, frames)


def _build(cls: type[Message], rid: int, body: dict, frames: Sequence) -> Message:
    kwargs: dict[str, Any] = {}
    for name, wire in cls.SCHEMA.items():
        if name not in body:
            if name in cls.OPTIONAL:
                continue  # a peer that predates the field: its default
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{cls.TYPE}: missing field {name!r}")
        value = body[name]
        # bool is an int subclass: only accept it where bool is named explicitly
        if not isinstance(value, wire) or (isinstance(value, bool) and bool not in wire):
            want = " or ".join(t.__name__ for t in wire)
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"{cls.TYPE}: field {name!r} must be {want}, got {type(value).__name__}"
            )
        codec = cls.CODECS.get(name)
        if codec is not None:
            try:
                value = codec.from_wire(value)
            except ProtocolError:
                raise
            except StagerError as exc:  # a typed value's own check: still a malformed message
                raise ProtocolError(exc.code, f"{cls.TYPE}: {exc.message}") from None
        kwargs[name] = value
    msg = cls(id=rid, **kwargs)
    msg.frames = list(frames[1:])
    msg.check()
    return msg


def nonneg(msg: Message, *names: str) -> None:
    for name in names:
        if getattr(msg, name) < 0:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{msg.TYPE}: {name} must be >= 0")
