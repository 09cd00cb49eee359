"""The ``vllm.general_plugins`` entry point: registers the ``stager`` weight-transfer backend.

vLLM calls :func:`register` in every process it starts (the API server, the engine core, each
worker), so ``LLM(..., weight_transfer_config=WeightTransferConfig(backend="stager"))`` and
``vllm serve --weight-transfer-config '{"backend": "stager"}'`` find the backend with no user
code. The engine's module is named, not imported: vLLM imports it when an engine selects it.
Without vLLM installed nothing calls this, and it does nothing if called.
"""

from __future__ import annotations

import logging

log = logging.getLogger("stager.integrations.vllm")

BACKEND = "stager"
ENGINE = ("stager.integrations.vllm.engine", "StagerWeightTransferEngine")


def register() -> None:
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except ImportError:  # an older vLLM without weight transfer, or none
        log.debug("vLLM has no weight-transfer factory: the stager backend is not registered")
        return
    try:
        WeightTransferEngineFactory.register_engine(BACKEND, *ENGINE)
    except ValueError:  # registered already (vLLM loads plugins once per component of a process)
        pass
