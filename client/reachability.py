"""Whether the daemon behind a :class:`~.connection.Connection` is reachable, and alive.

Two signs, kept apart. The socket monitor says whether the connection is up (:attr:`connected`):
a request to a daemon that is down fails at once, and a connection that drops loses every request
sent on it (:attr:`lost_upto`, :attr:`on_lost`). A connection alone is no sign of life (a hung
daemon's I/O thread still completes it): after a wait that ended in silence (:attr:`silent_since`)
only something the daemon sends ends the silence, and :meth:`probe` / :meth:`await_life` ping it
for that.

The connection's request/reply half (:mod:`.connection`) is built on this one; the state here is
read and written under the connection's lock (:func:`owned`), as every use of the socket.
"""

from __future__ import annotations

import errno
import functools
import time
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from stager.protocol import Message, Ping, StagerError

from .dealer import CONNECTED, DISCONNECTED

HELLO_WAIT_S = 0.5  # a fresh or just-lost connection: how long a hello waits for the socket to connect
REPROBE_S = 5.0  # a silent daemon's unanswered ping is sent again after this long (few pile up in a hung one)


def owned(method):
    """Run ``method`` holding the connection's lock: the heartbeat thread never sends meanwhile."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class Reachability:
    """The reachability half of a Connection (a base class of it: the state is the connection's own).

    What the connection provides: ``_lock``, ``endpoint``, ``sock`` and its ``_monitor``, ``session``,
    ``send`` and ``_recv_ready`` (which ends the silence on anything received) and ``on_unsolicited``."""

    endpoint: str
    sock: zmq.Socket | None
    _monitor: zmq.Socket | None
    session: str | None
    on_unsolicited: Callable[[Message], None]

    def _init_reachability(self) -> None:
        self.connected = False
        # a hello waits (HELLO_WAIT_S) for the socket to connect once per fresh socket or lost
        # connection, then trusts the monitor: a daemon that stays down never stalls every step
        self._may_wait = True
        self._last_id = 0  # the newest request id sent
        self.lost_upto = 0  # requests with ids up to this one went out on a connection since lost
        # when the daemon went silent (a wait ended in silence); None once anything arrives from it
        self.silent_since: float | None = None
        self._probed: float | None = None  # when a ping went out on this connection while the daemon is silent
        self.on_lost: Callable[[int], None] = lambda upto: None  # a connection dropped: requests <= upto are lost

    @owned
    def poll_monitor(self, timeout_ms: int = 0) -> bool:
        """Update :attr:`connected` from monitor events; returns it. A connection that drops loses
        every request sent on it: :attr:`lost_upto` and :attr:`on_lost` say which."""
        while self._monitor.poll(timeout_ms):
            event = recv_monitor_message(self._monitor)["event"]
            if event & CONNECTED:
                self.connected, self._probed = True, None  # a new connection: earlier pings are gone
            elif event & DISCONNECTED:
                was_connected = self.connected  # else a failed connect attempt: nothing was sent
                self.connected, self.session = False, None
                if was_connected:
                    self.lost_upto, self._may_wait = self._last_id, True
                    self.on_lost(self.lost_upto)
            timeout_ms = 0
        return self.connected

    @owned
    def wait_connected(self, timeout: float) -> bool:
        """True once the socket has connected; waits up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        while not self.poll_monitor(0):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.poll_monitor(int(min(left, 0.05) * 1000) + 1)
        return True

    @owned
    def probe(self) -> None:
        """While the daemon is silent, ping it (without waiting): whatever it sends back ends the
        silence (:meth:`_recv_ready`). A ping waits in the daemon's queue until the daemon answers,
        so one per connection does, sent again only every REPROBE_S: pings do not pile up in a hung
        daemon. Nothing to do until the socket has connected; a connection alone is no sign of life
        (a hung daemon's I/O thread still completes it)."""
        now = time.monotonic()
        if self.silent_since is None or (self._probed is not None and now - self._probed < REPROBE_S):
            return
        if not self.poll_monitor(0):
            return
        try:
            self.send(Ping())
            self._probed = now
        except StagerError:
            pass

    @owned
    def await_life(self, timeout: float) -> bool:
        """True once the daemon, silent since :attr:`silent_since`, has sent anything; waits up to
        ``timeout`` seconds: for the socket to connect, then for the answer to a ping. What arrives
        meanwhile goes to :attr:`on_unsolicited`."""
        deadline = time.monotonic() + timeout
        while self.silent_since is not None:
            now = time.monotonic()
            if now >= deadline:
                return False
            if not self.poll_monitor(0):
                self.wait_connected(deadline - now)
                continue
            self.probe()
            try:
                if self.sock.poll(max(1, int(min(deadline - now, 0.05) * 1000))):
                    msg = self._recv_ready()
                    if msg is not None:
                        self.on_unsolicited(msg)
            except zmq.ZMQError as exc:
                if exc.errno != errno.EINTR:
                    raise
        return True

    def _unreachable(self) -> str:
        return (
            f"the stager daemon at {self.endpoint} is not reachable; start it with `stager serve` "
            "(or set STAGER_ENDPOINT to where it runs)"
        )
