"""The training-side hook and readers of the stager daemon.

>>> from stager.client import StagingClient, Subscriber  # doctest: +SKIP
"""

from stager.protocol import StagerError

from .staging import StageHandle, StagingClient
from .subscriber import Snapshot, Subscriber

__all__ = ["StagingClient", "StageHandle", "Subscriber", "Snapshot", "StagerError"]
