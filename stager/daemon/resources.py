"""What the daemon holds from the operating system, and gives back however it ends.

:class:`Resources` takes them in order (the endpoint's lock, the NIXL agent with ``--transport nixl``
(the segment factory registers each new segment with it), the segment budget, the ZeroMQ
context and socket, the CURVE authenticator, the bound endpoint, the private assembler socket with
``--assemble-full``; the metrics server once the daemon starts it) and :meth:`Resources.close` gives back whatever was
taken: after a failed start, on :meth:`~stager.daemon.server.Daemon.close`, or at interpreter exit.
No segment, socket file or lock outlives the daemon.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
from collections.abc import Callable

import zmq

from stager.protocol import ErrorCode, StagerError
from stager.protocol.endpoint import ipc_path, is_ipv6_endpoint, lock_path, runtime_dir
from stager.protocol.shm import SHM_DIR

from .config import DaemonConfig
from .memory import SegmentBudget
from .nixl_agent import SegmentRegistry
from .segments import Segment, reclaim_stale, shm_total_bytes

log = logging.getLogger("stager.daemon")


class DaemonBusy(StagerError):
    """Another daemon already serves the endpoint."""


class Resources:
    """The lock, budget, socket, authenticator, assembler socket and metrics server of one daemon.
    :meth:`open` takes them; each field is None until taken."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint  # the bound one after open() (a tcp port 0 or '*' resolved)
        self.lock_fd: int | None = None
        self.nixl: SegmentRegistry | None = None  # --transport nixl: the daemon's agent and its registrations
        self.budget: SegmentBudget | None = None
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self.auth = None  # zmq's ThreadAuthenticator, for --auth-dir
        self.sock_path: str | None = None  # the ipc socket file, once bound
        # --assemble-full: where the node's assembler (and only it) sends the assembly messages
        self.assembly_sock: zmq.Socket | None = None
        self.assembly_endpoint: str | None = None
        self._assembly_path: str | None = None
        self.metrics = None  # the metrics HTTP server (--metrics), started by the daemon

    @classmethod
    def open(cls, config: DaemonConfig, new_segment_name: Callable[[], str], nixl_name: str = "") -> Resources:
        """Take every resource a daemon serving ``config`` needs; on failure give back those taken and raise.
        ``nixl_name``: the NIXL agent's name (``--transport nixl``)."""
        res = cls(config.endpoint)
        try:
            res.lock_fd = take_lock(config.endpoint)
            reclaim_stale()
            shm_total = shm_total_bytes()
            if config.memory_limit > shm_total:
                log.warning(
                    "--memory-limit is %.1f GiB but %s holds only %.1f GiB: steps past that are refused with "
                    "memory_limit; enlarge %s (docker --shm-size, a larger tmpfs) or lower --memory-limit",
                    config.memory_limit / 2**30,
                    SHM_DIR,
                    shm_total / 2**30,
                    SHM_DIR,
                )
            if config.transport == "nixl":  # before the budget: its factory registers each segment it creates
                res.nixl = SegmentRegistry(nixl_name)
            res.budget = SegmentBudget(config.memory_limit, Segment, new_segment_name, res.nixl)
            res.ctx = zmq.Context()
            res.sock = res.ctx.socket(zmq.ROUTER)
            res.sock.setsockopt(zmq.LINGER, 0)
            # report (rather than silently drop) sends to a peer that left or stopped reading
            res.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # a peer sending a frame larger than the whole budget is disconnected before it is buffered
            res.sock.setsockopt(zmq.MAXMSGSIZE, config.memory_limit)
            if config.auth_dir:
                res.auth = start_authenticator(res.ctx, res.sock, config.auth_dir)
            res._bind()
            if config.assemble_full:
                res._bind_assembly()
            res.budget.preallocate(config.preallocate)  # in the background: serving starts now
        except BaseException:  # a daemon that could not start holds nothing: no lock, thread or segment
            res.close()
            raise
        return res

    def _bind(self) -> None:
        path = ipc_path(self.endpoint)
        if path:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            try:
                os.unlink(path)  # left by a killed daemon; we hold the lock, so it is stale
            except FileNotFoundError:
                pass
            old_umask = os.umask(0o077)  # socket file readable by the owning user only
            try:
                self.sock.bind(self.endpoint)
            finally:
                os.umask(old_umask)
            self.sock_path = path
            os.chmod(path, 0o600)
        else:
            if is_ipv6_endpoint(self.endpoint):
                self.sock.setsockopt(zmq.IPV6, 1)  # else ZeroMQ refuses an IPv6 literal ("No such device")
            try:
                self.sock.bind(self.endpoint)
            except zmq.ZMQError as exc:
                raise StagerError(
                    ErrorCode.UNAVAILABLE,
                    f"cannot bind {self.endpoint}: {exc.strerror}; pass a free port on an address of "
                    "this host (IPv6 in brackets: tcp://[::1]:PORT)",
                ) from None
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)  # resolves port 0 / '*'

    def _bind_assembly(self) -> None:
        """The assembler's socket: ipc in this user's runtime directory (owner-only), so only a
        process of the daemon's own user on its host can reach it (the daemon hands the path to its
        assembler); never CURVE or tcp, whatever the endpoint is. Named after the bound endpoint,
        which this daemon alone serves now: a file a killed daemon left there is stale."""
        digest = hashlib.sha1(self.endpoint.encode()).hexdigest()[:16]
        path = os.path.join(runtime_dir(), f"assembler-{digest}.sock")
        if len(path.encode()) > 100:  # sun_path: 108 bytes, with room to spare
            raise StagerError(
                ErrorCode.UNAVAILABLE,
                f"the assembler socket path {path} is too long for ipc; point XDG_RUNTIME_DIR at a short directory",
            )
        _unlink(path)
        sock = self.assembly_sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, 64 << 20)  # specs of a version, never tensor bytes
        old_umask = os.umask(0o077)
        try:
            sock.bind(f"ipc://{path}")
        finally:
            os.umask(old_umask)
        self._assembly_path = path
        self.assembly_endpoint = f"ipc://{path}"

    def close(self) -> None:
        """Give back everything taken, segments first; a second call does nothing. Each one is given
        back whatever happened to the others (a failure is logged): a metrics server that fails to
        stop must not leave the socket bound, the lock taken or the segments mapped."""
        budget, self.budget = self.budget, None
        nixl, self.nixl = self.nixl, None
        assembly_sock, self.assembly_sock = self.assembly_sock, None
        assembly_path, self._assembly_path = self._assembly_path, None
        metrics, self.metrics = self.metrics, None
        sock, self.sock = self.sock, None
        auth, self.auth = self.auth, None
        ctx, self.ctx = self.ctx, None
        sock_path, self.sock_path = self.sock_path, None
        lock_fd, self.lock_fd = self.lock_fd, None
        _release("the segments", budget and budget.close)
        _release("the NIXL agent's registrations", nixl and nixl.close)  # after the segments: none left
        _release("the assembler socket", assembly_sock and assembly_sock.close)
        _release("the assembler socket's file", assembly_path and functools.partial(_unlink, assembly_path))
        _release("the metrics server", metrics and metrics.close)
        _release("the socket", sock and sock.close)  # LINGER: 0, or DRAIN_LINGER_MS after a drain
        _release("the CURVE authenticator", auth and auth.stop)
        _release("the ZeroMQ context", ctx and ctx.term)
        _release("the socket file", sock_path and functools.partial(_unlink, sock_path))
        _release("the endpoint's lock", lock_fd is not None and functools.partial(os.close, lock_fd))


def _release(what: str, close) -> None:
    """``close()`` (nothing when falsy); a failure is logged and the caller goes on with the rest."""
    if not close:
        return
    try:
        close()
    except Exception:
        log.exception("closing %s failed; giving back the rest", what)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def take_lock(endpoint: str) -> int | None:
    """An exclusive lock on ``endpoint`` (its fd, holding this pid), or :class:`DaemonBusy`."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        return None  # an ephemeral port is never shared: nothing to guard
    fd = os.open(lock_path(endpoint), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise DaemonBusy(
            ErrorCode.UNAVAILABLE,
            f"another stager daemon (pid {other or '?'}) already serves {endpoint}; "
            "stop it first or pass a different --endpoint",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def start_authenticator(ctx: zmq.Context, sock: zmq.Socket, auth_dir: str):
    """CURVE on ``sock``: the server key from ``auth_dir``, clients whose keys are in ``authorized/``."""
    from zmq.auth import load_certificate
    from zmq.auth.thread import ThreadAuthenticator

    key_file = os.path.join(auth_dir, "server.key_secret")
    try:
        public, secret = load_certificate(key_file)
        if secret is None:
            raise ValueError("it holds no secret key")
        mode = os.stat(key_file).st_mode & 0o777
    except (OSError, ValueError) as exc:
        raise StagerError(
            ErrorCode.UNAVAILABLE,
            f"cannot read the server's CURVE key {key_file} ({exc}); create the keys with `stager keygen {auth_dir}`",
        ) from None
    if mode & 0o077:
        log.warning(
            "%s is readable by other users (mode %o): anyone who reads it can impersonate this daemon; "
            "chmod 600 it (or recreate the keys with `stager keygen`)",
            key_file,
            mode,
        )
    auth = ThreadAuthenticator(ctx)
    auth.start()
    try:
        auth.configure_curve(domain="*", location=os.path.join(auth_dir, "authorized"))
    except BaseException:
        auth.stop()
        raise
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth
