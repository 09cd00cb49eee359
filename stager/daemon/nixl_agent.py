"""`stager serve --transport nixl`: the daemon's NIXL agent, and the grant of a leased version's memory.

One agent per daemon (UCX backend, its progress thread answering the one-sided READs that need
the target's help, as UCX's tcp transport does). A segment is registered with it the first time
a reader is granted a version in it, and stays registered while the segment lives: a pooled
segment, reused for later versions, keeps its registration (registration, not the wire, is the
cost that grows with scale); the registration ends when the segment is really freed (unlinked).
Registering at grant rather than at creation keeps segment creation as it is: the ranks fault the
pages in in parallel, and an RDMA registration (which pins pages) never touches a segment no
remote reader reads.

The registration runs on the socket loop, inside the first grant of a segment (later grants of it
reuse it). Measured with NIXL 1.5.1 on this host without RDMA (UCX cma / tcp: nothing is pinned),
registering a 1 GiB segment takes ~5 us, deregistering ~2 us (min of 3; /tmp script in the
issue-26 review report). With an RDMA NIC UCX pins the pages (``ibv_reg_mr``): a cost that grows
with the segment's size, not measured here; where multi-GB first grants stall the loop there,
moving the registration to the segment factory thread (at creation, with ``--transport nixl``)
is the next step (it needs the factory, in memory.py, to take a hook).

A grant (:class:`~stager.protocol.nixl.NixlInfo`) needs the lease, on this connection: the
descriptors (the agent's partial metadata for that segment and its address range) go only to a
peer holding a lease on the version, over the authenticated ZeroMQ channel. The lease keeps the
segment from being reused while the reader reads, as for frames; a reader that dies loses its
lease as today (bye, or --peer-timeout of silence). UCX transfers themselves are neither
authenticated nor encrypted: README.md ("Multi-node jobs") says when to enable this.
"""

from __future__ import annotations

import logging
import os
import threading

from stager.protocol import ErrorCode, Message, NixlInfo, NixlInfoReply, StagerError
from stager.protocol.nixl import new_agent

from .peers import PeerDirectory
from .segments import Segment
from .state import DaemonState

log = logging.getLogger("stager.daemon")


class NixlServing:
    """The daemon's NIXL agent and what it registered: segment name -> (registration, addr, size)."""

    def __init__(self, state: DaemonState, directory: PeerDirectory, name: str):
        self.state = state
        self.directory = directory
        self.name = name
        self.agent = new_agent(name)
        # registrations end from whichever thread unlinks a segment: the loop (a version freed, the pool
        # dropped), or the segment factory thread when a new segment takes an old one's pages over
        # (Segment._take_over unlinks the old one there)
        self._lock = threading.Lock()
        self._registered: dict[str, tuple[object, int, int]] = {}
        self.grants = 0
        state.counters.setdefault("nixl_granted_bytes", 0)

    def on_info(self, identity: bytes, msg: NixlInfo) -> Message:
        peer = self.directory.get(identity)
        if msg.lease not in peer.leases:
            raise StagerError(
                ErrorCode.UNKNOWN_LEASE,
                f"lease {msg.lease} is not held by this connection; acquire "
                "the version first (descriptors go only to a lease holder)",
            )
        v = self.state.leases[msg.lease][1]
        seg = v.segment
        if seg.size == 0:
            raise StagerError(
                ErrorCode.BAD_VALUE,
                f"step {v.step} holds no bytes on this node: nothing to read over NIXL (read it as frames)",
            )
        descs, addr, size = self.register(seg)
        metadata = self.agent.get_partial_agent_metadata(descs, True)
        self.grants += 1
        # one-sided reads are invisible to the target: count what was made readable, as shm leases are
        self.state.counters["nixl_granted_bytes"] += v.layout.nbytes
        return NixlInfoReply(agent=self.name, metadata=metadata, addr=addr, size=size, device=0)

    def register(self, seg: Segment) -> tuple[object, int, int]:
        """The segment's registration, made on first use and ended when the segment is unlinked."""
        with self._lock:
            held = self._registered.get(seg.name)
            if held is not None:
                return held
            addr = seg.as_bytes().data_ptr()
            descs = self.agent.register_memory([(addr, seg.size, 0, "")], "DRAM")
            held = self._registered[seg.name] = (descs, addr, seg.size)
        seg.on_unlink.append(lambda name=seg.name: self.deregister(name))
        log.debug("registered segment %s (%d bytes) with NIXL", seg.name, seg.size)
        return held

    def deregister(self, name: str) -> None:
        with self._lock:
            held = self._registered.pop(name, None)
            if held is not None:
                try:
                    self.agent.deregister_memory(held[0])
                except Exception as exc:  # NIXL raises its own error types; the daemon lives on
                    log.warning("NIXL could not deregister segment %s: %s", name, exc)

    def status(self) -> dict:
        with self._lock:
            regs = list(self._registered.values())
        return {
            "mode": "nixl",
            "agent": self.name,
            "registered_segments": len(regs),
            "registered_bytes": sum(r[2] for r in regs),
            "grants": self.grants,
        }

    def close(self) -> None:
        for name in list(self._registered):
            self.deregister(name)


def refuse_nixl(identity: bytes, msg: NixlInfo) -> Message:
    """The handler of a daemon serving frames only."""
    raise StagerError(
        ErrorCode.UNSUPPORTED,
        "this daemon serves bytes as frames only (--transport frames): start "
        "it with --transport nixl to allow NIXL reads, or read with "
        "transport='frames'",
    )


def agent_name(host: str, session: str) -> str:
    """Unique per daemon run: a reader that loaded a restarted daemon's agent must not confuse them."""
    return f"stager-{host[:120]}-{os.getpid()}-{session}"
