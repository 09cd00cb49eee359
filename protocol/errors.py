"""Typed errors: every failure that crosses the wire has a code and a message saying how to fix it."""

from __future__ import annotations

import enum
import reprlib


class ErrorCode(str, enum.Enum):
    """Error codes carried by :class:`~stager.protocol.messages.ErrorReply`. Append only."""

    BAD_MESSAGE = "bad_message"  # undecodable frames or fields of the wrong type
    UNSUPPORTED_VERSION = "unsupported_version"  # peer speaks another protocol version
    UNKNOWN_TYPE = "unknown_type"  # message type this peer does not handle
    BAD_DTYPE = "bad_dtype"  # dtype outside the closed table
    NOT_REGISTERED = "not_registered"  # request before hello (or after a daemon restart)
    RANK_CONFLICT = "rank_conflict"  # two live processes claim the same local rank
    BAD_PLAN = "bad_plan"  # inconsistent shard metadata: overlaps, gaps, shapes, dtypes
    PLAN_REQUIRED = "plan_required"  # the daemon does not know this layout digest: resend the plan
    STALE_STEP = "stale_step"  # step not newer than one already sealed
    UNKNOWN_STEP = "unknown_step"  # commit/put for a step the daemon is not staging
    STEP_FAILED = "step_failed"  # the step could not be sealed (rank died, timeout, ...)
    MEMORY_LIMIT = "memory_limit"  # staging would pass the daemon's memory limit
    NO_VERSION = "no_version"  # nothing sealed (yet) to read
    UNKNOWN_LEASE = "unknown_lease"
    PARTIAL = "partial"  # the version holds only part of some tensors (multi-node sharding)
    BAD_VALUE = "bad_value"  # a state-dict leaf that cannot be staged
    TIMEOUT = "timeout"  # no answer in time (raised client side)
    UNAVAILABLE = "unavailable"  # daemon not reachable (raised client side)
    INTERNAL = "internal"  # a bug in the daemon; the request failed, the daemon lives on
    NODE_DOWN = "node_down"  # a node of a multi-node job does not answer (raised client side)
    SESSION_EXPIRED = "session_expired"  # the daemon ended a peer's session after --peer-timeout of silence
    NO_SIGN_OF_LIFE = "no_sign_of_life"  # the daemon did not acknowledge a stage in time: skipped (client side)
    FORBIDDEN = "forbidden"  # a request this peer may not send where it sent it (assembly off the assembler socket)
    UNSUPPORTED = "unsupported"  # a feature this daemon or reader was not started with (e.g. --transport nixl)
    UNKNOWN_BASE = "unknown_base"  # no change map from the base version asked for: read the version in full


class StagerError(Exception):
    """Base class of every error stager raises; ``code`` says which kind it is."""

    def __init__(self, code: ErrorCode | str, message: str):
        self.code = ErrorCode(code) if code in ErrorCode._value2member_map_ else code
        self.message = message
        super().__init__(f"[{getattr(self.code, 'value', self.code)}] {message}")


class NodeDown(StagerError):
    """A node of a multi-node job did not answer (its daemon died, hangs or is unreachable);
    ``node`` names it."""

    def __init__(self, node: str, message: str):
        self.node = node
        super().__init__(ErrorCode.NODE_DOWN, message)


class ProtocolError(StagerError):
    """A message or value that violates the protocol (raised while encoding or decoding)."""

    request_id: int = 0  # id of the offending request, when its header could be read


class RemoteError(StagerError):
    """The daemon answered a request with an error reply."""


class HFConfigError(StagerError):
    """A field of an HF config that a consumer reads (a built-in adapter's, load-hf's) is missing, of the
    wrong type or out of range; ``field`` names it (dotted when nested, e.g.
    ``quantization_config.weight_block_size``). Raised before any tensor is read (BAD_VALUE)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(ErrorCode.BAD_VALUE, message)


_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxlist = 6
_REPR.maxdict = 4
_REPR.maxstring = 40
_REPR.maxother = 40


def short_repr(value: object) -> str:
    """A bounded repr of a value a peer sent, for error messages: never the whole of a huge or
    deeply nested value (formatting one in full can exhaust the stack or the memory)."""
    return _REPR.repr(value)
