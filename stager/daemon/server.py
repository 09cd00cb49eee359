"""`stager serve`: the per-node staging daemon's socket loop and resources.

One thread, one ROUTER socket, no locks: requests are handled in arrival order by
:class:`~stager.daemon.handlers.Handlers`; a poll timeout drives housekeeping (dead ranks,
step timeouts, back-pressure deadlines). Tensor bytes from same-host ranks never pass through
this process: ranks write them straight into the snapshot's shared-memory segment.

SIGTERM drains, SIGHUP reopens the logs (:mod:`~stager.daemon.lifecycle`); with ``--metrics``
the loop publishes a metrics snapshot every tick for the HTTP thread (:mod:`~stager.daemon.recorder`).
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import itertools
import logging
import os
import queue
import secrets
import threading
import time
import weakref
from typing import Any, Callable

import zmq

from stager.protocol import ErrorCode, ErrorReply, Message, ProtocolError, StagerError, decode
from stager.protocol import logs
from stager.protocol.endpoint import host_id, ipc_path, is_ipv6_endpoint, lock_path
from stager.protocol.shm import SHM_DIR, segment_name

from .config import DaemonConfig
from .handlers import Handlers
from .lifecycle import DRAINING, Lifecycle, refusal
from .memory import SegmentBudget
from .segments import Segment, reclaim_stale, shm_total_bytes

log = logging.getLogger("stager.daemon")
HOUSEKEEPING_S = 0.2
DRAIN_LINGER_MS = 2000  # after a drain: how long queued replies may still take to leave
_MAX_FRAMES = 1 << 16


class DaemonBusy(StagerError):
    """Another daemon already serves the endpoint."""


def _close_resources(sock, ctx, lock_fd, sock_path, budget, auth, metrics=None, pipe=()) -> None:
    # Runs on close() or at interpreter exit: no segment or socket file may outlive the daemon.
    try:
        budget.close()
    finally:
        for fd in pipe:
            os.close(fd)
        if metrics is not None:
            metrics.close()
        if sock is not None:
            sock.close()  # LINGER: 0, or DRAIN_LINGER_MS after a drain
        if auth is not None:
            auth.stop()
        if ctx is not None:
            ctx.term()
        if sock_path:
            try:
                os.unlink(sock_path)
            except FileNotFoundError:
                pass
        if lock_fd is not None:
            os.close(lock_fd)


class Daemon:
    """The staging daemon. ``Daemon(DaemonConfig(...)).serve()`` runs until SIGTERM/SIGINT or
    :meth:`stop`; :meth:`close` releases the socket, the lock and every shared-memory segment.

    >>> d = Daemon(DaemonConfig(endpoint="ipc:///tmp/stager-doc.sock", memory_limit=1 << 20))  # doctest: +SKIP
    >>> d.serve()  # doctest: +SKIP
    """

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.endpoint = config.endpoint
        self.session = secrets.token_hex(8)
        self._serial = itertools.count(1)
        self.started = time.monotonic()
        self.lifecycle = Lifecycle(config.drain_timeout)
        self.metrics = None  # the metrics HTTP server (--metrics)
        self._lock_fd = self._take_lock()
        reclaim_stale()
        shm_total = shm_total_bytes()
        if config.memory_limit > shm_total:
            log.warning("--memory-limit is %.1f GiB but %s holds only %.1f GiB: steps past that are refused with "
                        "memory_limit; enlarge %s (docker --shm-size, a larger tmpfs) or lower --memory-limit",
                        config.memory_limit / 2**30, SHM_DIR, shm_total / 2**30, SHM_DIR)
        self.budget = SegmentBudget(config.memory_limit, Segment, self._segment_name)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # report (rather than silently drop) sends to a peer that left or stopped reading
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # a peer sending a frame larger than the whole budget is disconnected before it is buffered
        self.sock.setsockopt(zmq.MAXMSGSIZE, config.memory_limit)
        self._auth = None
        self._sock_path = ipc_path(self.endpoint)
        try:
            self._auth = self._setup_auth() if config.auth_dir else None
            self._bind()
            self.budget.preallocate(config.preallocate)  # in the background: serving starts now
        except BaseException:  # a daemon that could not start holds nothing: no lock, thread or segment
            _close_resources(self.sock, self.ctx, self._lock_fd, None, self.budget, self._auth)
            raise
        if config.insecure:
            log.warning("serving %s WITHOUT AUTHENTICATION (--insecure-no-auth): every user of this host can read "
                        "status and snapshots and stage steps; use --auth-dir with `stager keygen` keys or the "
                        "default ipc endpoint", self.endpoint)
        self.handlers = Handlers(
            budget=self.budget, send=self._send, send_tracked=self._send_tracked, keep=config.keep,
            step_timeout=config.step_timeout,
            peer_timeout=config.peer_timeout, host_id=config.host_id or host_id(), session=self.session,
            advertise=config.advertise or self.endpoint)
        self.assembly = None  # serve --assemble-full: the loop's half (_prepare_assembly)
        from .recorder import Recorder

        self.recorder = Recorder(self.handlers.state)
        base_status = self.handlers.status
        self.handlers.status = lambda: self._status(base_status())
        if config.metrics:
            try:
                from .recorder import serve_metrics

                self.metrics = serve_metrics(self.recorder, config.metrics)
                self.recorder.publish(self.handlers.status())
            except BaseException:
                _close_resources(self.sock, self.ctx, self._lock_fd, self._sock_path, self.budget, self._auth,
                                 self.metrics)
                raise
        # other threads (the full assembler) run work on this loop through call(): a queue, and a pipe
        # whose byte wakes the poll
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closing = False
        self._calls_lock = threading.Lock()
        self._workers: list = []
        if config.assemble_full:
            self._prepare_assembly()
        self._finalizer = weakref.finalize(
            self, _close_resources, self.sock, self.ctx, self._lock_fd, self._sock_path, self.budget, self._auth,
            self.metrics, (self._wake_r, self._wake_w))

    def _prepare_assembly(self) -> None:
        from .whole_versions import FullAssembly

        h = self.handlers
        self.assembly = FullAssembly(h.state, h.memory, h.reading.announce, self._segment_name)

    def attach(self, worker) -> None:
        """Start a background ``worker`` (``start()``/``close()``; e.g. the full assembler), closed
        with the daemon; it reaches the loop through :meth:`call`."""
        self._workers.append(worker)
        worker.start()

    def call(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Run ``fn`` on the socket loop (the daemon's state is not locked) and return its result;
        for the daemon's own background threads. A call the loop did not start within ``timeout``
        never runs (TimeoutError)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._calls_lock:  # never queued after close() failed the queue, never written to a closed pipe
            if self._closing:
                raise StagerError(ErrorCode.UNAVAILABLE, "the daemon is shutting down")
            self._calls.put((fn, future))
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already: the loop is on its way
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.cancel():
                raise TimeoutError(f"the daemon's loop did not run a call within {timeout:.0f}s") from None
            return future.result()  # it started meanwhile: its result is the caller's

    def _run_calls(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up: it must not run without one
            if self._closing:
                future.set_exception(StagerError(ErrorCode.UNAVAILABLE, "the daemon is shutting down"))
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # the caller's failure, never the loop's
                future.set_exception(exc)

    @property
    def metrics_url(self) -> str | None:
        return self.metrics.url if self.metrics is not None else None

    def _status(self, status: dict) -> dict:
        """The handlers' status plus what the loop knows: phase, uptime, ages, subscriber lag."""
        state, now = self.handlers.state, time.monotonic()
        for v in status["versions"]:
            held = state.sealed.get(v["step"]) if v["state"] == "sealed" else state.staging.get(v["step"])
            since = (held.sealed_at if v["state"] == "sealed" else held.started) if held is not None else None
            if since is not None:
                v["age_s"] = round(now - since, 3)
        status.update(state=self.lifecycle.phase, endpoint=self.endpoint, uptime_s=round(now - self.started, 3),
                      subscriber_lag=self.recorder.subscriber_lag())
        if self.metrics is not None:
            status["metrics"] = self.metrics.url
        if self.config.insecure:  # `stager status --json` says so too
            status["insecure"] = True
        if self.assembly is not None:
            status["assembly"] = self.assembly.status()
        return status

    # ------------------------------------------------------------------ setup

    def _take_lock(self) -> int | None:
        if self.endpoint.startswith("tcp://") and self.endpoint.endswith(":0"):
            return None  # an ephemeral port is never shared: nothing to guard
        path = lock_path(self.endpoint)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DaemonBusy(
                ErrorCode.UNAVAILABLE,
                f"another stager daemon (pid {other or '?'}) already serves {self.endpoint}; "
                "stop it first or pass a different --endpoint",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _bind(self) -> None:
        if self._sock_path:
            os.makedirs(os.path.dirname(self._sock_path) or ".", mode=0o700, exist_ok=True)
            try:
                os.unlink(self._sock_path)  # left by a killed daemon; we hold the lock, so it is stale
            except FileNotFoundError:
                pass
            old_umask = os.umask(0o077)  # socket file readable by the owning user only
            try:
                self.sock.bind(self.endpoint)
            finally:
                os.umask(old_umask)
            os.chmod(self._sock_path, 0o600)
        else:
            if is_ipv6_endpoint(self.endpoint):
                self.sock.setsockopt(zmq.IPV6, 1)  # else ZeroMQ refuses an IPv6 literal ("No such device")
            try:
                self.sock.bind(self.endpoint)
            except zmq.ZMQError as exc:
                raise StagerError(ErrorCode.UNAVAILABLE,
                                  f"cannot bind {self.endpoint}: {exc.strerror}; pass a free port on an address of "
                                  "this host (IPv6 in brackets: tcp://[::1]:PORT)") from None
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)  # resolves port 0 / '*'

    def _setup_auth(self):
        from zmq.auth import load_certificate
        from zmq.auth.thread import ThreadAuthenticator

        auth_dir = self.config.auth_dir
        key_file = os.path.join(auth_dir, "server.key_secret")
        try:
            public, secret = load_certificate(key_file)
            if secret is None:
                raise ValueError("it holds no secret key")
            mode = os.stat(key_file).st_mode & 0o777
        except (OSError, ValueError) as exc:
            raise StagerError(ErrorCode.UNAVAILABLE, f"cannot read the server's CURVE key {key_file} ({exc}); "
                                                     f"create the keys with `stager keygen {auth_dir}`") from None
        if mode & 0o077:
            log.warning("%s is readable by other users (mode %o): anyone who reads it can impersonate this daemon; "
                        "chmod 600 it (or recreate the keys with `stager keygen`)", key_file, mode)
        auth = ThreadAuthenticator(self.ctx)
        auth.start()
        try:
            auth.configure_curve(domain="*", location=os.path.join(auth_dir, "authorized"))
        except BaseException:
            auth.stop()
            raise
        self.sock.curve_secretkey, self.sock.curve_publickey, self.sock.curve_server = secret, public, True
        return auth

    def _segment_name(self) -> str:
        return segment_name(os.getpid(), self.session, next(self._serial))

    # ------------------------------------------------------------------ loop

    def _send(self, identity: bytes, msg: Message) -> bool:
        """Send without ever blocking the loop; False when ZeroMQ dropped it (peer gone or not reading)."""
        sent = self._send_frames(identity, msg, track=False) is not None
        if sent:
            self.recorder.on_sent(identity, msg)
        return sent

    def _send_tracked(self, identity: bytes, msg: Message) -> list | None:
        """Send a message whose frames point into shared memory, without copying them; returns a
        tracker per frame (done once ZeroMQ no longer needs the bytes), None when dropped."""
        return self._send_frames(identity, msg, track=True)

    def _send_frames(self, identity: bytes, msg: Message, *, track: bool) -> list | None:
        try:
            parts = msg.encode()
            trackers = []
            if track:
                frames = [zmq.Frame(f, copy=False, track=True) for f in parts[1:]]
                trackers = [f.tracker for f in frames]
                parts = [parts[0], *frames]
            self.sock.send_multipart([identity, *parts], flags=zmq.NOBLOCK, copy=False)
            return trackers
        except zmq.Again:  # announcements to a reader that lags are expected to drop: not worth a warning
            log.log(logging.DEBUG if msg.id == 0 else logging.WARNING, "dropped a %s message: the peer is not reading",
                    msg.TYPE)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer left
            log.debug("dropped a %s message: %s", msg.TYPE, exc)
        except ProtocolError as exc:  # a reply that cannot be encoded (e.g. odd model_info): say so
            try:
                error = ErrorReply(id=msg.id, code=exc.code.value, message=exc.message)
                self.sock.send_multipart([identity, *error.encode()], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        return None

    def _on_frames(self, frames: list) -> None:
        identity = frames[0].bytes
        rid = 0
        self.handlers.state.counters["requests"] += 1  # every request, also those refused before a handler
        try:
            if len(frames) > _MAX_FRAMES:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"too many frames ({len(frames)}); split the message")
            msg = decode(frames[1:])
            rid = msg.id
            refused = refusal(self.lifecycle.phase, msg, self.handlers.state.staging)  # no copy: per request
            if refused is not None:
                self.recorder.refused_draining += 1
                raise refused
            reply = self.handlers.handle(identity, msg)
            self.recorder.on_request(identity, msg, reply)
        except StagerError as exc:
            rid = rid or getattr(exc, "request_id", 0)
            self.handlers.state.counters["errors"] += 1
            reply = ErrorReply(code=getattr(exc.code, "value", str(exc.code)), message=exc.message)
            log.debug("request failed: %s", exc, extra={"code": reply.code, "peer": self._peer_name(identity)})
        except Exception as exc:  # a bug must cost one request, never the daemon
            self.handlers.state.counters["errors"] += 1
            log.exception("internal error while handling a request")
            reply = ErrorReply(code=ErrorCode.INTERNAL.value,
                               message=f"internal error ({exc.__class__.__name__}: {exc}); the daemon keeps "
                                       "serving, please report this with the daemon log")
        if reply is not None:
            reply.id = rid
            self._send(identity, reply)

    def _peer_name(self, identity: bytes) -> str | None:
        peer = self.handlers.state.peers.get(identity)
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
            state = self.handlers.state
            # a drain is the normal way out (systemd, Kubernetes, Slurm all stop with SIGTERM): info, not a warning
            log.info("draining (%s): %d steps in flight %s, new stages are refused; exiting within %.0fs",
                        life.reason, len(state.staging), sorted(state.staging), life.drain_timeout)
            notice = ErrorReply(id=0, code=ErrorCode.UNAVAILABLE.value, message=life.drain_message(self.endpoint))
            for identity, peer in list(state.peers.items()):
                if peer.role == "reader" or identity in state.subscribers:
                    self._send(identity, notice)
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
        poller.register(self._wake_r, zmq.POLLIN)
        next_housekeeping = time.monotonic() + HOUSEKEEPING_S
        try:
            while not self.lifecycle.should_exit(len(self.handlers.state.staging)):
                timeout_ms = max(0, int((next_housekeeping - time.monotonic()) * 1000))
                if self.budget.creating:  # a step may be waiting for a segment being created
                    timeout_ms = min(timeout_ms, 5)
                try:
                    events = dict(poller.poll(timeout_ms))
                except zmq.ZMQError as exc:  # EINTR from a signal: loop and check _stop
                    if exc.errno != zmq.EINTR:
                        raise
                    continue
                if self.sock in events:
                    for _ in range(256):  # drain a burst, but keep housekeeping on time
                        try:
                            frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_frames(frames)
                if self._wake_r in events:
                    self._run_calls()
                if self.budget.creating:
                    self.handlers.collect_segments()
                if time.monotonic() >= next_housekeeping or self.lifecycle.reopen_requested or (
                        self.lifecycle.phase == DRAINING and not self.lifecycle.announced):
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
                left = sorted(self.handlers.state.staging)
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
            with self._calls_lock:
                self._closing = True
            try:
                self._run_calls()  # fail what the assembler still waits for
                for worker in self._workers:
                    worker.close()
                self.handlers.close()
            finally:
                self._finalizer()
