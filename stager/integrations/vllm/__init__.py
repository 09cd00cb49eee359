"""vLLM engines that serve stager's versions: the ``stager`` weight-transfer backend and its driver.

Worker side (in vLLM's processes): :mod:`.engine` (``StagerWeightTransferEngine``), registered
by :mod:`.plugin` through the ``vllm.general_plugins`` entry point. Driver side (the RL loop):
:func:`update` moves engines (``LLM`` objects in this process, servers by base URL) to a step,
:class:`Follower` keeps them within ``k`` steps of the newest version. Errors: :mod:`.errors`.

Nothing here imports vLLM until an engine is used: ``import stager.integrations.vllm`` works
without it. May import :mod:`stager.protocol`, :mod:`stager.client` and :mod:`stager.formats`.
"""

from .driver import EngineResult, Follower, UpdateResult, update, weight_checksums
from .errors import EngineIncomplete, UpdateIncomplete, UpdateRefused, VerifyFailed, WeightMismatch

__all__ = [
    "EngineIncomplete",
    "EngineResult",
    "Follower",
    "UpdateIncomplete",
    "UpdateRefused",
    "UpdateResult",
    "VerifyFailed",
    "WeightMismatch",
    "update",
    "weight_checksums",
]
