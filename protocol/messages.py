"""Every message stager exchanges, one small typed class each, with its encoding beside it.

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

Same-host tensor bytes do not travel in messages at all: they go through shared-memory
segments named in :class:`BeginReply` / :class:`AcquireReply`. Only peers on another host
send bytes as frames (:class:`Put`) and read them as frames (:class:`ReadReply`).

One message is not a reply: :class:`Announce` (id 0), which the daemon pushes to readers that
sent :class:`Subscribe`, once per sealed version. Read-side messages live in ``reads.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import msgpack

from .errors import ErrorCode, ProtocolError, RemoteError

PROTOCOL_VERSION = 1
MAX_LOCAL_WORLD = 4096  # ranks staging to one daemon
MAX_WORLD = 1 << 24

_REGISTRY: dict[str, type["Message"]] = {}
_NONE = type(None)


@dataclasses.dataclass(kw_only=True)
class Message:
    """Base class: ``encode()`` gives the frames, :func:`decode` turns frames back into a message."""

    TYPE: ClassVar[str] = ""
    # field name -> accepted python types, checked on decode before any handler sees the value
    SCHEMA: ClassVar[dict[str, tuple[type, ...]]] = {}

    id: int = 0
    frames: list = dataclasses.field(default_factory=list, repr=False)

    def body(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.SCHEMA}

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


def decode(frames: Sequence) -> Message:
    """Parse the frames of one message; raises :class:`ProtocolError` for anything malformed.

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
        if isinstance(rid, int) and not isinstance(rid, bool):
            exc.request_id = rid  # so the error reply still reaches the request's waiter
        raise


def _parse(header: dict, frames: Sequence) -> Message:
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r} is not supported; this peer speaks version "
            f"{PROTOCOL_VERSION}. Use the same stager release for the daemon and its clients.",
        )
    cls = _REGISTRY.get(header.get("t"))  # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"unknown message type {header.get('t')!r}; known: {sorted(_REGISTRY)}"
        )
    rid, body = header.get("id"), header.get("b")
    if not isinstance(rid, int) or isinstance(rid, bool) or not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{cls.TYPE}: header needs an int 'id' and a map 'b'")
    return _build(cls, rid, body, frames)


def _build(cls: type[Message], rid: int, body: dict, frames: Sequence) -> Message:
    kwargs: dict[str, Any] = {}
    for name, types in cls.SCHEMA.items():
        if name not in body:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{cls.TYPE}: missing field {name!r}")
        value = body[name]
        # bool is an int subclass: only accept it where bool is named explicitly
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join(t.__name__ for t in types)
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"{cls.TYPE}: field {name!r} must be {want}, got {type(value).__name__}"
            )
        kwargs[name] = value
    msg = cls(id=rid, **kwargs)
    msg.frames = list(frames[1:])
    msg.check()
    return msg


def _nonneg(msg: Message, *names: str) -> None:
    for name in names:
        if getattr(msg, name) < 0:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{msg.TYPE}: {name} must be >= 0")


# ----------------------------------------------------------------------------- requests


def _repr(self: Message) -> str:
    fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in ("id", *self.SCHEMA))
    return f"{type(self).__name__}({fields})"


def register(cls: type[Message]) -> type[Message]:
    """Make ``cls`` decodable (and give it the short repr); protocol modules decorate each message."""
    _REGISTRY[cls.TYPE] = cls
    if "__repr__" not in cls.__dict__:
        cls.__repr__ = _repr  # type: ignore[method-assign]
    return cls


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Hello(Message):
    """First request of every connection: who the peer is. ``role``: trainer, reader or admin."""

    TYPE: ClassVar[str] = "hello"
    SCHEMA: ClassVar = {
        "role": (str,),
        "rank": (int,),
        "local_world_size": (int,),
        "world_size": (int,),
        "pid": (int,),
        "start_time": (float, int),
        "host_id": (str,),
    }
    role: str = "trainer"
    rank: int = 0
    local_world_size: int = 1
    world_size: int = 1
    pid: int = 0
    start_time: float = 0.0
    host_id: str = ""

    def check(self) -> None:
        if self.role not in ("trainer", "reader", "admin"):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"hello: role must be trainer, reader or admin, not {self.role!r}")
        _nonneg(self, "rank", "pid")
        if self.local_world_size > MAX_LOCAL_WORLD or self.world_size > MAX_WORLD:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"hello: at most {MAX_LOCAL_WORLD} ranks per node and {MAX_WORLD} in a job")
        if self.local_world_size < 1 or self.world_size < self.local_world_size:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, "hello: need 1 <= local_world_size <= world_size"
            )
        if self.rank >= self.local_world_size:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"hello: local rank {self.rank} out of range for local_world_size {self.local_world_size}",
            )


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Begin(Message):
    """A trainer rank starts staging ``step``. ``plan`` is sent when the daemon may not know
    ``digest`` yet: a list of ``[fqn, dtype, global_shape, global_offset, local_shape]``."""

    TYPE: ClassVar[str] = "begin"
    SCHEMA: ClassVar = {
        "step": (int,),
        "digest": (str,),
        "plan": (list, _NONE),
        "full_world": (bool,),
        "shm": (bool,),
        "wait_ms": (int,),
    }
    step: int = 0
    digest: str = ""
    plan: list | None = None
    shm: bool = True  # the rank writes through shared memory; False: it sends Put frames
    full_world: bool = True  # False: the job spans nodes, gaps mean "held elsewhere"
    wait_ms: int = 0  # how long the daemon may hold the request for memory (back-pressure)

    def check(self) -> None:
        _nonneg(self, "step", "wait_ms")


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Put(Message):
    """Bytes of some of this rank's assigned regions, one frame each (peers on another host)."""

    TYPE: ClassVar[str] = "put"
    SCHEMA: ClassVar = {"step": (int,), "regions": (list,)}
    step: int = 0
    regions: list = dataclasses.field(default_factory=list)  # plan indices, one per frame

    def check(self) -> None:
        if len(self.regions) != len(self.frames) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.regions
        ):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "put: need one int region index per data frame")


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Commit(Message):
    """This rank has written all its regions of ``step``; the reply comes once the step is sealed."""

    TYPE: ClassVar[str] = "commit"
    SCHEMA: ClassVar = {"step": (int,), "objects": (dict,), "model_info": (dict, _NONE), "quant": (dict,)}
    step: int = 0
    objects: dict = dataclasses.field(default_factory=dict)  # non-tensor leaves by FQN
    model_info: dict | None = None
    quant: dict = dataclasses.field(default_factory=dict)  # float8 data fqn -> scale spec (protocol.quant)


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Abort(Message):
    """This rank cannot finish ``step`` (e.g. a copy failed); the daemon fails the step."""

    TYPE: ClassVar[str] = "abort"
    SCHEMA: ClassVar = {"step": (int,), "reason": (str,)}
    step: int = 0
    reason: str = ""


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Bye(Message):
    """The peer is leaving: the daemon ends its leases (a trainer's steps in flight fail)."""

    TYPE: ClassVar[str] = "bye"


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Status(Message):
    TYPE: ClassVar[str] = "status"


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"

    def __repr__(self) -> str:
        return f"Ping(id={self.id})"


# ------------------------------------------------------------------------------ replies


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class HelloReply(Message):
    TYPE: ClassVar[str] = "hello_reply"
    SCHEMA: ClassVar = {"session": (str,), "host_id": (str,), "daemon_pid": (int,)}
    session: str = ""  # changes when the daemon restarts
    host_id: str = ""  # peers with the same host_id use shared memory
    daemon_pid: int = 0


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class BeginReply(Message):
    """Where to write ``step``: a shared-memory segment, and (when new) this rank's assignment:
    per plan entry ``None`` (another rank writes that region) or ``[block_offset, block_shape,
    offset_in_block]``."""

    TYPE: ClassVar[str] = "begin_reply"
    SCHEMA: ClassVar = {
        "step": (int,),
        "segment": (str,),
        "size": (int,),
        "layout": (str,),
        "assignment": (list, _NONE),
        "live_segments": (list,),
    }
    step: int = 0
    segment: str = ""
    size: int = 0
    layout: str = ""
    assignment: list | None = None
    live_segments: list = dataclasses.field(default_factory=list)


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Sealed(Message):
    """Reply to :class:`Commit` once every rank of the node committed and the version is served."""

    TYPE: ClassVar[str] = "sealed"
    SCHEMA: ClassVar = {"step": (int,), "nbytes": (int,), "tensors": (int,), "partial": (bool,)}
    step: int = 0
    nbytes: int = 0
    tensors: int = 0
    partial: bool = False


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Ok(Message):
    TYPE: ClassVar[str] = "ok"


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class StatusReply(Message):
    TYPE: ClassVar[str] = "status_reply"
    SCHEMA: ClassVar = {"status": (dict,)}
    status: dict = dataclasses.field(default_factory=dict)


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    SCHEMA: ClassVar = {"session": (str,)}
    session: str = ""


@register
@dataclasses.dataclass(kw_only=True, repr=False)
class ErrorReply(Message):
    """A request failed: ``code`` is an :class:`ErrorCode` value, ``message`` says how to fix it."""

    TYPE: ClassVar[str] = "error"
    SCHEMA: ClassVar = {"code": (str,), "message": (str,)}
    code: str = ErrorCode.INTERNAL.value
    message: str = ""

    def to_exception(self) -> RemoteError:
        return RemoteError(self.code, self.message)
