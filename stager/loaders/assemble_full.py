"""The full assembler (``serve --assemble-full``): a consumer of the node's multi-node job that
copies each newly complete version, whole, into a segment its daemon provides.

It reads like any consumer (:class:`~stager.client.Subscriber`: its own node's regions through
shared memory, the others' as frames, or, where its daemon serves ``--transport nixl``, over NIXL
from each node whose daemon serves it, through its own daemon's agent: the daemon hands the
assembler its :class:`~stager.daemon.nixl_agent.SegmentRegistry` when it is built, every segment
the daemon creates is registered with that agent at creation, and the READs land straight in the
daemon's registered mapping of the segment it gave. No second agent in the daemon's process, no
registration of the assembler's own: a second agent would register (pin) each segment it writes
into, its registration cache holding the pages after the segment is unlinked, outside
``--memory-limit``. A READ that fails is retried once as frames; one that does not end fails the
assembly (the next version is tried), and the daemon reuses that segment only once every READ into
it ended) and talks to its daemon only through the messages of
:mod:`stager.protocol.assembly`, on the daemon's private assembler socket: ``assemble_begin``
(the step it holds a lease on, and its tensors) gets the segment to write, by name, with each
tensor's offset (or why not), and ``assemble_done`` lets the daemon swap the node's partial
version for the whole one (or take the segment back). The daemon's half is
:class:`stager.daemon.whole_versions.FullAssembly`; it never runs this code and never waits for it.

Why a thread that ``stager serve --assemble-full`` starts in the daemon's process, not a process
of its own beside it:

- kill -9 of the daemon takes the assembler with it: no orphan keeps a dead daemon's segment
  mapped (its memory would stay in use until that process noticed), and nothing needs a
  supervisor, a second unit file or a way to find a restarted daemon's private socket;
- memory is accounted in one place: the segment is the daemon's, created under its
  ``--memory-limit``; what the thread holds besides is the reading path's bounded in-flight frames;
- the GIL is not a concern in practice: the bytes move in calls that release it (ZeroMQ's
  receive, ``torch`` copies, ``madvise``), so during a 1 GB copy the socket loop still runs; the
  trainer's stage time with assembly on is measured against off in ``bench/bench_assembly.py``.
  A process would buy isolation from a bug in the reading path that kills the whole process
  (not seen: every failure here is logged and the next version tried) at the cost above.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time

import torch
import zmq

from stager.client import Subscriber
from stager.client.readers.nixl_agents import HeldAgent, RegisteredMemory
from stager.client.readers.nixl_source import sweep
from stager.protocol import (
    AssembleBegin,
    AssembleDone,
    AssembleReply,
    ErrorCode,
    ErrorReply,
    Message,
    Ok,
    ProtocolError,
    StagerError,
    Status,
    StatusReply,
    decode,
)
from stager.protocol.dtypes import dtype_from_name, dtype_name
from stager.protocol.shm import block_view, map_segment, prefault, segment_path

log = logging.getLogger("stager.daemon")
BEGIN_TIMEOUT_S = 300.0  # the daemon answers once the segment is created (in the background): a while for GBs


class AssemblerChannel:
    """Request/reply with the daemon on its private assembler socket (no hello: the socket itself
    says who may talk on it)."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._ids = itertools.count(1)

    def request(self, msg: Message, timeout: float, expect: type[Message]) -> Message:
        msg.id = next(self._ids)
        self.sock.send_multipart(msg.encode())
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise StagerError(
                    ErrorCode.TIMEOUT,
                    f"the daemon did not answer {msg.TYPE} on its assembler socket "
                    f"{self.endpoint} within {timeout:.0f}s",
                )
            reply = decode(self.sock.recv_multipart())
            if reply.id != msg.id:
                continue  # the answer to a request given up on before
            if isinstance(reply, ErrorReply):
                raise reply.to_exception()
            if not isinstance(reply, expect):
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unexpected {reply.TYPE} reply to {msg.TYPE}")
            return reply

    def close(self) -> None:
        self.sock.close()


def segment_targets(reply: AssembleReply, specs, mapped: torch.Tensor | None = None) -> dict:
    """Views of the daemon's segment named in ``reply``, one per tensor of ``specs`` (fqn, dtype
    name, shape), at the offsets the daemon gave; the segment's pages faulted in first, so a full
    /dev/shm is a MEMORY_LIMIT error here, never a SIGBUS mid-copy. Refuses a reply whose
    offsets do not name every tensor once, or lie outside the segment, and a segment file that is
    not this user's. ``mapped``: the daemon's own mapping of the segment (registered with its NIXL
    agent: READs land there), else the segment is mapped here by name."""
    offsets = dict(reply.offsets)
    if len(offsets) != len(reply.offsets) or set(offsets) != {fqn for fqn, _, _ in specs}:
        raise StagerError(
            ErrorCode.BAD_MESSAGE,
            f"the daemon's offsets for step {reply.step} do not name each tensor once; restart the daemon",
        )
    places = []
    for fqn, dt, shape in specs:
        dtype = dtype_from_name(dt)
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n
        if offsets[fqn] + nbytes > reply.size:
            raise StagerError(
                ErrorCode.BAD_MESSAGE,
                f"the daemon placed {fqn} ({nbytes} bytes at {offsets[fqn]}) "
                f"outside its segment of {reply.size} bytes; restart the daemon",
            )
        places.append((fqn, dtype, offsets[fqn], shape))
    try:
        st = os.stat(segment_path(reply.segment), follow_symlinks=False)
    except FileNotFoundError:
        raise StagerError(
            ErrorCode.STEP_FAILED,
            f"segment {reply.segment} is gone: the daemon took it back (it restarted, or another assembly began)",
        ) from None
    if st.st_uid != os.getuid():
        raise StagerError(ErrorCode.BAD_MESSAGE, f"segment {reply.segment} is not this user's; restart the daemon")
    if mapped is not None and mapped.numel() >= reply.size:
        data = mapped[: reply.size]
    else:
        data = map_segment(reply.segment, reply.size, writable=True)
    prefault(data, 0, reply.size)
    return {fqn: block_view(data, dtype, offset, shape) for fqn, dtype, offset, shape in places}


class Assembler:
    """Copies each newly complete version of the node's job, whole, into a segment its daemon
    gives. ``endpoint``: the daemon's (read as any reader does, with CURVE keys ``auth_dir`` for
    tcp); ``assembly_endpoint``: its private assembler socket; ``node``: the node's host id.

    ``nixl`` (the daemon serves ``--transport nixl``): the daemon's agent and its registered segments
    (:class:`~stager.daemon.nixl_agent.SegmentRegistry`): the other nodes' regions are READ with it,
    straight into the segment, where their daemons serve NIXL (frames otherwise, and for a READ that
    fails, once).

    >>> a = Assembler(daemon.endpoint, daemon.assembly_endpoint, node="node-0", auth_dir=None)  # doctest: +SKIP
    >>> a.start(); daemon.serve(); a.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        endpoint: str,
        assembly_endpoint: str,
        *,
        node: str | None,
        auth_dir: str | None,
        timeout: float = 30.0,
        nixl: RegisteredMemory | None = None,
    ):
        self.endpoint = endpoint
        self.nixl = nixl
        self.assembly_endpoint = assembly_endpoint
        self.node = node
        self.auth_dir = auth_dir
        self.timeout = timeout
        self._epoch: int | None = None  # the daemon's timeline the steps tried are of
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stager-assembler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)  # a daemon thread: a read it is blocked in cannot delay the exit

    def _run(self) -> None:
        done = None  # the newest step tried: each complete version is assembled once
        sub = channel = None
        while not self._stop.is_set():
            try:
                if sub is None:
                    sub = Subscriber(
                        self.endpoint,
                        view="native",
                        keep_fp8=True,
                        timeout=self.timeout,
                        node=self.node,
                        auth_dir=self.auth_dir,
                        transport="auto" if self.nixl is not None else "frames",
                        nixl_agent=HeldAgent(self.nixl) if self.nixl is not None else None,
                    )
                if channel is None:
                    channel = AssemblerChannel(self.assembly_endpoint)
                    done = self._restarted(channel, done)  # the timeline the steps tried belong to
                if self.nixl is not None:
                    sweep()  # READs of a failed assembly that ended since: their segment may be reused
                # (a partial version makes the subscriber ask its daemon for the job again, so a
                # job joined after the assembler started is found)
                snap = sub.wait_for_newer(done, timeout=1.0)
                done = snap.step
                with snap:
                    if snap.placement() is not None:  # a multi-node job's version (else nothing to pull)
                        self._assemble(channel, snap)
            except StagerError as exc:
                if exc.code == ErrorCode.TIMEOUT:
                    done = self._restarted(channel, done)
                else:
                    log.info("full assembly: %s", exc)
                    self._stop.wait(1.0)
            except Exception:  # never the daemon's end: log it and try the next version
                log.exception("full assembly failed")
                for closing in (sub, channel):
                    if closing is not None:
                        closing.close()
                sub = channel = None
                self._stop.wait(1.0)
        for closing in (sub, channel):
            if closing is not None:
                closing.close()

    def _restarted(self, channel: AssemblerChannel | None, done: int | None) -> int | None:
        """``done``, or None when the daemon began a new timeline (a job restarted, or a new one
        began) since: it stages steps from a lower number again, and its newest is tried anew."""
        if channel is None:
            return done
        try:
            epoch = channel.request(Status(), self.timeout, StatusReply).status.get("epoch")
        except StagerError:  # the daemon is shutting down (or its loop is busy): ask next time
            return done
        changed = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        return None if changed else done

    def _assemble(self, channel: AssemblerChannel, snap) -> None:
        specs = tuple((name, dtype_name(dt), tuple(shape)) for name, dt, shape in snap.specs())
        reply = channel.request(
            AssembleBegin(step=snap.step, lease=snap.lease, specs=specs), BEGIN_TIMEOUT_S, AssembleReply
        )
        if reply.reason:
            log.debug("full assembly of step %d skipped (%s): %s", snap.step, reply.reason, reply.message)
            return
        ok, why = False, ""
        try:
            mapped = self.nixl.mapping(reply.segment) if self.nixl is not None else None
            snap.load_into(segment_targets(reply, specs, mapped))  # the mapping goes with the views, before done
            ok = True
        except BaseException as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            try:  # the segment goes back to the daemon (or becomes the step's whole version) either way
                channel.request(
                    AssembleDone(step=snap.step, segment=reply.segment, ok=ok, reason=why[:2000]), self.timeout, Ok
                )
            except StagerError as exc:
                log.info("full assembly of step %d: the daemon did not take the segment back: %s", snap.step, exc)
