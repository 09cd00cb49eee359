"""The socket under a :class:`~.connection.Connection`: a DEALER to the daemon and its monitor.

A Connection is the protocol (hello, requests, replies, patience, silence); this is how its socket
is made: reconnect intervals short enough that a restarted daemon is found within a quarter second,
nothing queued for a peer that is not connected (a message for a dead daemon is never delivered to
its successor), IPv6 for IPv6 literals, CURVE keys for tcp endpoints, and the monitor socket that
says whether the daemon is reachable.
"""

from __future__ import annotations

import itertools
import os

import zmq

from stager.protocol import ErrorCode, StagerError
from stager.protocol.endpoint import AUTH_ENV, is_ipv6_endpoint

CONNECTED = zmq.EVENT_HANDSHAKE_SUCCEEDED  # only then does an IMMEDIATE socket accept sends
DISCONNECTED = zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED  # CLOSED also follows each failed connect attempt
RECONNECT_IVL_MS, RECONNECT_IVL_MAX_MS = 50, 250  # a restarted daemon is found within a quarter second
_CURVE_OPTIONS = ("curve_serverkey", "curve_publickey", "curve_secretkey")


def curve_keys_from_env(auth_dir: str | None = None) -> dict:
    """CURVE client keys from ``auth_dir``, else ``$STAGER_AUTH_DIR`` (made by ``stager keygen``), or
    {} when neither is set."""
    auth_dir = auth_dir or os.environ.get(AUTH_ENV)
    if not auth_dir:
        return {}
    from zmq.auth import load_certificate

    try:
        server_public, _ = load_certificate(os.path.join(auth_dir, "server.key"))
        public, secret = load_certificate(os.path.join(auth_dir, "client.key_secret"))
    except (OSError, ValueError) as exc:
        raise StagerError(
            ErrorCode.UNAVAILABLE,
            f"cannot read CURVE keys from {auth_dir}: {exc}; create them with `stager keygen DIR`",
        ) from None
    return {"curve_serverkey": server_public, "curve_publickey": public, "curve_secretkey": secret}


_monitor_ids = itertools.count()


def monitor_socket(ctx: zmq.Context, sock: zmq.Socket, events: int) -> zmq.Socket:
    """The PAIR socket that receives ``sock``'s monitor events, on a queue without a limit.

    libzmq's I/O thread sends monitor events with a blocking send while it holds the socket's
    monitor lock. With pyzmq's ``get_monitor_socket`` the queue holds 2000 messages: a connection
    nobody reads for a while (an idle subscriber whose daemon is down: a CLOSED event each
    reconnect attempt, 4 a second) fills it in about eight minutes, and then the I/O thread, and
    every socket of the process with it, stops for good, and closing the socket deadlocks. A
    receive high-water mark of 0 makes the inproc queue unbounded; what it holds is drained by
    the next :meth:`Connection.poll_monitor` (about 130 bytes an event, measured: 45 MB a day for
    a subscriber left idle that long beside a dead daemon, instead of a process that hangs).
    """
    address = f"inproc://stager-monitor-{os.getpid()}-{next(_monitor_ids)}"
    sock.monitor(address, events)
    monitor = ctx.socket(zmq.PAIR)
    monitor.setsockopt(zmq.RCVHWM, 0)  # before connect: the inproc pipe's limit is fixed then
    monitor.setsockopt(zmq.LINGER, 0)
    monitor.connect(address)
    return monitor


def open_dealer(ctx: zmq.Context, endpoint: str, curve: dict) -> tuple[zmq.Socket, zmq.Socket]:
    """A DEALER connecting to ``endpoint`` (with the CURVE keys in ``curve``, if any) and its monitor."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer that is not connected
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    if is_ipv6_endpoint(endpoint):
        sock.setsockopt(zmq.IPV6, 1)
    for key in _CURVE_OPTIONS:
        if key in curve:
            setattr(sock, key, curve[key])
    monitor = monitor_socket(ctx, sock, CONNECTED | DISCONNECTED)
    sock.connect(endpoint)
    return sock, monitor
