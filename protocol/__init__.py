"""stager's wire format: versioned msgpack headers plus out-of-band byte frames, no pickle.

>>> from stager.protocol import Ping, decode
>>> decode(Ping(id=1).encode()).id
1
"""

from .dtypes import DTYPES, dtype_from_name, dtype_name
from .errors import ErrorCode, ProtocolError, RemoteError, StagerError
from .messages import (
    PROTOCOL_VERSION,
    Abort,
    Begin,
    BeginReply,
    Bye,
    Commit,
    ErrorReply,
    Hello,
    HelloReply,
    Message,
    Ok,
    Ping,
    Pong,
    Put,
    Sealed,
    Status,
    StatusReply,
    decode,
)
from .reads import Acquire, AcquireReply, Announce, Read, ReadReply, Release, Subscribe, SubscribeReply

__all__ = [
    "PROTOCOL_VERSION", "DTYPES", "dtype_name", "dtype_from_name", "decode", "Message",
    "ErrorCode", "StagerError", "ProtocolError", "RemoteError",
    "Hello", "HelloReply", "Bye", "Begin", "BeginReply", "Put", "Commit", "Sealed", "Abort",
    "Acquire", "AcquireReply", "Release", "Subscribe", "SubscribeReply", "Announce", "Read", "ReadReply", "Status", "StatusReply", "Ping", "Pong", "Ok", "ErrorReply",
]
