"""Cross-node bytes over NIXL (UCX): the control messages that hand a leased version's memory to a reader.

With ``stager serve --transport nixl`` a daemon runs one NIXL agent and registers each segment
with it (once, when the daemon creates it: see :mod:`stager.daemon.nixl_agent`). A reader on another
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

import functools
import importlib.util
import logging
import os
import threading
from typing import Any, ClassVar

from .errors import ErrorCode, ProtocolError, StagerError
from .frames import Codec, Message, message

MAX_METADATA = 1 << 20  # bytes of agent metadata in a reply: a few hundred for one segment
MODULES = ("nixl_cu12", "nixl_cu13", "nixl")  # NIXL's CUDA 12 and 13 wheels, and a source build
# microseconds the agent's progress thread sleeps between rounds: NIXL's Python API fixes 0 (a spinning thread,
# ~0.4-1 core idle here), which would take a core from training; 100 us: ~2% idle, tcp reads no slower (measured)
PROGRESS_DELAY_US = 100
# new_agent() swaps nixlBind.nixlAgentConfig process-wide while it makes an agent: one at a time
_NEW_AGENT_LOCK = threading.Lock()


@functools.cache
def nixl_installed() -> bool:
    """Whether NIXL can be imported, without importing it (that takes seconds). Searched once per process: a
    reader asks at every lease, per node, and each search stats every sys.path entry for each name."""
    return any(importlib.util.find_spec(m) is not None for m in MODULES)


def new_agent(name: str) -> Any:
    """A NIXL agent with the UCX backend, as the daemon and readers make theirs: its progress thread
    paced (:data:`PROGRESS_DELAY_US`), NIXL's logging routed through the application's (NIXL prints
    INFO to stdout otherwise), quiet unless ``NIXL_LOG_LEVEL`` says, thread-safe (a reader's agent
    serves every Subscriber of its process: NIXL's STRICT sync mode, where the default, NONE, leaves
    concurrent calls unguarded). UNSUPPORTED when NIXL is missing or its agent cannot be made here
    (no UCX plugin, UCX failing to load)."""
    api = None
    for module in MODULES:
        try:
            api = __import__(f"{module}._api", fromlist=["nixl_agent"])
            break
        except ImportError:
            continue
    if api is None:
        raise StagerError(
            ErrorCode.UNSUPPORTED,
            "NIXL is not installed here: pip install 'stager[nixl]' (nixl-cu12==1.5.1), or use the frames transport",
        )
    nixl_log = logging.getLogger("nixl")
    for handler in list(nixl_log.handlers):
        nixl_log.removeHandler(handler)
    nixl_log.propagate = True
    if not os.environ.get("NIXL_LOG_LEVEL"):
        nixl_log.setLevel(logging.WARNING)
    base = api.nixlBind.nixlAgentConfig

    class _Paced(base):  # the one setting nixl_agent_config does not expose
        def __setattr__(self, key, value):
            super().__setattr__(key, PROGRESS_DELAY_US if key == "pthrDelay" else value)

    config = api.nixl_agent_config(backends=["UCX"], sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    with _NEW_AGENT_LOCK:
        api.nixlBind.nixlAgentConfig = _Paced
        try:
            agent = api.nixl_agent(name, config)
        except Exception as exc:  # NIXL's own error types (RuntimeError: no plugins, nixlBackendError, ...)
            raise StagerError(
                ErrorCode.UNSUPPORTED,
                f"NIXL could not make an agent here ({exc}): check "
                "NIXL_PLUGIN_DIR and UCX_* settings, or use the frames "
                "transport",
            ) from None
        finally:
            api.nixlBind.nixlAgentConfig = base
    if "UCX" not in agent.backends:
        raise StagerError(
            ErrorCode.UNSUPPORTED, "NIXL has no UCX backend here (its plugin did not load); use the frames transport"
        )
    return agent


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
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                "nixl_info_reply: addr, size and device must be >= 0 and the range within 64 bits",
            )
