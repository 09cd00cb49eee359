"""Staging messages (trainer ranks <-> daemon) and the small admin requests, one typed class each.

Frame layout, codecs and decoding live in :mod:`stager.protocol.frames`; read-side messages in
:mod:`stager.protocol.reads`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import msgpack

from .errors import ErrorCode, ProtocolError, RemoteError, short_repr
from .frames import Codec, Message, message, nonneg
from .layout import (
    Assignment,
    PlanEntry,
    assignment_from_wire,
    assignment_to_wire,
    plan_from_wire,
    plan_to_wire,
)
from .quant import QuantSpec

MAX_LOCAL_WORLD = 4096  # ranks staging to one daemon
MAX_WORLD = 1 << 24


def quant_to_wire(quant: dict[str, QuantSpec]) -> dict:
    return {fqn: spec.wire() for fqn, spec in quant.items()}


def quant_from_wire(raw: dict) -> dict[str, QuantSpec]:
    if not all(isinstance(k, str) for k in raw):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "quantization metadata keys must be tensor names (str)")
    return {fqn: QuantSpec.parse(fqn, spec) for fqn, spec in raw.items()}


QUANT = Codec(dict, quant_to_wire, quant_from_wire)

MAX_MODEL_INFO_BYTES = 64 << 10  # announcements carry model_info to every subscriber of every version
MAX_MODEL_INFO_DEPTH = 8
_MODEL_INFO_STRINGS = {"adapter": 200, "prefix": 200}  # known keys that must be short strings


def check_model_info(info: dict) -> dict:
    """Validate a version's ``model_info`` (both when a rank sends it and when the daemon receives
    it): a map with str keys, at most MAX_MODEL_INFO_DEPTH deep and MAX_MODEL_INFO_BYTES encoded;
    ``adapter`` a short string, ``hf_config`` a map. Raises BAD_VALUE saying what to change."""

    def bad(why: str) -> ProtocolError:
        return ProtocolError(
            ErrorCode.BAD_VALUE,
            f"model_info: {why}; stage a small dict of plain values, e.g. "
            "{'adapter': 'llama3', 'hf_config': {...}}",
        )

    if not isinstance(info, dict) or not all(isinstance(k, str) for k in info):
        raise bad("must be a dict with str keys")
    stack = [(info, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if depth >= MAX_MODEL_INFO_DEPTH:
                raise bad(f"nested deeper than {MAX_MODEL_INFO_DEPTH} levels")
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    for key, limit in _MODEL_INFO_STRINGS.items():
        if key in info and (not isinstance(info[key], str) or len(info[key]) > limit):
            raise bad(f"{key!r} must be a string of at most {limit} characters, not {short_repr(info[key])}")
    if "hf_config" in info and not isinstance(info["hf_config"], dict):
        raise bad(
            f"'hf_config' must be a dict (the HF config itself, never a path), not {short_repr(info['hf_config'])}"
        )
    try:
        size = len(msgpack.packb(info, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise bad(f"cannot be encoded ({exc})") from None
    if size > MAX_MODEL_INFO_BYTES:
        raise bad(f"is {size} bytes encoded, over the {MAX_MODEL_INFO_BYTES} allowed")
    return info


MODEL_INFO = Codec(dict, check_model_info, check_model_info, optional=True)


@message("hello")
class Hello(Message):
    """First request of every connection: who the peer is. ``role``: trainer, reader or admin."""

    role: str = "trainer"
    rank: int = 0
    local_world_size: int = 1
    world_size: int = 1
    pid: int = 0
    start_time: float = 0.0
    host_id: str = ""

    def check(self) -> None:
        if self.role not in ("trainer", "reader", "admin"):
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"hello: role must be trainer, reader or admin, not {short_repr(self.role)}"
            )
        nonneg(self, "rank", "pid")
        if self.local_world_size > MAX_LOCAL_WORLD or self.world_size > MAX_WORLD:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"hello: at most {MAX_LOCAL_WORLD} ranks per node and {MAX_WORLD} in a job"
            )
        if self.local_world_size < 1 or self.world_size < self.local_world_size:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "hello: need 1 <= local_world_size <= world_size")
        if self.rank >= self.local_world_size:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"hello: local rank {self.rank} out of range for local_world_size {self.local_world_size}",
            )


@message("begin")
class Begin(Message):
    """A trainer rank starts staging ``step``. ``plan`` (its :class:`PlanEntry` list) is sent when
    the daemon may not know ``digest`` yet."""

    CODECS: ClassVar = {"plan": Codec(list, plan_to_wire, plan_from_wire, optional=True)}
    step: int = 0
    digest: str = ""
    plan: tuple[PlanEntry, ...] | None = None
    full_world: bool = True  # False: the job spans nodes, gaps mean "held elsewhere"
    shm: bool = True  # the rank writes through shared memory; False: it sends Put frames
    wait_ms: int = 0  # how long the daemon may hold the request for memory (back-pressure)

    def check(self) -> None:
        nonneg(self, "step", "wait_ms")


@message("put")
class Put(Message):
    """Bytes of some of this rank's assigned regions, one frame each (peers on another host)."""

    step: int = 0
    regions: list[int] = dataclasses.field(default_factory=list)  # plan indices, one per frame

    def check(self) -> None:
        if len(self.regions) != len(self.frames) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.regions
        ):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "put: need one int region index per data frame")


@message("commit")
class Commit(Message):
    """This rank has written all its regions of ``step``; the reply comes once the step is sealed."""

    CODECS: ClassVar = {"quant": QUANT, "model_info": MODEL_INFO}
    step: int = 0
    objects: dict = dataclasses.field(default_factory=dict)  # non-tensor leaves by FQN
    model_info: dict | None = None
    quant: dict[str, QuantSpec] = dataclasses.field(default_factory=dict)  # float8 data fqn -> its scale


@message("abort")
class Abort(Message):
    """This rank cannot finish ``step`` (e.g. a copy failed); the daemon fails the step."""

    step: int = 0
    reason: str = ""


@message("bye")
class Bye(Message):
    """The peer is leaving: the daemon ends its leases (a trainer's steps in flight fail)."""


@message("status")
class Status(Message):
    """Ask for the daemon's status (versions, ranks, readers, memory, counters)."""


@message("ping")
class Ping(Message):
    """Liveness check; the reply carries the daemon's session, so a restart shows. A ping with id 0
    is a reader's heartbeat: a connection without a session (ended for silence) is answered with
    the error saying why, also with id 0."""


# ------------------------------------------------------------------------------ replies


@message("hello_reply")
class HelloReply(Message):
    session: str = ""  # changes when the daemon restarts
    host_id: str = ""  # peers with the same host_id use shared memory
    daemon_pid: int = 0


@message("begin_reply")
class BeginReply(Message):
    """Where to write ``step``: a shared-memory segment, and (when new) this rank's assignment:
    per plan entry ``None`` (another rank writes that region) or a :class:`Placement`."""

    CODECS: ClassVar = {"assignment": Codec(list, assignment_to_wire, assignment_from_wire, optional=True)}
    step: int = 0
    segment: str = ""
    size: int = 0
    layout: str = ""
    assignment: Assignment | None = None
    live_segments: list = dataclasses.field(default_factory=list)


@message("sealed")
class Sealed(Message):
    """Reply to :class:`Commit` once every rank of the node committed and the version is served."""

    step: int = 0
    nbytes: int = 0
    tensors: int = 0
    partial: bool = False


@message("ok")
class Ok(Message):
    """A request succeeded and has nothing else to say."""


@message("status_reply")
class StatusReply(Message):
    status: dict = dataclasses.field(default_factory=dict)


@message("pong")
class Pong(Message):
    session: str = ""


@message("error")
class ErrorReply(Message):
    """A request failed: ``code`` is an :class:`ErrorCode` value, ``message`` says how to fix it."""

    code: str = ErrorCode.INTERNAL.value
    message: str = ""

    def to_exception(self) -> RemoteError:
        return RemoteError(self.code, self.message)
