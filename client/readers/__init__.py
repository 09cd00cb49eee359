"""Readers of sealed versions: :class:`Subscriber`, the leased :class:`Snapshot`, its views and byte sources.

One reading path: a version is a set of regions held by N >= 1 nodes (one daemon: a one-member job).
In the order data flows: ``job_reader`` (the only thing that talks to daemons for reading: members,
leases, announcements) leases a ``version``; ``planner`` (pure) says which node serves which box;
``mover`` moves the bytes through each node's ``sources.ByteSource`` (shared memory on the daemon's
host, NIXL or frames otherwise: ``nixl_source``); ``snapshot`` and ``views`` give the
native or HF view. May import :mod:`stager.protocol`, the connection and the adapters; never the daemon.
"""

from . import nixl_source  # noqa: F401  (registers the NIXL source; NIXL itself is imported only when used)
from .snapshot import Snapshot
from .subscriber import Subscriber

__all__ = ["Snapshot", "Subscriber"]
