"""stager: one staging daemon per node for PyTorch training state.

Training ranks stage (sharded) state dicts with :class:`stager.client.StagingClient`; the
daemon assembles sealed, versioned snapshots in shared memory; readers lease them with
:class:`stager.client.Subscriber`. See README.md.
"""

from stager.protocol import StagerError

__version__ = "0.1.0"
__all__ = ["StagerError", "StagingClient", "Subscriber", "__version__"]


def __getattr__(name: str):
    if name in ("StagingClient", "Subscriber"):
        from stager import client

        return getattr(client, name)
    raise AttributeError(f"module 'stager' has no attribute {name!r}")
