"""The clients of the stager daemon: the train-loop hook, readers, adapters.

What lives here: the connection to a daemon (``connection``), the train-loop hook (``hook``:
:class:`StagingClient`), readers of sealed versions (``readers``: :class:`Subscriber`,
:class:`Snapshot`) and the Hugging Face state-dict adapters readers and exporters share
(``adapters``).

What it may import: :mod:`stager.protocol` and third-party libraries. Never the daemon
(:mod:`stager.daemon`): clients reach it only through the protocol (checked by import-linter).

>>> from stager.client import StagingClient, Subscriber  # doctest: +SKIP
"""

import logging

from stager.protocol import StagerError
from stager.protocol.logs import RateLimit

from .hook import StageHandle, StagingClient
from .readers import Snapshot, Subscriber

__all__ = ["StagingClient", "StageHandle", "Subscriber", "Snapshot", "StagerError"]

logging.getLogger("stager.client").addFilter(RateLimit())  # a daemon that is down: not one warning per step
