"""One client connection to the daemon: request/reply with timeouts over a DEALER socket.

Not thread-safe: each thread that talks to the daemon owns its own Connection. A socket
monitor tracks whether the daemon is reachable, so a request to a daemon that is down fails
at once instead of waiting out its timeout; after a timeout the socket is rebuilt (queued
messages to a dead daemon are dropped, never delivered to its successor).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from typing import Callable

import psutil
import zmq
from zmq.utils.monitor import recv_monitor_message

from stager.endpoint import host_id, resolve
from stager.protocol import (
    Bye, ErrorCode, ErrorReply, Hello, HelloReply, Message, ProtocolError, StagerError, decode,
)

log = logging.getLogger("stager.client")
_CONNECTED = zmq.EVENT_HANDSHAKE_SUCCEEDED  # only then does an IMMEDIATE socket accept sends
_DISCONNECTED = zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


AUTH_ENV = "STAGER_AUTH_DIR"


def curve_keys_from_env() -> dict:
    """CURVE client keys from ``$STAGER_AUTH_DIR`` (made by ``stager keygen``), or {} when unset."""
    auth_dir = os.environ.get(AUTH_ENV)
    if not auth_dir:
        return {}
    from zmq.auth import load_certificate

    try:
        server_public, _ = load_certificate(os.path.join(auth_dir, "server.key"))
        public, secret = load_certificate(os.path.join(auth_dir, "client.key_secret"))
    except (OSError, ValueError) as exc:
        raise StagerError(ErrorCode.UNAVAILABLE, f"cannot read CURVE keys from {AUTH_ENV}={auth_dir}: {exc}; "
                                                 "create them with `stager keygen DIR`") from None
    return {"curve_serverkey": server_public, "curve_publickey": public, "curve_secretkey": secret}


class Connection:
    """A DEALER connection with hello, request(), and reachability tracking."""

    def __init__(self, endpoint: str | None, *, role: str, rank: int = 0, local_world_size: int = 1,
                 world_size: int = 1):
        self.endpoint = resolve(endpoint)
        self.role, self.rank = role, rank
        self.local_world_size, self.world_size = local_world_size, world_size
        self.curve = curve_keys_from_env() if self.endpoint.startswith("tcp://") else {}
        self._ids = itertools.count(1)
        self._ctx = zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self.connected = False
        self.session: str | None = None  # daemon session after hello; None: hello needed
        self._first_connect = True  # only the first hello waits for the socket to connect
        self.generation = 0
        self.daemon_host: str | None = None
        self.host_id = host_id()
        self._start_time = psutil.Process().create_time()
        self.on_unsolicited: Callable[[Message], None] = lambda msg: log.debug("stray reply %r", msg)
        self._open()

    # ------------------------------------------------------------------ socket lifecycle

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer that is not connected
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        for key in ("curve_serverkey", "curve_publickey", "curve_secretkey"):
            if key in self.curve:
                setattr(sock, key, self.curve[key])
        self._monitor = sock.get_monitor_socket(_CONNECTED | _DISCONNECTED)
        sock.connect(self.endpoint)
        self.sock, self.connected, self.session = sock, False, None
        self.generation += 1  # requests sent on an earlier socket can never be answered

    def reset(self) -> None:
        """Drop the socket and everything queued on it; the next request says hello again."""
        self.close()
        self._open()

    def close(self) -> None:
        """Say bye (so the daemon ends this peer's leases at once) and close the socket."""
        if self.sock is not None and self.session is not None and self.connected:
            try:
                self.sock.send_multipart(Bye(id=0).encode(), flags=zmq.NOBLOCK)
                self.sock.close(linger=200)  # let the bye leave; never longer
                self._monitor.close(linger=0)
                self.sock = self._monitor = None
                return
            except zmq.ZMQError:
                pass
        if self.sock is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self.sock.close(linger=0)
            self.sock = self._monitor = None

    def poll_monitor(self, timeout_ms: int = 0) -> bool:
        """Update :attr:`connected` from monitor events; returns it."""
        while self._monitor.poll(timeout_ms):
            event = recv_monitor_message(self._monitor)["event"]
            if event & _CONNECTED:
                self.connected = True
            elif event & _DISCONNECTED:
                self.connected, self.session = False, None
            timeout_ms = 0
        return self.connected

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.poll_monitor(0):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.poll_monitor(int(min(left, 0.05) * 1000) + 1)
        return True

    # ------------------------------------------------------------------ messages

    def send(self, msg: Message) -> int:
        msg.id = next(self._ids)
        try:
            self.sock.send_multipart(msg.encode(), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.connected = False
            raise StagerError(ErrorCode.UNAVAILABLE, self._unreachable()) from None
        return msg.id

    def _unreachable(self) -> str:
        return (f"the stager daemon at {self.endpoint} is not reachable; start it with `stager serve` "
                "(or set STAGER_ENDPOINT to where it runs)")

    def recv(self, timeout: float) -> Message | None:
        try:
            if not self.sock.poll(int(max(timeout, 0) * 1000)):
                return None
            frames = self.sock.recv_multipart(copy=False)
        except zmq.ZMQError as exc:
            if exc.errno != errno.EINTR:  # a signal (e.g. SIGCHLD) interrupted the wait: callers loop
                raise
            return None
        try:
            return decode(frames)
        except ProtocolError as exc:
            log.warning("undecodable reply from the daemon: %s", exc)
            return None

    def request(self, msg: Message, timeout: float) -> Message:
        """Send ``msg`` and return its reply; raise RemoteError for an error reply, TIMEOUT after ``timeout``."""
        if self.session is None and not isinstance(msg, Hello):
            self.hello(timeout)
        rid = self.send(msg)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.recv(deadline - time.monotonic())
            if reply is None:
                if time.monotonic() >= deadline:
                    self.reset()
                    raise StagerError(
                        ErrorCode.TIMEOUT,
                        f"no reply to {msg.TYPE} from {self.endpoint} within {timeout:.1f}s; the daemon is "
                        "overloaded or hung (see `stager status`)",
                    )
                continue
            if reply.id != rid:
                self.on_unsolicited(reply)
                continue
            if isinstance(reply, ErrorReply):
                if reply.code == ErrorCode.NOT_REGISTERED.value:
                    self.session = None
                raise reply.to_exception()
            return reply

    def hello(self, timeout: float) -> HelloReply:
        # Later hellos trust the monitor: a daemon known to be down fails the request at once
        # instead of stalling the train loop on every step until it is back.
        wait = min(timeout, 0.5) if self._first_connect else 0.0
        self._first_connect = False
        if not self.wait_connected(wait):
            raise StagerError(ErrorCode.UNAVAILABLE, self._unreachable())
        reply = self.request(Hello(role=self.role, rank=self.rank, local_world_size=self.local_world_size,
                                   world_size=self.world_size, pid=os.getpid(), start_time=self._start_time,
                                   host_id=self.host_id), timeout)
        if not isinstance(reply, HelloReply):
            raise StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {reply.TYPE} reply to hello")
        self.session, self.daemon_host = reply.session, reply.host_id
        return reply

    @property
    def same_host(self) -> bool:
        return self.daemon_host == self.host_id
