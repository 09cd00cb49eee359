"""stager's wire format and every contract the daemon and its clients share.

What lives here: the frame layout and message classes (``frames``, ``messages``, ``reads``, ``job``,
``assembly``, ``nixl``), typed errors (``errors``), the closed dtype table (``dtypes``), quantization metadata
(``quant``), change maps (``changes``: what changed between versions, pure functions), the layout types that
plans, assignments and reads are made of (``layout``), the shared-memory naming and mapping contract (``shm``)
and endpoint resolution (``endpoint``).

What it may import: the standard library, torch, msgpack, and itself. Never the daemon
(``stager.daemon``), the client (``stager.client``) or anything built on them: both sides
import this package, so it sits at the bottom (checked by import-linter in CI).

>>> from stager.protocol import Ping, decode
>>> decode(Ping(id=1).encode()).id
1
"""

from .assembly import AssembleBegin, AssembleDone, AssembleReply
from .dtypes import DTYPES, dtype_from_name, dtype_name
from .errors import ErrorCode, HFConfigError, NodeDown, ProtocolError, RemoteError, StagerError
from .frames import PROTOCOL_VERSION, Message, decode
from .job import JobInfo, JobInfoReply, Join
from .layout import Block, Box, Placement, PlanEntry, ReadItem, TensorLayout
from .messages import (
    Abort,
    Begin,
    BeginReply,
    Bye,
    Commit,
    ErrorReply,
    Hello,
    HelloReply,
    Ok,
    Ping,
    Pong,
    Put,
    Sealed,
    Status,
    StatusReply,
)
from .nixl import NixlInfo, NixlInfoReply
from .reads import (
    Acquire,
    AcquireReply,
    Announce,
    Changes,
    ChangesReply,
    Read,
    ReadReply,
    Release,
    Subscribe,
    SubscribeReply,
)

__all__ = [
    "PROTOCOL_VERSION",
    "DTYPES",
    "dtype_name",
    "dtype_from_name",
    "decode",
    "Message",
    "ErrorCode",
    "StagerError",
    "ProtocolError",
    "RemoteError",
    "NodeDown",
    "HFConfigError",
    "Box",
    "PlanEntry",
    "Placement",
    "Block",
    "TensorLayout",
    "ReadItem",
    "Hello",
    "HelloReply",
    "Bye",
    "Begin",
    "BeginReply",
    "Put",
    "Commit",
    "Sealed",
    "Abort",
    "Acquire",
    "AcquireReply",
    "Release",
    "Subscribe",
    "SubscribeReply",
    "Announce",
    "Read",
    "ReadReply",
    "Changes",
    "ChangesReply",
    "Status",
    "StatusReply",
    "Ping",
    "Pong",
    "Ok",
    "ErrorReply",
    "Join",
    "JobInfo",
    "JobInfoReply",
    "AssembleBegin",
    "AssembleReply",
    "AssembleDone",
    "NixlInfo",
    "NixlInfoReply",
]
