"""The per-node staging daemon (`stager serve`): sockets, steps, versions, leases and memory.

What lives here: the socket loop (``server``), what it holds from the system (``resources``)
and sends through (``outbox``), configuration (``config``), the request handlers built in
dependency order over one shared state (``handlers``, ``state``, ``peers``, ``steps``,
``reading``, ``memory``, ``membership``, ``whole_versions``), status composed from their pieces
(``status``), metrics (``recorder``), pure shard planning (``planning``) and the shared-memory
segments it owns (``segments``).

What it may import: :mod:`stager.protocol` and third-party libraries. Never :mod:`stager.client`
or anything built on it (loaders, writers, CLI, dev tools): the daemon speaks to clients only through
the protocol (checked by import-linter in CI).
"""

import logging

from stager.protocol.logs import RateLimit

from .config import DaemonConfig, parse_size
from .resources import DaemonBusy
from .server import Daemon

logging.getLogger("stager.daemon").addFilter(RateLimit())  # no warning repeated at every retry

__all__ = ["Daemon", "DaemonBusy", "DaemonConfig", "parse_size"]
