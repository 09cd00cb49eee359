"""The train-loop hook: :class:`StagingClient` and the :class:`StageHandle` of each ``stage()`` call.

The client's worker thread (``client``) only orchestrates; each job has its own module:
``planner`` (state dict -> typed plan + digest, on top of the pure functions of ``flatten``),
``sender`` (Begin / Put / Commit / Abort), ``writer`` (segment mappings, destination views,
pre-faulting, copies through ``copier``: CUDA side streams, pinned registration, streaming
host copies) and ``replies`` (pending seals with their deadlines, pings, failing handles whose
seal can no longer come).
May import :mod:`stager.protocol` and the connection; never the daemon.
"""

from .client import StagingClient
from .handle import StageHandle

__all__ = ["StagingClient", "StageHandle"]
