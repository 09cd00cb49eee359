"""The per-node staging daemon (`stager serve`): sockets, steps, versions, leases and memory.

What lives here: the socket loop and its resources (``server``), configuration (``config``),
the request handlers composed over one shared state (``handlers``, ``state``, ``peers``,
``steps``, ``reading``, ``memory``), pure shard planning (``planning``) and the shared-memory
segments it owns (``segments``).

What it may import: :mod:`stager.protocol` and third-party libraries. Never :mod:`stager.client`
or anything built on it (consumers, CLI, dev tools): the daemon speaks to clients only through
the protocol (checked by import-linter in CI).
"""

import logging

from stager.protocol.logs import RateLimit

from .config import DaemonConfig, parse_size
from .server import Daemon, DaemonBusy

logging.getLogger("stager.daemon").addFilter(RateLimit())  # no warning repeated at every retry

__all__ = ["Daemon", "DaemonBusy", "DaemonConfig", "parse_size"]
