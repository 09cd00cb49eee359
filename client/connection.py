"""One client connection to the daemon: request/reply with timeouts over a DEALER socket.

Not thread-safe: each thread that talks to the daemon owns its own Connection. A socket
monitor tracks whether the daemon is reachable (:mod:`.reachability`): a request to a daemon that is down fails at
once instead of waiting out its timeout, and a request whose connection drops while it waits
for its reply fails (UNAVAILABLE) as soon as the monitor reports the disconnect. After a
timeout the socket is rebuilt (queued messages to a dead daemon are dropped, never delivered
to its successor). A request may wait longer than its timeout while the daemon keeps
answering pings (:attr:`Connection.patience`): a daemon that defers a reply is not a hung one.

How the socket is made (reconnects, CURVE, its monitor) is :mod:`.dealer`'s. A reader's
connection to a daemon on another host sends heartbeats (:mod:`.heartbeat`), also while its
owner is busy elsewhere: the only use of the socket from another thread, under the
connection's lock, which every method that touches the socket holds.
A request may also be given less time for its first sign of life than for its reply
(:attr:`Connection.ack_timeout`): a stopped or hung daemon is then told from a slow one quickly.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable

import zmq

from stager.protocol import (
    Bye,
    ErrorCode,
    ErrorReply,
    Hello,
    HelloReply,
    Message,
    Ping,
    Pong,
    ProtocolError,
    StagerError,
    Status,
    StatusReply,
    decode,
)
from stager.protocol.endpoint import host_id, process_start_time, resolve

from . import heartbeat
from .dealer import curve_keys_from_env, open_dealer
from .reachability import HELLO_WAIT_S, Reachability, owned

log = logging.getLogger("stager.client")
PING_INTERVAL_S = 1.0  # while a patient request waits: ping this often (at most a quarter of its timeout)
NO_SESSION = (ErrorCode.NOT_REGISTERED.value, ErrorCode.SESSION_EXPIRED.value)  # the next request says hello


def _ms(seconds: float) -> int:
    """A poll timeout in whole milliseconds, rounded up (a wait never ends just before its deadline)."""
    return max(0, math.ceil(seconds * 1000)) if seconds != math.inf else -1


class Connection(Reachability):
    """A DEALER connection with hello, request(), and reachability tracking (its base,
    :class:`~.reachability.Reachability`). ``node`` (this process's host id) and ``auth_dir`` (CURVE
    client keys) default to ``$STAGER_HOST_ID`` / the machine's and ``$STAGER_AUTH_DIR``: a process
    that is another node's peer than its environment says (the full assembler inside a daemon) passes them."""

    def __init__(
        self,
        endpoint: str | None,
        *,
        role: str,
        rank: int = 0,
        local_world_size: int = 1,
        world_size: int = 1,
        node: str | None = None,
        auth_dir: str | None = None,
    ):
        self.endpoint = resolve(endpoint)
        self.role, self.rank = role, rank
        self.local_world_size, self.world_size = local_world_size, world_size
        self.curve = curve_keys_from_env(auth_dir) if self.endpoint.startswith("tcp://") else {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self.keepalive = heartbeat.Keepalive()  # sends none until a reader of a daemon on another host starts it
        self.hellos = 0  # successful hellos: a new registration (also in the same daemon session) shows
        self._ctx = zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self.session: str | None = None  # daemon session after hello; None: hello needed
        self._init_reachability()
        self.generation = 0
        # seconds a request may wait for its reply while the daemon answers pings (0: its timeout only)
        self.patience = 0.0
        # seconds a request may wait for its first sign of life: its reply, or the answer to a ping
        # sent after it (None: its timeout); see wait_reply
        self.ack_timeout: float | None = None
        self.daemon_host: str | None = None
        self.rejoin: Message | None = None  # a multi-node job's Join, said again after every hello
        self.host_id = node or host_id()
        self._start_time = process_start_time(os.getpid())
        self.on_unsolicited: Callable[[Message], None] = lambda msg: log.debug("stray reply %r", msg)
        self._open()

    # ------------------------------------------------------------------ socket lifecycle

    def _open(self) -> None:
        sock, self._monitor = open_dealer(self._ctx, self.endpoint, self.curve)
        self.sock = sock
        self.connected = False
        self.session = None
        self._may_wait = True
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self.generation += 1  # requests sent on an earlier socket can never be answered

    @owned
    def reset(self, *, silent_since: float | None = None) -> None:
        """Drop the socket and everything queued on it; the next request says hello again.
        ``silent_since``: because the daemon has not answered since then (see :attr:`silent_since`)."""
        if silent_since is not None and self.silent_since is None:
            self.silent_since = silent_since
        self._probed = None  # pings queued on the old socket are gone
        self.close()
        self._open()

    @owned
    def close(self) -> None:
        """Say bye (so the daemon ends this peer's leases at once) and close the socket."""
        heartbeat.HEARTBEATS.discard(self)
        if self.sock is not None and self.session is not None and self.connected:
            try:
                self.sock.send_multipart(Bye(id=0).encode(), flags=zmq.NOBLOCK)
                # stop the monitor before its reader goes: events of the lingering socket would be
                # sent to a PAIR without a peer, a send that blocks libzmq's I/O thread
                self.sock.disable_monitor()
                self._monitor.close(linger=0)
                self.sock.close(linger=200)  # let the bye leave; never longer
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

    # ------------------------------------------------------------------ messages

    @owned
    def send(self, msg: Message) -> int:
        # read the monitor first: a disconnect reported from here on concerns this request
        self.poll_monitor(0)
        msg.id = next(self._ids)
        try:
            self.sock.send_multipart(msg.encode(), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.connected = False
            raise StagerError(ErrorCode.UNAVAILABLE, self._unreachable()) from None
        self._last_id = msg.id
        self.keepalive.sent()  # any request tells the daemon this connection is alive
        return msg.id

    # ------------------------------------------------------------------ heartbeats

    def heartbeat_due(self) -> float:
        """When this connection's next heartbeat is due (monotonic time; inf: it sends none)."""
        if self.session is None or self.sock is None:
            return math.inf
        return self.keepalive.due()

    def _beat(self) -> None:
        """Send a heartbeat if one is due; the caller holds the lock."""
        if self.heartbeat_due() <= time.monotonic():
            self.keepalive.beat(self.sock)

    def beat_if_free(self) -> float:
        """From the heartbeat thread: beat unless the owner holds the connection (it beats itself
        while it waits inside); returns when the next heartbeat is due, or worth another try."""
        if not self._lock.acquire(blocking=False):
            return time.monotonic() + self.keepalive.retry_after()
        try:
            self._beat()
            return self.heartbeat_due()
        finally:
            self._lock.release()

    @owned
    def poll(self, timeout_ms: int) -> bool:
        """Wait up to ``timeout_ms`` for something to read (True), under the lock as every use of the socket."""
        try:
            return bool(self.sock.poll(timeout_ms))
        except zmq.ZMQError as exc:
            if exc.errno != errno.EINTR:  # a signal interrupted the wait: the caller looks again
                raise
            return False

    @owned
    def recv(self, timeout: float) -> Message | None:
        end = time.monotonic() + max(timeout, 0)
        while True:
            self._beat()  # the heartbeat thread cannot while this waits: it holds the lock
            now = time.monotonic()
            try:
                if self.sock.poll(_ms(min(end, self.heartbeat_due()) - now)):
                    msg = self._recv_ready()
                    if msg is not None:
                        return msg
            except zmq.ZMQError as exc:
                if exc.errno != errno.EINTR:  # a signal (e.g. SIGCHLD) interrupted the wait: callers loop
                    raise
                return None
            if time.monotonic() >= end:
                return None

    @staticmethod
    def recv_any(conns: list[Connection], timeout: float) -> list[tuple[Connection, Message]]:
        """Wait up to ``timeout`` seconds until any of ``conns`` has a message; return what is
        ready now (a subscriber of a multi-node job waits on every node's announcements at once)."""
        with contextlib.ExitStack() as held:
            for conn in conns:
                held.enter_context(conn._lock)
            poller = zmq.Poller()
            for conn in conns:
                poller.register(conn.sock, zmq.POLLIN)
            end = time.monotonic() + max(timeout, 0)
            while True:
                for conn in conns:
                    conn._beat()
                now = time.monotonic()
                try:
                    ready = dict(poller.poll(_ms(min([end, *(c.heartbeat_due() for c in conns)]) - now)))
                except zmq.ZMQError as exc:
                    if exc.errno != errno.EINTR:
                        raise
                    return []
                if ready or time.monotonic() >= end:
                    break
            out = []
            for conn in conns:
                if conn.sock in ready:
                    msg = conn._recv_ready()
                    if msg is not None:
                        out.append((conn, msg))
            return out

    @owned
    def request(
        self, msg: Message, timeout: float, *, expect: type[Message] | None = None, ack_timeout: float | None = None
    ) -> Message:
        """Send ``msg`` and return its reply; raise RemoteError for an error reply, BAD_MESSAGE for a
        reply not of type ``expect``, UNAVAILABLE when the connection drops, TIMEOUT after ``timeout``
        (see :meth:`wait_reply` for :attr:`patience` and ``ack_timeout``, by default :attr:`ack_timeout`)."""
        if self.session is None and not isinstance(msg, Hello):
            self.hello(timeout)
        step = getattr(msg, "step", None)
        return self.wait_reply(
            self.send(msg),
            timeout,
            msg.TYPE if step is None else f"{msg.TYPE} of step {step}",
            expect,
            ack_timeout=ack_timeout,
        )

    @owned
    def _recv_ready(self) -> Message | None:
        """One message from the socket, which poll said is readable (None: undecodable, EINTR, or
        the answer to a heartbeat)."""
        try:
            frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EINTR, errno.EAGAIN):
                raise
            return None
        self.silent_since, self._probed = None, None  # whatever it is, the daemon sent it: not stopped or hung
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            log.warning("undecodable reply from the daemon: %s", exc)
            return None
        if msg.id == 0 and isinstance(msg, Pong):  # the answer to a heartbeat: nothing for the owner
            return None
        if msg.id == 0 and isinstance(msg, ErrorReply) and msg.code in NO_SESSION:
            # the answer to a heartbeat: the daemon ended this session (silence) or never knew it
            # (restarted); the next request says hello, and a subscriber subscribes again
            first = self.session is not None and msg.code == ErrorCode.SESSION_EXPIRED.value
            log.log(logging.WARNING if first else logging.DEBUG, "%s", msg.to_exception())
            self.session = None
        return msg

    @owned
    def wait_reply(
        self,
        rid: int,
        timeout: float,
        what: str,
        expect: type[Message] | None = None,
        *,
        ack_timeout: float | None = None,
    ) -> Message:
        """The reply to request ``rid``: other messages go to :attr:`on_unsolicited`, an error reply
        raises RemoteError, a reply not of type ``expect`` raises BAD_MESSAGE.

        The socket monitor is watched while waiting: once the connection the request went out on
        is known lost, this raises UNAVAILABLE at once (the reply can never come). Silence past
        ``timeout`` resets the socket and raises TIMEOUT. With :attr:`patience` above ``timeout``,
        the daemon is pinged meanwhile and every answer restarts the ``timeout`` (a daemon that
        answers pings is alive, only holding this reply: e.g. a Begin waiting for the other ranks
        of the node), up to ``patience`` seconds in all.

        ``ack_timeout`` (default :attr:`ack_timeout`; below ``timeout`` to matter): the first sign of
        life must come sooner. The daemon handles a connection's requests in order on one thread,
        so the answer to a ping sent after the request says the request was received and handled:
        the daemon acknowledged it and is only holding the reply. Until then it is pinged every
        quarter of ``ack_timeout``; silence past ``ack_timeout`` resets the socket and raises
        NO_SIGN_OF_LIFE (the daemon is stopped, hung or gone), and the rest of the wait is as above."""
        start = time.monotonic()
        ack = self.ack_timeout if ack_timeout is None else ack_timeout
        acked = ack is None or ack >= timeout  # no separate wait for a first sign of life
        deadline = start + (timeout if acked else ack)  # silence: no reply, and no answer to pings
        cap = start + max(timeout, self.patience)
        patient = min(PING_INTERVAL_S, timeout / 4) if cap > start + timeout else math.inf
        interval = patient if acked else min(PING_INTERVAL_S, ack / 4)
        ping_id, next_ping = None, start + interval
        while True:
            if rid <= self.lost_upto:
                raise StagerError(
                    ErrorCode.UNAVAILABLE,
                    f"lost the connection to the daemon at {self.endpoint} while waiting for the "
                    f"reply to {what}; the daemon stopped or restarted (the next request reconnects)",
                )
            now = time.monotonic()
            if now >= deadline or now >= cap:
                self.reset(silent_since=deadline - (timeout if acked else ack) if now >= deadline else None)
                if not acked:
                    raise StagerError(ErrorCode.NO_SIGN_OF_LIFE, self._silence_message(what, ack))
                raise StagerError(
                    ErrorCode.TIMEOUT, self._timeout_message(what, timeout, now - start, silent=now >= deadline)
                )
            if ping_id is None and now >= next_ping:
                try:
                    ping_id = self.send(Ping())
                except StagerError:  # no connection to send on: the monitor says why, next round
                    next_ping = now + interval
                continue
            self._beat()  # a reply the daemon holds (deferred reads, back-pressure) may take longer than it
            wake = min(deadline, cap, next_ping if ping_id is None else math.inf, self.heartbeat_due())
            try:
                events = dict(self._poller.poll(max(0, int((wake - now) * 1000)) + 1))
            except zmq.ZMQError as exc:
                if exc.errno != errno.EINTR:  # a signal (e.g. SIGCHLD) interrupted the wait: loop
                    raise
                continue
            if self._monitor in events:
                self.poll_monitor(0)
            if self.sock not in events:
                continue
            reply = self._recv_ready()
            if reply is None:
                continue
            if ping_id is not None and reply.id == ping_id and isinstance(reply, Pong):
                if self.session is not None and reply.session != self.session:
                    self.session = None
                    raise StagerError(
                        ErrorCode.UNAVAILABLE,
                        f"the daemon at {self.endpoint} restarted while waiting for the reply to {what}",
                    )
                now = time.monotonic()
                acked, interval = True, patient  # alive, and past this request: wait as patiently as ever
                ping_id = None
                next_ping = now + interval
                deadline = now + timeout
                continue
            if reply.id != rid:
                self.on_unsolicited(reply)
                continue
            if isinstance(reply, ErrorReply):
                if reply.code in NO_SESSION:
                    self.session = None
                raise reply.to_exception()
            if expect is not None and not isinstance(reply, expect):
                raise StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {reply.TYPE} reply to {what}")
            return reply

    def _silence_message(self, what: str, ack: float) -> str:
        return (
            f"no sign of life from the daemon at {self.endpoint} within {ack:.1f}s of {what}: no reply, and no "
            "answer to a ping sent after it; the daemon is stopped (SIGSTOP), hung or gone (see `stager status`)"
        )

    def _timeout_message(self, what: str, timeout: float, waited: float, *, silent: bool) -> str:
        if not silent:  # alive all along, yet it held the reply past patience
            return (
                f"{what}: the daemon at {self.endpoint} kept answering pings but did not answer within "
                f"{waited:.0f}s; it is waiting for something else (for a stage: the other ranks of this node "
                "to begin the step, or memory; see `stager status`)"
            )
        if self.patience > timeout:  # pinged meanwhile: not even pings were answered
            return (
                f"no reply to {what} from {self.endpoint}, and no answer to pings, for {timeout:.1f}s (after "
                f"{waited:.1f}s of waiting); the daemon is overloaded, hung or gone (see `stager status`)"
            )
        return (
            f"no reply to {what} from {self.endpoint} within {timeout:.1f}s; the daemon is "
            "overloaded, hung or gone (see `stager status`)"
        )

    @owned
    def hello(self, timeout: float) -> HelloReply:
        # The first hello on a fresh socket, or the first after the connection was lost, waits
        # briefly for the socket to (re)connect; later ones trust the monitor: a daemon known to
        # be down fails the request at once instead of stalling the train loop on every step.
        wait = min(timeout, HELLO_WAIT_S, self.ack_timeout or math.inf) if self._may_wait else 0.0
        self._may_wait = False
        if not self.wait_connected(wait):
            raise StagerError(ErrorCode.UNAVAILABLE, self._unreachable())
        reply = self.request(
            Hello(
                role=self.role,
                rank=self.rank,
                local_world_size=self.local_world_size,
                world_size=self.world_size,
                pid=os.getpid(),
                start_time=self._start_time,
                host_id=self.host_id,
            ),
            timeout,
            expect=HelloReply,
        )
        self.session, self.daemon_host = reply.session, reply.host_id
        self.hellos += 1
        if self.role == "reader" and not self.same_host:
            self._keep_alive(timeout)
        if self.rejoin is not None:  # a restarted daemon forgot the job: tell it again before anything else
            try:
                self.request(self.rejoin, timeout)
            except StagerError as exc:
                log.warning("could not rejoin the job at %s: %s", self.endpoint, exc)
        return reply

    def _keep_alive(self, timeout: float) -> None:
        """Send heartbeats from now on, at a fraction of the daemon's --peer-timeout (its status
        says it), so that a reader silent for longer keeps its session (:mod:`.heartbeat`)."""
        try:
            peer_timeout = self.request(Status(), timeout, expect=StatusReply).status.get("peer_timeout")
        except StagerError as exc:
            log.debug("no status from %s: %s", self.endpoint, exc)
            peer_timeout = None
        self.keepalive.start(peer_timeout)
        heartbeat.HEARTBEATS.add(self)

    @property
    def registration(self) -> tuple[str, int] | None:
        """This connection's registration with the daemon (None: none now). It changes at every hello,
        also within one daemon session (after the daemon ended this one's session for silence): what
        was registered under the old one (a subscription, leases) is gone."""
        return None if self.session is None else (self.session, self.hellos)

    @property
    def same_host(self) -> bool:
        return self.daemon_host == self.host_id
