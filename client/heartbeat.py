"""Heartbeats for readers of a daemon on another host, sent while the reader is busy elsewhere:
each connection's :class:`Keepalive` (interval, when one is due, sending it) and the process's one
heartbeat thread (:class:`Heartbeats`).

The daemon cannot see a process on another host: it ends the session (leases, subscription) of
such a peer once it heard nothing from it for ``--peer-timeout``. A rollout worker generating for
minutes inside ``with sub.latest() as snap:`` must keep its lease; one whose process died, or
whose host went away, must lose it within the peer timeout. So each such connection sends a
heartbeat (a Ping with id 0) whenever it sent nothing for a quarter of the daemon's peer timeout:
from its owner's thread while the owner waits inside the connection, and from the one thread of
this module while the owner is elsewhere. The daemon answers each, as every request: the Pongs
wait in the socket (ZeroMQ's high-water mark bounds them; past it the daemon drops them) and the
connection discards them unseen when its owner reads next. A connection whose session ended is
answered with the error saying why, and says hello at its next request.

Why not ZeroMQ's own heartbeats (ZMQ_HEARTBEAT_IVL): they live below the daemon's ROUTER, which
cannot tell which peer a ZMTP connection carries without libzmq's draft API; and a reader that
stops reading (announcements fill its queue while it generates) stops answering them, because
libzmq stops reading the TCP stream at the high-water mark, so the daemon would cut a live reader.

ZeroMQ sockets must not be used by two threads at once: the thread sends only when it takes the
connection's lock at once (the owner is not inside the connection; when it is, it beats itself
while it waits), and it never receives, so nothing the owner waits for is taken from it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref

import zmq

from stager.protocol import Ping

log = logging.getLogger("stager.client")
HEARTBEATS_PER_TIMEOUT = 4  # heartbeats per --peer-timeout of the daemon: a late one or two never ends a session
MIN_HEARTBEAT_S = 0.05
DEFAULT_PEER_TIMEOUT_S = 4.0  # a daemon whose status does not say: heartbeats every second
_HEARTBEAT = Ping(id=0).encode()  # id 0: no request waits for its Pong, which is dropped unseen


class Keepalive:
    """One connection's heartbeats: their interval (None: it sends none) and when it last sent
    anything. The connection calls it under its lock, from its owner's thread or this module's."""

    def __init__(self) -> None:
        self.interval: float | None = None
        self.last_sent = time.monotonic()

    def start(self, peer_timeout: object) -> None:
        """Beat at a fraction of the daemon's ``--peer-timeout`` (as its status says it)."""
        if not isinstance(peer_timeout, (int, float)) or isinstance(peer_timeout, bool) or peer_timeout <= 0:
            peer_timeout = DEFAULT_PEER_TIMEOUT_S  # an older daemon does not say: assume the shortest sensible
        self.interval = max(MIN_HEARTBEAT_S, peer_timeout / HEARTBEATS_PER_TIMEOUT)

    def sent(self) -> None:
        """Anything sent on the connection tells the daemon it is alive: the next beat is due later."""
        self.last_sent = time.monotonic()

    def due(self) -> float:
        """When the next heartbeat is due (monotonic time; inf: none is sent)."""
        return math.inf if self.interval is None else self.last_sent + self.interval

    def retry_after(self) -> float:
        """Seconds before trying again while the owner holds the connection (it beats itself
        meanwhile): a quarter interval late at worst, so 4 fit in a peer timeout."""
        return max(MIN_HEARTBEAT_S, (self.interval or 0) / 4)

    def beat(self, sock: zmq.Socket) -> None:
        """Send a heartbeat on ``sock`` now. One that cannot go out (no connection) is not retried
        before a tenth of the interval: the socket monitor tells the owner why."""
        now = time.monotonic()
        try:
            sock.send_multipart(_HEARTBEAT, flags=zmq.NOBLOCK)
            self.last_sent = now
        except zmq.ZMQError:
            self.last_sent = now - (self.interval or 0) * 0.9


class Heartbeats:
    """The process's heartbeat thread and the connections it keeps alive (held weakly)."""

    def __init__(self) -> None:
        # id -> weak reference; a plain dict (not a WeakSet): copied and changed in single C-level
        # steps, so a connection closed by a garbage-collection finalizer while another is added or
        # the set is copied (even in the same thread) neither deadlocks nor breaks that iteration
        self._conns: dict[int, weakref.ref] = {}
        self._lock = threading.Lock()  # only add(): one thread started
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, conn) -> None:
        """Keep ``conn`` alive: ``conn.heartbeat_due()`` says when (monotonic time, inf: never), and
        ``conn.beat_if_free()`` sends one unless its owner holds it, and says when the next is due."""
        key = id(conn)  # not reused before the weak reference's callback ran
        ref = weakref.ref(conn, lambda _ref: self._conns.get(key) is _ref and self._conns.pop(key, None))
        with self._lock:
            self._conns[key] = ref
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="stager-heartbeats", daemon=True)
                self._thread.start()
        self._wake.set()

    def discard(self, conn) -> None:
        # no lock: Connection.close() runs from weakref.finalize, which garbage collection may fire
        # inside add() or _beat_all() in this very thread, with any lock of theirs held (a plain
        # Lock taken here again would deadlock); one dict operation is atomic under the GIL
        self._conns.pop(id(conn), None)

    def _run(self) -> None:
        while True:
            try:
                wake = self._beat_all()  # holds no connection once it returns: their owners may drop them
            except Exception:  # a bug here must not silently end every reader's heartbeats
                log.exception("sending heartbeats failed; trying again in a second")
                wake = time.monotonic() + 1.0
            self._wake.wait(None if wake == math.inf else max(0.0, wake - time.monotonic()))
            self._wake.clear()

    def _beat_all(self) -> float:
        """Beat every connection that is due; returns when the next one is due (inf: none kept)."""
        refs = list(self._conns.values())  # one C-level copy: nothing runs in between
        wake = math.inf
        for ref in refs:
            conn = ref()
            if conn is None:
                continue
            due = conn.heartbeat_due()
            if due <= time.monotonic():
                due = conn.beat_if_free()  # when the next one is due (or worth another try)
            wake = min(wake, due)
        return wake


HEARTBEATS = Heartbeats()


def _after_fork() -> None:
    # a forked child has none of the parent's threads, and its connections are the parent's: start over
    global HEARTBEATS
    HEARTBEATS = Heartbeats()


os.register_at_fork(after_in_child=_after_fork)
