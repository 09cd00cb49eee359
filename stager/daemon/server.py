"""`stager serve`: the per-node staging daemon's socket loop.

One thread, one ROUTER socket, no locks: requests are handled in arrival order by
:class:`~stager.daemon.handlers.Handlers`; a poll timeout drives housekeeping (dead ranks,
step timeouts, back-pressure deadlines). Tensor bytes from same-host ranks never pass through
this process: ranks write them straight into the snapshot's shared-memory segment. What the
daemon holds (lock, socket, segments) is :class:`~stager.daemon.resources.Resources`; replies
leave through :class:`~stager.daemon.outbox.SocketOutbox`. With ``--assemble-full`` the loop also
serves a second, private socket: the node's assembler's (:mod:`~stager.daemon.whole_versions`).

SIGTERM drains, SIGHUP reopens the logs (:mod:`~stager.daemon.lifecycle`); with ``--metrics``
the loop publishes a metrics snapshot every tick for the HTTP thread (:mod:`~stager.daemon.recorder`).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import secrets
import time
import weakref
from collections.abc import Callable

import zmq

from stager.protocol import ErrorCode, ErrorReply, Message, ProtocolError, StagerError, decode, logs
from stager.protocol.endpoint import host_id
from stager.protocol.shm import segment_name

from .config import DaemonConfig
from .handlers import Handlers
from .lifecycle import DRAINING, Lifecycle, refusal
from .nixl_agent import agent_name
from .outbox import SocketOutbox
from .recorder import Recorder
from .resources import Resources
from .state import DaemonState
from .status import LoopOptions

log = logging.getLogger("stager.daemon")
HOUSEKEEPING_S = 0.2
DRAIN_LINGER_MS = 2000  # after a drain: how long queued replies may still take to leave
_MAX_FRAMES = 1 << 16


class LoopReport:
    """The loop's piece of status: what only the socket loop and its process know."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        recorder: Recorder,
        *,
        endpoint: str,
        started: float,
        metrics_url: str | None,
        insecure: bool,
    ):
        self.lifecycle, self.recorder = lifecycle, recorder
        self.endpoint = endpoint
        self.started = started
        self.metrics_url = metrics_url
        self.insecure = insecure

    def status(self) -> LoopOptions:
        out: LoopOptions = {
            "pid": os.getpid(),
            "cpu_seconds": time.process_time(),  # ns resolution; psutil's ticks are 10 ms
            "state": self.lifecycle.phase,
            "endpoint": self.endpoint,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "subscriber_lag": self.recorder.subscriber_lag(),
        }
        if self.metrics_url is not None:
            out["metrics"] = self.metrics_url
        if self.insecure:  # `stager status --json` says so too
            out["insecure"] = True
        return out


class Daemon:
    """The staging daemon. ``Daemon(DaemonConfig(...)).serve()`` runs until SIGTERM/SIGINT or
    :meth:`stop`; :meth:`close` releases the socket, the lock and every shared-memory segment.

    >>> d = Daemon(DaemonConfig(endpoint="ipc:///tmp/stager-doc.sock", memory_limit=1 << 20))  # doctest: +SKIP
    >>> d.serve()  # doctest: +SKIP
    """

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.session = secrets.token_hex(8)
        self._serial = itertools.count(1)
        self.started = time.monotonic()
        self.lifecycle = Lifecycle(config.drain_timeout)
        # built in dependency order: resources, the shared state, what observes it, then the handlers
        nixl_name = agent_name(config.host_id or host_id(), self.session)
        self.resources = res = Resources.open(config, self._segment_name, nixl_name)
        self.endpoint = res.endpoint
        self.budget = res.budget
        self.nixl = res.nixl  # --transport nixl: the agent, handed to the full assembler (`stager serve` starts it)
        self.sock = res.sock
        if config.insecure:
            log.warning(
                "serving %s WITHOUT AUTHENTICATION (--insecure-no-auth): every user of this host can read "
                "status and snapshots and stage steps; use --auth-dir with `stager keygen` keys or the "
                "default ipc endpoint",
                self.endpoint,
            )
        try:
            self.state = DaemonState(
                keep=config.keep,
                step_timeout=config.step_timeout,
                peer_timeout=config.peer_timeout,
                host_id=config.host_id or host_id(),
                session=self.session,
            )
            self.recorder = Recorder(self.state)
            if config.metrics:
                from .recorder import serve_metrics

                res.metrics = serve_metrics(self.recorder, config.metrics)
            self.metrics = res.metrics  # the metrics HTTP server (--metrics), else None
            self.outbox = SocketOutbox(res.sock, on_sent=self.recorder.on_sent)
            # --assemble-full: the assembler's own socket (its replies never mix with the endpoint's peers)
            self.assembly_outbox = (
                SocketOutbox(res.assembly_sock, on_sent=lambda identity, msg: None)
                if res.assembly_sock is not None
                else None
            )
            self.assembly_endpoint = res.assembly_endpoint  # handed to the assembler (`stager serve` starts it)
            loop = LoopReport(
                self.lifecycle,
                self.recorder,
                endpoint=self.endpoint,
                started=self.started,
                metrics_url=self.metrics_url,
                insecure=config.insecure,
            )
            self.handlers = Handlers(
                self.state,
                self.budget,
                self.outbox,
                advertise=config.advertise or self.endpoint,
                loop_status=loop.status,
                assembly_outbox=self.assembly_outbox,
                nixl=res.nixl,
                change_dtypes=config.change_map_dtypes(),
                change_keep=config.change_maps_keep,
                change_bytes=config.change_maps_memory,
                read_cast_memory=config.read_cast_memory,
            )
            if self.metrics is not None:
                self.recorder.publish(self.handlers.status())
        except BaseException:
            res.close()
            raise
        self._finalizer = weakref.finalize(self, res.close)  # at interpreter exit too

    @property
    def metrics_url(self) -> str | None:
        return self.metrics.url if self.metrics is not None else None

    def _segment_name(self) -> str:
        return segment_name(os.getpid(), self.session, next(self._serial))

    # ------------------------------------------------------------------ loop

    def _on_frames(self, frames: list) -> None:
        """A request on the daemon's endpoint."""
        self._serve_request(frames, self.handlers.handle, self.outbox, self._peer_name, refuse_draining=True)

    def _on_assembly_frames(self, frames: list) -> None:
        """A request on the private assembler socket (never refused while draining: an assembly under
        way must still be able to give its segment back)."""
        self._serve_request(
            frames,
            self.handlers.handle_assembly,
            self.assembly_outbox,
            lambda identity: "assembler",
            refuse_draining=False,
        )

    def _serve_request(
        self,
        frames: list,
        handle: Callable[[bytes, Message], Message | None],
        outbox: SocketOutbox,
        peer_name: Callable[[bytes], str | None],
        *,
        refuse_draining: bool,
    ) -> None:
        identity = frames[0].bytes
        rid = 0
        self.state.counters["requests"] += 1  # every request, also those refused before a handler
        try:
            if len(frames) > _MAX_FRAMES:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"too many frames ({len(frames)}); split the message")
            msg = decode(frames[1:])
            rid = msg.id
            refused = refusal(self.lifecycle.phase, msg, self.state.staging) if refuse_draining else None
            if refused is not None:
                self.recorder.refused_draining += 1
                raise refused
            reply = handle(identity, msg)
            self.recorder.on_request(identity, msg, reply)
        except StagerError as exc:
            rid = rid or getattr(exc, "request_id", 0)
            self.state.counters["errors"] += 1
            reply = ErrorReply(code=getattr(exc.code, "value", str(exc.code)), message=exc.message)
            log.debug("request failed: %s", exc, extra={"code": reply.code, "peer": peer_name(identity)})
        except Exception as exc:  # a bug must cost one request, never the daemon
            self.state.counters["errors"] += 1
            log.exception("internal error while handling a request")
            reply = ErrorReply(
                code=ErrorCode.INTERNAL.value,
                message=f"internal error ({exc.__class__.__name__}: {exc}); the daemon keeps "
                "serving, please report this with the daemon log",
            )
        if reply is not None:
            reply.id = rid
            outbox.send(identity, reply)

    def _peer_name(self, identity: bytes) -> str | None:
        peer = self.state.peers.get(identity)
        return f"{peer.role} {peer.rank} pid {peer.pid}" if peer is not None else None

    def stop(self, *_args) -> None:
        """Stop at once: steps in flight fail (``close``)."""
        self.lifecycle.request_stop("now")

    def drain(self, reason: str = "drain") -> None:
        """Stop once the steps in flight sealed (or ``drain_timeout`` passed); new stages are refused."""
        self.lifecycle.request_stop(reason)

    def _on_tick(self) -> None:
        """Once per housekeeping tick, and right after a signal: act on the lifecycle's flags."""
        life = self.lifecycle
        if life.reopen_requested:
            life.reopen_requested = False
            log.info("SIGHUP: reopened %d log files", logs.reopen())
        if life.phase == DRAINING and not life.announced:
            life.announced = True
            state = self.state
            # a drain is the normal way out (systemd, Kubernetes, Slurm all stop with SIGTERM): info, not a warning
            log.info(
                "draining (%s): %d steps in flight %s, new stages are refused; exiting within %.0fs",
                life.reason,
                len(state.staging),
                sorted(state.staging),
                life.drain_timeout,
            )
            notice = ErrorReply(id=0, code=ErrorCode.UNAVAILABLE.value, message=life.drain_message(self.endpoint))
            for identity, peer in list(state.peers.items()):
                if peer.role == "reader" or identity in state.subscribers:
                    self.outbox.send(identity, notice)
        if self.metrics is not None:
            self.recorder.publish(self.handlers.status())

    def serve(self, *, ready=None) -> None:
        """Serve until :meth:`stop`, or a drain (:meth:`drain`; SIGTERM/SIGINT when called from the
        main thread, where SIGHUP reopens the log files) ends."""
        self.lifecycle.install_signals()
        if ready is not None:
            ready(self)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        assembly_sock = self.resources.assembly_sock
        if assembly_sock is not None:
            poller.register(assembly_sock, zmq.POLLIN)
        next_housekeeping = time.monotonic() + HOUSEKEEPING_S
        try:
            while not self.lifecycle.should_exit(len(self.state.staging)):
                timeout_ms = max(0, int((next_housekeeping - time.monotonic()) * 1000))
                if self.budget.creating or self.handlers.changes.working:
                    # a step may be waiting for a segment being created; a change map's pins hold a
                    # segment back from the pool, and its readers wait for it: collect it when made
                    timeout_ms = min(timeout_ms, 5)
                try:
                    events = dict(poller.poll(timeout_ms))
                except zmq.ZMQError as exc:  # EINTR from a signal: loop and check _stop
                    if exc.errno != errno.EINTR:
                        raise
                    continue
                if self.sock in events:
                    for _ in range(256):  # drain a burst, but keep housekeeping on time
                        try:
                            frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_frames(frames)
                if assembly_sock is not None and assembly_sock in events:
                    for _ in range(16):  # one assembler: a few requests at most
                        try:
                            frames = assembly_sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_assembly_frames(frames)
                if self.budget.creating:
                    self.handlers.collect_segments()
                if self.handlers.changes.finished:
                    self.handlers.collect_changes()
                if (
                    time.monotonic() >= next_housekeeping
                    or self.lifecycle.reopen_requested
                    or (self.lifecycle.phase == DRAINING and not self.lifecycle.announced)
                ):
                    try:
                        self.handlers.housekeep()
                    except Exception:
                        log.exception("housekeeping failed; continuing")
                    try:  # apart from housekeeping: a drain is announced (once) even if housekeeping fails
                        self._on_tick()
                    except Exception:
                        log.exception("lifecycle tick failed; continuing")
                    next_housekeeping = time.monotonic() + HOUSEKEEPING_S
            if self.lifecycle.phase == DRAINING:
                left = sorted(self.state.staging)
                if left:
                    log.warning("drain timeout: failing steps %s", left)
                else:
                    log.info("drained: nothing in flight, exiting")
                # replies still queued (the last seals, the readers' notice, remote reads) go out, for a while
                self.sock.setsockopt(zmq.LINGER, DRAIN_LINGER_MS)
        finally:
            self.close()

    def close(self) -> None:
        """Fail steps in flight, unlink every segment, close the socket and remove its file."""
        if self._finalizer.alive:
            try:
                self.handlers.close()
            finally:
                self._finalizer()
