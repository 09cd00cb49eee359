"""The NIXL byte source: one-sided UCX/RDMA READs of a leased version from its daemon's segment.

Used for a node on another host (or ``remote=True``) when the reader's transport allows it and
the daemon serves NIXL (``stager serve --transport nixl``). Control stays on the authenticated
ZeroMQ connection: the reader sends :class:`~stager.protocol.nixl.NixlInfo` for its lease and
gets the daemon's agent metadata for that segment and its address range; every byte then moves
by READ into the reader's memory, the daemon's CPU not involved (UCX's tcp transport excepted).

- Destinations: a tensor the caller fills (``load_into``, restore, an assembler's buffer; on a CUDA
  machine an engine's GPU tensors, registered as NIXL ``VRAM`` so the bytes land in device memory
  with no host copy: counted as ``nixl_into_device``) is registered once, by its storage (cached,
  bounded by count and bytes, the storage kept alive while registered so its address is never
  reused under a registration: an RDMA registration pins the pages it was made on); a fetch with no
  destination gets a new tensor registered for that read only; a destination the READ cannot land
  in as it is (of another dtype than the staged one, or another shape) is filled from such a tensor
  by ``copy_`` (cast there): a READ writes the staged dtype's raw bytes, so it only ever targets
  memory of that dtype and size. A READ into device memory waits first for the current CUDA stream (it writes
  outside every stream). Not run here (no GPU): device memory that an allocator remaps under the same address
  while its storage lives (vLLM's sleep mode with its cumem allocator) would keep a stale registration.
- Boxes: a box whose bytes are one span of the block (and of the destination) is one descriptor; a
  strided box or destination is one descriptor per run contiguous on both sides, up to
  :data:`MAX_RUNS` (more: read into a dense temporary, or as frames).
- A :class:`HeldAgent` READs with an agent another part of the process runs (the daemon's, for its
  full assembler) into memory that part registered, and registers nothing itself: a destination
  outside that memory comes as frames.
- Several READs are in flight (:attr:`NixlSource.max_in_flight`); :meth:`_NixlFetch.wait` polls
  the transfer until the reader's timeout, then raises TIMEOUT (never a hang). A transfer that
  fails (ERR, or NIXL refusing to start it) is retried once as frames, logged and counted
  (:data:`.sources.STATS`: bytes by transport in this process).

The lease keeps the segment from being reused while it is read. UCX cannot cancel a posted READ:
a read nobody waits for any more (timed out, the mover stopped early, another node failed) is
*dropped*: its destination stays alive and registered until NIXL says the READ ended (checked on
every fetch and at close), never freed under it; :meth:`NixlSource.close` (before the lease is
released) waits for its reads still in flight, up to the reader's timeout. A destination of a
failed or dropped fetch is garbage until rewritten. :func:`nixl_stats` shows this process's
registrations, reads in flight and dropped reads.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref

import torch

from stager.protocol import Box, ErrorCode, NixlInfo, NixlInfoReply, StagerError, TensorLayout
from stager.protocol.layout import dense_strides
from stager.protocol.nixl import nixl_installed

from .nixl_agents import HeldAgent, _Agent, memory_kind
from .nixl_runs import paired_runs
from .sources import REMOTE_OPENERS, STATS, WINDOW, FramesSource, _Blocks

log = logging.getLogger("stager.client")
READ_BYTES = 64 << 20  # per READ: several in flight keep the link busy, each bounded
IN_FLIGHT = 2 * WINDOW
_refused: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # conn -> session that refused NIXL
_unusable: dict[int, str] = {}  # pid -> why this process cannot make its NIXL agent (said once; frames after)


def open_nixl(
    conn,
    lease: int,
    tensors: tuple[TensorLayout, ...],
    timeout: float,
    *,
    required: bool,
    agent: HeldAgent | None = None,
) -> NixlSource | None:
    """A NixlSource for ``lease`` on ``conn``'s daemon, or None when NIXL is not installed here or
    the daemon does not serve it (``required``: a typed UNSUPPORTED error instead). ``agent``: READ
    with that agent (another part's, see :class:`HeldAgent`) instead of this process's own."""
    if agent is None and not nixl_installed():  # (an agent given: NIXL runs in this process already)
        if required:
            raise StagerError(
                ErrorCode.UNSUPPORTED,
                "transport='nixl' but NIXL is not installed in this reader's environment: pip install 'stager[nixl]'",
            )
        return None
    if not required and conn.session is not None and _refused.get(conn) == conn.session:
        return None  # this daemon session said no already: no request per lease
    if agent is None and os.getpid() in _unusable:
        return _agent(required)  # this process cannot make its agent: None (or why not), no request
    try:
        reply = conn.request(NixlInfo(lease=lease), timeout, expect=NixlInfoReply)
    except StagerError as exc:
        if exc.code not in (ErrorCode.UNSUPPORTED, ErrorCode.UNKNOWN_TYPE, ErrorCode.BAD_VALUE):
            raise
        if required:
            raise StagerError(
                ErrorCode.UNSUPPORTED, f"transport='nixl' but {conn.endpoint} does not serve NIXL: {exc.message}"
            ) from None
        if exc.code != ErrorCode.BAD_VALUE:  # (BAD_VALUE: this version only, e.g. no bytes on that node)
            _refused[conn] = conn.session
        return None
    if agent is None:  # made once a daemon serves NIXL (importing NIXL takes seconds, its agent a thread)
        agent = _agent(required)
    if agent is None:
        return None
    try:
        remote = agent.load(reply)
    except StagerError as exc:
        if required:
            raise
        log.warning("NIXL reads from %s are off (reading as frames): %s", conn.endpoint, exc.message)
        _refused[conn] = conn.session
        return None
    return NixlSource(agent, remote, reply, FramesSource(conn, lease, tensors, timeout), tensors, timeout)


def _agent(required: bool) -> _Agent | None:
    """This process's agent; None (``required``: UNSUPPORTED) when it cannot be made here (no UCX
    plugin, UCX failing to load): "auto" then reads frames, said once per process, not tried again."""
    why = _unusable.get(os.getpid())
    if why is None:
        try:
            return _Agent.get()
        except StagerError as exc:
            why = _unusable[os.getpid()] = exc.message
            if not required:
                log.warning("NIXL reads are off in this process (reading as frames): %s", why)
    if required:
        raise StagerError(ErrorCode.UNSUPPORTED, f"transport='nixl' but this reader cannot use NIXL: {why}")
    return None


def nixl_stats() -> dict[str, int]:
    """This process's NIXL reads: ``registered`` destination storages cached (and their
    ``registered_bytes``), ``busy`` those a READ is landing in, ``once`` registrations of one read
    each still alive, ``in_flight`` READs not known to have ended, ``dropped`` those nobody waits
    for any more (their destinations kept until they end). All 0 before the first NIXL read."""
    agent = _Agent._current
    with _dropped_lock:
        dropped = len(_dropped)
    if agent is None or agent.pid != os.getpid():
        return {"registered": 0, "registered_bytes": 0, "busy": 0, "once": 0, "in_flight": 0, "dropped": dropped}
    with agent.lock:
        return {
            "registered": len(agent.registered),
            "registered_bytes": agent.registered_bytes,
            "busy": sum(1 for held in agent.registered.values() if held[2] > 0),
            "once": agent.once,
            "in_flight": agent.in_flight,
            "dropped": dropped,
        }


REMOTE_OPENERS["nixl"] = open_nixl


class NixlSource:
    """READs of one node's segment of a leased version (see the module docstring)."""

    max_in_flight = IN_FLIGHT
    max_read_bytes = READ_BYTES

    def __init__(
        self,
        agent: _Agent | HeldAgent,
        remote: str,
        grant: NixlInfoReply,
        frames: FramesSource,
        tensors: tuple[TensorLayout, ...],
        timeout: float,
    ):
        self.agent = agent
        self.remote = remote
        self.grant = grant
        self.frames = frames
        self.timeout = timeout
        self._blocks = _Blocks(tensors)
        self._pending: set[_NixlFetch] = set()  # READs of this source not known to have ended

    def map(self, fqn: str, box: Box) -> None:
        return None

    def fetch(self, fqn: str, box: Box, out: torch.Tensor | None = None):
        _sweep()
        t, block, inner = self._blocks.find(fqn, box)  # typed errors: PARTIAL, BAD_VALUE, UNKNOWN_LEASE
        itemsize = t.torch_dtype.itemsize
        if not box.numel:
            return self.frames.fetch(fqn, box, out)
        if block.byte_offset + block.box.numel * itemsize > self.grant.size:
            raise StagerError(
                ErrorCode.BAD_MESSAGE,
                f"{fqn}: block at byte {block.byte_offset} lies outside the {self.grant.size} bytes the daemon granted",
            )
        # a READ writes the staged dtype's bytes: straight into ``out`` only when it is memory of that dtype and
        # shape (strided: one descriptor per contiguous run of both sides)
        direct = (
            out is not None
            and out.dtype == t.torch_dtype
            and tuple(out.shape) == tuple(box.shape)
            and (out.device.type == "cpu" or (out.device.type == "cuda" and not self.agent.no_vram))
            and all(st > 0 or n == 1 for st, n in zip(out.stride(), out.shape))
        )
        runs = paired_runs(block.box.shape, inner, box.shape, out.stride()) if direct else None
        if runs is None:
            direct = False
            runs = paired_runs(block.box.shape, inner, box.shape, dense_strides(box.shape))
            if runs is None:
                return self.frames.fetch(fqn, box, out)
        dest = out if direct else torch.empty(box.shape, dtype=t.torch_dtype)
        remote_starts, local_starts, run = runs
        base = self.grant.addr + block.byte_offset
        length = run * itemsize
        once = key = None
        if direct and dest.device.type == "cuda":  # device memory: registered here, with a fallback of its own
            try:
                key = self.agent.register(dest)
            except Exception as exc:  # NIXL's own types: UCX without CUDA, no GPUDirect. Host memory from now on
                self.agent.no_vram = True
                log.warning("NIXL cannot register device memory (%s): reading into host memory, then copying", exc)
                return self.fetch(fqn, box, out)
        try:
            if not direct:
                once = self.agent.register_once(dest)
            elif key is None:  # host memory
                key = self.agent.register(dest)
            if direct and dest.device.type == "cuda":
                # the READ writes outside every CUDA stream: what the stream still has queued on ``dest`` (a kernel
                # reading the old weights, the allocator's previous owner of the block) must be done first
                torch.cuda.current_stream(dest.device).synchronize()
            if key is None and once is None:  # memory this agent cannot READ into (a held agent's): frames
                STATS["nixl_unregistered_as_frames"] += 1
                return self.frames.fetch(fqn, box, out)
            ptr = dest.data_ptr()
            kind, device = memory_kind(dest)
            local = [(ptr + start * itemsize, length, device) for start in local_starts]
            remote = [(base + start * itemsize, length, self.grant.device) for start in remote_starts]
            a = self.agent.agent
            handle = a.initialize_xfer(
                "READ", a.get_xfer_descs(local, kind), a.get_xfer_descs(remote, "DRAM"), self.remote
            )
            state = a.transfer(handle)
        except Exception as exc:  # NIXL refused to start it (its own error types): frames, once
            if once is not None:
                self.agent.deregister_once(once)
            if key is not None:
                self.agent.done(key, 0)
            return self._retry(fqn, box, out, f"could not start: {exc}")
        return _NixlFetch(
            self, fqn, box, out, dest, once if once is not None else key, handle, state, length * len(remote_starts)
        )

    def _retry(self, fqn: str, box: Box, out: torch.Tensor | None, why: str):
        STATS["nixl_retried_as_frames"] += 1
        log.warning("NIXL read of %s from %s %s; reading it as frames", fqn, self.grant.agent, why)
        return self.frames.fetch(fqn, box, out)  # counted as frames by the frames source

    def shares(self, t: torch.Tensor) -> bool:
        return False

    def close(self) -> None:
        """Wait (up to the reader's timeout) for this source's READs still in flight, then drop what
        has not ended (kept alive and registered until it does): the lease is released after this."""
        deadline = time.monotonic() + self.timeout
        for fetch in list(self._pending):
            while not fetch.poll() and time.monotonic() < deadline:
                time.sleep(1e-3)
            fetch.drop()
        _sweep()
        if self._pending:
            log.warning(
                "%d NIXL reads from %s did not end within %gs of closing; their destinations stay "
                "registered until they do",
                len(self._pending),
                self.grant.agent,
                self.timeout,
            )
        self._blocks.meta = None
        self.frames.close()


class _NixlFetch:
    def __init__(
        self, src: NixlSource, fqn: str, box: Box, out, dest: torch.Tensor, once, handle, state: str, nbytes: int
    ):
        # once: the registration of this read alone (deregistered when it ends), or a cached one's key
        self.src = src
        self.fqn = fqn
        self.box = box
        self.out = out
        self.dest = dest
        self.once = once
        self.handle = handle
        self.state = state
        self.nbytes = nbytes
        self.started = time.monotonic()
        self.ended = False
        self._lock = threading.Lock()
        src._pending.add(self)
        with src.agent.lock:
            src.agent.in_flight += 1

    def poll(self) -> bool:
        """Whether the READ ended; once it has, its handle is released and its destination let go
        (a cached one idle again, a one-read registration ended)."""
        with self._lock:
            if self.ended:
                return True
            if self.state == "PROC":
                try:
                    self.state = self.src.agent.agent.check_xfer_state(self.handle)
                except Exception:  # NIXL's own error types: the transfer is gone
                    self.state = "ERR"
                if self.state == "PROC":
                    return False
            self.ended = True
        agent = self.src.agent
        _release(agent.agent, self.handle)
        if isinstance(self.once, tuple):  # a cached (or held) destination: idle again
            agent.done(self.once, self.nbytes if self.state == "DONE" else 0)
        else:
            agent.deregister_once(self.once)
        with agent.lock:
            agent.in_flight -= 1
        self.src._pending.discard(self)
        return True

    def drop(self) -> None:
        """Nobody will wait for this read: let it go now if it ended, else keep it (its destination
        alive and registered) among the dropped reads until it does (swept on every fetch)."""
        if not self.poll():
            with _dropped_lock:
                if self not in _dropped:
                    _dropped.append(self)

    def wait(self) -> torch.Tensor:
        src = self.src
        deadline = self.started + src.timeout
        pause = 0.0
        for spins in itertools.count():
            if self.poll():
                break
            if time.monotonic() > deadline:
                self.drop()  # the READ may still land: its destination and registration stay until it ended
                raise StagerError(
                    ErrorCode.TIMEOUT,
                    f"{self.fqn}: a NIXL read from {src.grant.agent} did not "
                    f"complete within {src.timeout:g}s (the node is down, or its "
                    "fabric unreachable)",
                )
            if spins > 100:  # spin briefly (small reads finish in microseconds), then back off to 1 ms
                pause = min(1e-3, pause * 2 or 1e-5)
                time.sleep(pause)
        if self.state != "DONE":
            return src._retry(self.fqn, self.box, self.out, "failed").wait()
        STATS["nixl"] += self.nbytes
        if self.dest.device.type == "cuda":
            STATS["nixl_into_device"] += self.nbytes
        if self.out is None or self.dest is self.out:
            return self.dest
        return self.out.copy_(self.dest)  # a temporary of the staged dtype: cast into the caller's


def _release(agent, handle) -> None:
    try:
        agent.release_xfer_handle(handle)
    except Exception as exc:
        log.debug("NIXL transfer handle release failed: %s", exc)


_dropped: list[_NixlFetch] = []  # READs nobody waits for that had not ended: kept (with their destinations)
_dropped_lock = threading.Lock()


def sweep() -> None:
    """Let go of the dropped READs that ended since (every fetch does it too)."""
    _sweep()


def _sweep() -> None:
    """Let go of the dropped READs that ended since."""
    with _dropped_lock:
        held = list(_dropped)
    ended = [fetch for fetch in held if fetch.poll()]
    if ended:
        with _dropped_lock:
            for fetch in ended:
                _dropped.remove(fetch)
