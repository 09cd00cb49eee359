"""stager: one staging daemon per node for PyTorch training state.

Training ranks stage (sharded) state dicts with :class:`stager.client.StagingClient`; the
daemon assembles sealed, versioned snapshots in shared memory; readers lease them with
:class:`stager.client.Subscriber`. See README.md.

The packages, in the order data flows through them:

- :mod:`stager.protocol` (``protocol/``): every contract both sides share: messages and their
  frames, errors, dtypes, layout types, shared-memory naming, endpoints. Imports nothing else.
- :mod:`stager.client` (``client/``): the train-loop hook (``hook``), readers (``readers``) and
  HF adapters (``adapters``). Imports only the protocol.
- :mod:`stager.daemon`: the per-node daemon. Imports only the protocol.
- :mod:`stager.formats`: on-disk formats (HF safetensors, DCP, export manifests), read and written safely.
- :mod:`stager.loaders`: producers of versions from files (load-hf, load-dcp) and full assembly.
- :mod:`stager.writers`: consumers that write versions out (export-hf, write-dcp): clients of the daemon.
- :mod:`stager.integrations`: inference engines (the vLLM weight-transfer backend).
- :mod:`stager.cli` (the ``stager`` command) and :mod:`stager.dev` (demo, launch helpers).

import-linter contracts in pyproject.toml keep these one-way (tests/test_architecture.py).
"""

from stager.protocol import StagerError

__version__ = "0.1.0"
__all__ = ["StagerError", "StagingClient", "Subscriber", "__version__"]


def __getattr__(name: str):
    if name in ("StagingClient", "Subscriber"):  # lazily: `import stager` stays cheap for the daemon
        from stager import client

        return getattr(client, name)
    raise AttributeError(f"module 'stager' has no attribute {name!r}")
