"""The agents a NIXL reader READs with: this process's own (:class:`_Agent`: it registers the reader's destinations,
a bounded least-recently-used set) or one another part of the process runs (:class:`HeldAgent`: the daemon's, for
its full assembler; it registers nothing). Split from :mod:`.nixl_source`, which plans and tracks the READs."""

from __future__ import annotations

import collections
import logging
import os
import threading
import uuid
from typing import Any, Protocol

import torch

from stager.protocol import ErrorCode, NixlInfoReply, StagerError
from stager.protocol.nixl import new_agent

log = logging.getLogger("stager.client")


def memory_kind(t: torch.Tensor) -> tuple[str, int]:
    """NIXL's memory type and device id of ``t``'s memory: ``("DRAM", 0)`` for host memory, ``("VRAM", index)``
    for a CUDA tensor (a READ then lands in device memory directly: GPUDirect RDMA, or UCX's cuda_copy)."""
    if t.device.type == "cuda":
        return "VRAM", t.device.index if t.device.index is not None else torch.cuda.current_device()
    return "DRAM", 0


MAX_REGISTERED = 256  # destination storages kept registered (least recently used dropped first) ...
MAX_REGISTERED_BYTES = 1 << 30  # ... and their bytes: a registration keeps its storage alive (memory stays bounded)


class _Agent:
    """This process's NIXL agent (one per process: made on first use, again after a fork), the
    daemons' agents it loaded, and its registered destinations."""

    _lock = threading.Lock()
    _current: _Agent | None = None

    def __init__(self):
        self.pid = os.getpid()
        self.name = f"stager-reader-{os.uname().nodename[:60]}-{self.pid}-{uuid.uuid4().hex[:8]}"
        self.agent = new_agent(self.name)
        self.lock = threading.Lock()
        self.registered: collections.OrderedDict = collections.OrderedDict()  # (ptr, nbytes) -> (descs, storage)
        self.registered_bytes = 0
        self.once = 0  # registrations of one read each, alive
        self.in_flight = 0  # READs started and not known to have ended
        self.no_vram = False  # NIXL refused to register device memory once: READ into host memory, then copy

    @classmethod
    def get(cls) -> _Agent:
        with cls._lock:
            if cls._current is None or cls._current.pid != os.getpid():
                cls._current = cls()
            return cls._current

    def load(self, reply: NixlInfoReply):
        """Load the daemon's agent metadata (again for each grant: it carries the segment's keys)."""
        try:
            return self.agent.add_remote_agent(reply.metadata)
        except Exception as exc:  # NIXL's own error types
            raise StagerError(
                ErrorCode.BAD_MESSAGE, f"NIXL could not load the metadata of agent {reply.agent}: {exc}"
            ) from None

    def register(self, t: torch.Tensor) -> tuple[int, int]:
        """Register ``t``'s storage (once) and mark it busy until :meth:`done` with the key returned;
        the least recently used idle ones beyond MAX_REGISTERED / MAX_REGISTERED_BYTES are dropped."""
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        with self.lock:
            held = self.registered.get(key)
            if held is not None:
                self.registered.move_to_end(key)
                held[2] += 1
                return key
            kind, device = memory_kind(t)
            descs = self.agent.register_memory([(key[0], key[1], device, "")], kind)
            self.registered[key] = [descs, storage, 1]
            self.registered_bytes += key[1]
            for old in list(self.registered):  # oldest first; never one a READ is landing in
                if len(self.registered) <= MAX_REGISTERED and self.registered_bytes <= MAX_REGISTERED_BYTES:
                    break
                if self.registered[old][2] == 0:
                    self.registered_bytes -= old[1]
                    self.deregister(self.registered.pop(old)[0])
        return key

    def done(self, key: tuple[int, int], landed: int = 0) -> None:
        with self.lock:
            held = self.registered.get(key)
            if held is not None:
                held[2] -= 1

    def register_once(self, t: torch.Tensor):
        kind, device = memory_kind(t)
        descs = self.agent.register_memory([(t.data_ptr(), t.numel() * t.element_size(), device, "")], kind)
        with self.lock:
            self.once += 1
        return descs

    def deregister_once(self, descs) -> None:
        with self.lock:
            self.once -= 1
        self.deregister(descs)

    def deregister(self, descs) -> None:
        try:
            self.agent.deregister_memory(descs)
        except Exception as exc:
            log.debug("NIXL deregistration failed: %s", exc)


class RegisteredMemory(Protocol):
    """Memory another part of this process registered with the NIXL agent it runs: the daemon's
    segments, for its full assembler (:class:`stager.daemon.nixl_agent.SegmentRegistry`)."""

    name: str
    agent: Any  # the NIXL agent (thread-safe: NIXL's STRICT sync mode)

    def hold(self, ptr: int, nbytes: int) -> bool:
        """Whether the range lies in registered memory; if so a READ lands there until :meth:`release`."""
        ...

    def release(self, ptr: int, nbytes: int, landed: int) -> None: ...

    def mapping(self, name: str) -> torch.Tensor | None:
        """The registered mapping of segment ``name`` (where READs may land), or None."""
        ...


class HeldAgent:
    """A reader's NIXL agent owned by another part of its process (:class:`RegisteredMemory`): READs
    land only in memory that part registered, this registers none (a destination outside it comes
    as frames). The daemon's full assembler reads through its daemon's agent so: no second agent in
    the daemon's process, no registration (pinning) outside ``--memory-limit``."""

    def __init__(self, memory: RegisteredMemory):
        self.memory = memory
        self.name = memory.name
        self.agent = memory.agent
        self.lock = threading.Lock()
        self.in_flight = 0
        self.no_vram = True  # READs land only in the daemon's segments, host memory

    load = _Agent.load

    def register(self, t: torch.Tensor) -> tuple[int, int] | None:
        """The key of ``t``'s memory when it lies in registered memory (held until :meth:`done`), else None."""
        if t.device.type != "cpu":  # the memory it holds is the daemon's segments, host memory
            return None
        extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
        key = (t.data_ptr(), extent * t.element_size())
        return key if self.memory.hold(*key) else None

    def done(self, key: tuple[int, int], landed: int = 0) -> None:
        self.memory.release(key[0], key[1], landed)

    def register_once(self, t: torch.Tensor) -> None:
        return None  # never registers: the caller reads that box as frames

    def deregister_once(self, descs) -> None:
        return None
