"""`stager serve --transport nixl`: the daemon's NIXL agent, its segments' registrations, and grants.

One agent per daemon (UCX backend, its progress thread answering the one-sided READs that need
the target's help, as UCX's tcp transport does), made with the daemon's other resources, before
the segment budget (:class:`SegmentRegistry`, in :class:`~stager.daemon.resources.Resources`).

**Registration at creation, off the socket loop.** The budget's segment factory (the
``stager-segments`` thread of :class:`~stager.daemon.memory.SegmentBudget`, given the registry when
the budget is built) registers each segment it creates, before it hands the segment over: a
trainer's, a full assembly's (memory preallocated with ``--preallocate`` is registered by the
segment that takes its pages over, not before). A pooled segment, reused for later versions,
keeps its registration (registration, not the wire, is the cost that grows with scale); the
registration ends when the segment is really freed (unlinked, on whichever thread unlinks it). A
grant only looks the registration up: the socket loop never registers (``stager status``'s
``transport.registrations`` counts registrations by the thread that made them). Measured with
NIXL 1.5.1 on this host without RDMA (UCX cma / tcp: nothing is pinned), registering a 1 GiB
segment takes ~5 us, deregistering ~2 us. With an RDMA NIC UCX pins the pages (``ibv_reg_mr``),
which faults in every page of the segment on the factory thread: the memory is the segment's own,
counted under ``--memory-limit`` from the moment it was asked for, but the ranks then no longer
fault their parts in in parallel on a first step (a cost not measured here, without RDMA). A
segment whose registration failed is served as frames (its grant is refused with BAD_VALUE: the
reader reads that version as frames).

**The full assembler reads through this agent.** ``serve --assemble-full``'s assembler (a thread
of this process) READs the other nodes' regions with the daemon's own agent (NIXL's STRICT sync
mode makes it thread-safe), straight into the daemon's registered mapping of the segment it was
given (:meth:`SegmentRegistry.mapping`): no second agent, no registration of its own.
:meth:`SegmentRegistry.hold` marks a READ landing in a segment (``Segment.landing``): a failed
assembly's segment goes back to the pool only once every READ into it ended, as a segment frames
still point into is reused only once they left.

A grant (:class:`~stager.protocol.nixl.NixlInfo`) needs the lease, on this connection: the
descriptors (the agent's partial metadata for that segment and its address range) go only to a
peer holding a lease on the version, over the authenticated ZeroMQ channel. The lease keeps the
segment from being reused while the reader reads, as for frames; a reader that dies loses its
lease as today (bye, or --peer-timeout of silence). UCX transfers themselves are neither
authenticated nor encrypted: README.md ("Multi-node jobs") says when to enable this.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading

import torch

from stager.protocol import ErrorCode, Message, NixlInfo, NixlInfoReply, StagerError
from stager.protocol.nixl import new_agent

from .peers import PeerDirectory
from .segments import Segment
from .state import DaemonState

log = logging.getLogger("stager.daemon")


class _Registration:
    __slots__ = ("descs", "addr", "size", "mapping", "segment")

    def __init__(self, descs: object, mapping: torch.Tensor, segment: Segment):
        self.descs, self.mapping, self.segment = descs, mapping, segment
        self.addr, self.size = mapping.data_ptr(), segment.size


class SegmentRegistry:
    """The daemon's NIXL agent and the segments registered with it (thread-safe: the factory thread
    registers, whichever thread unlinks a segment deregisters, the loop and the assembler look up)."""

    def __init__(self, name: str):
        self.name = name
        self.agent = new_agent(name)
        self._lock = threading.Lock()
        self._registered: dict[str, _Registration] = {}
        self.by_thread: collections.Counter = collections.Counter()  # registrations made, by thread name
        self.failed = 0
        self.landed_bytes = 0  # bytes READ into registered segments by this process (the assembler)

    def register(self, seg: Segment) -> None:
        """Register ``seg`` (mapping it in this process), once; the registration ends when it is
        unlinked. A failure is logged and counted: the segment is then served as frames."""
        if seg.size == 0:
            return
        try:
            mapping = seg.as_bytes()
            descs = self.agent.register_memory([(mapping.data_ptr(), seg.size, 0, "")], "DRAM")
        except Exception as exc:  # NIXL's own error types, or the mapping failing: the daemon lives on
            with self._lock:
                self.failed += 1
            log.warning("NIXL could not register segment %s (read as frames): %s", seg.name, exc)
            return
        with self._lock:
            self._registered[seg.name] = _Registration(descs, mapping, seg)
            self.by_thread[threading.current_thread().name] += 1
        seg.on_unlink.append(functools.partial(self.deregister, seg.name))
        log.debug("registered segment %s (%d bytes) with NIXL", seg.name, seg.size)

    def lookup(self, seg: Segment) -> tuple[object, int, int] | None:
        """``seg``'s registration (descriptors, address, size), or None: it has none."""
        with self._lock:
            reg = self._registered.get(seg.name)
            return None if reg is None else (reg.descs, reg.addr, reg.size)

    def mapping(self, name: str) -> torch.Tensor | None:
        """The registered mapping of segment ``name`` (the memory READs may land in), or None."""
        with self._lock:
            reg = self._registered.get(name)
            return None if reg is None else reg.mapping

    def hold(self, ptr: int, nbytes: int) -> bool:
        """Whether ``[ptr, ptr + nbytes)`` lies in one registered segment; if so a READ lands
        there until :meth:`release`: the segment is not reused before (``Segment.landing``)."""
        with self._lock:
            reg = self._covering(ptr, nbytes)
            if reg is None:
                return False
            reg.segment.landing += 1
            return True

    def release(self, ptr: int, nbytes: int, landed: int) -> None:
        """A READ :meth:`hold` allowed ended, ``landed`` bytes of it arrived."""
        with self._lock:
            self.landed_bytes += landed
            reg = self._covering(ptr, nbytes)
            if reg is not None:  # (gone: unlinked at shutdown while it ran)
                reg.segment.landing -= 1

    def _covering(self, ptr: int, nbytes: int) -> _Registration | None:
        return next((r for r in self._registered.values() if r.addr <= ptr and ptr + nbytes <= r.addr + r.size), None)

    def deregister(self, name: str) -> None:
        with self._lock:
            reg = self._registered.pop(name, None)
            if reg is not None:
                try:
                    self.agent.deregister_memory(reg.descs)
                except Exception as exc:  # NIXL raises its own error types; the daemon lives on
                    log.warning("NIXL could not deregister segment %s: %s", name, exc)

    def status(self) -> dict:
        with self._lock:
            regs = list(self._registered.values())
            return {
                "registered_segments": len(regs),
                "registered_bytes": sum(r.size for r in regs),
                "registrations": dict(self.by_thread),
                "registration_failures": self.failed,
                "assembled_over_nixl_bytes": self.landed_bytes,
            }

    def close(self) -> None:
        """After the segments were unlinked (their registrations ended with them): what is left."""
        for name in list(self._registered):
            self.deregister(name)


class NixlServing:
    """Grants of leased versions' segments (registered at creation by :class:`SegmentRegistry`)."""

    def __init__(self, state: DaemonState, directory: PeerDirectory, registry: SegmentRegistry):
        self.state = state
        self.directory = directory
        self.registry = registry
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
        held = self.registry.lookup(seg)
        if held is None:
            raise StagerError(
                ErrorCode.BAD_VALUE,
                f"step {v.step}'s segment is not registered with NIXL on this node (its registration failed: "
                "see the daemon's log); read it as frames",
            )
        descs, addr, size = held
        metadata = self.registry.agent.get_partial_agent_metadata(descs, True)
        self.grants += 1
        # one-sided reads are invisible to the target: count what was made readable, as shm leases are
        self.state.counters["nixl_granted_bytes"] += v.layout.nbytes
        return NixlInfoReply(agent=self.registry.name, metadata=metadata, addr=addr, size=size, device=0)

    def status(self) -> dict:
        return {"mode": "nixl", "agent": self.registry.name, **self.registry.status(), "grants": self.grants}


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
