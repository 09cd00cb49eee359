"""Readers of sealed versions: :class:`Subscriber`, the leased :class:`Snapshot`, its views and byte sources.

Same-host readers map the daemon's shared memory (``sources.LocalSource``); readers on another
host get frames (``sources.RemoteSource``). ``views`` maps the HF view onto the staged tensors.
May import :mod:`stager.protocol`, the connection and the adapters; never the daemon.
"""

from .snapshot import Snapshot
from .subscriber import Subscriber

__all__ = ["Snapshot", "Subscriber"]
