"""Cross-node bytes over NIXL (UCX): the control messages that hand a leased version's memory to a reader.

With ``stager serve --transport nixl`` a daemon runs one NIXL agent and registers each segment
with it (once, on the first grant: see :mod:`stager.daemon.nixl_agent`). A reader on another
host that holds a lease on a version asks for it with :class:`NixlInfo` over the authenticated
ZeroMQ channel and gets, in :class:`NixlInfoReply`, the daemon's agent metadata restricted to
that version's segment (NIXL's own binary form, loaded by the reader's agent) and the segment's
address range; it then READs the regions it needs one-sidedly. The descriptors are plain ints
here (NIXL's own descriptor serialization is pickle, which never crosses stager's wire).

The reader's own agent metadata does not travel: for a READ only the initiator needs the
target's metadata (measured with NIXL 1.5.1 over UCX cma and tcp), and the daemon then never
parses bytes a reader sent with NIXL's C++ parser.
"""

from __future__ import annotations

from typing import ClassVar

from .errors import ErrorCode, ProtocolError
from .frames import Codec, Message, message

MAX_METADATA = 1 << 20  # bytes of agent metadata in a reply: a few hundred for one segment


def _metadata(raw: object) -> bytes:
    if not isinstance(raw, bytes) or not 0 < len(raw) <= MAX_METADATA:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"nixl_info_reply: metadata must be 1 to {MAX_METADATA} bytes")
    return raw


@message("nixl_info")
class NixlInfo(Message):
    """Ask for the NIXL descriptors of leased version ``lease``'s segment on this node (refused
    with UNKNOWN_LEASE without the lease, UNSUPPORTED when the daemon does not serve NIXL)."""

    lease: int = 0


@message("nixl_info_reply")
class NixlInfoReply(Message):
    """``agent``: the daemon's NIXL agent name; ``metadata``: its partial agent metadata covering
    the segment (connection info included); ``addr``/``size``: the segment's registered range
    (a block at byte offset ``o`` of the layout lies at ``addr + o``); ``device``: its device id."""

    CODECS: ClassVar = {"metadata": Codec(bytes, bytes, _metadata)}
    agent: str = ""
    metadata: bytes = b""
    addr: int = 0
    size: int = 0
    device: int = 0

    def check(self) -> None:
        if not 0 < len(self.agent) <= 200:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "nixl_info_reply: agent must be 1 to 200 characters")
        if self.addr < 0 or self.size < 0 or self.device < 0 or self.addr + self.size >= 1 << 64:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "nixl_info_reply: addr, size and device must be >= 0 and the "
                                                       "range within 64 bits")
