"""Sending on the daemon's ROUTER socket without ever blocking the loop.

Every reply and every message nobody asked for now (a deferred reply, an announcement, a remote
read's frames) leaves through :class:`SocketOutbox`: a peer that left or stopped reading loses the
message (ZeroMQ's ``ROUTER_MANDATORY`` reports it, ``NOBLOCK`` never waits), and the loop goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import zmq

from stager.protocol import ErrorReply, Message, ProtocolError

log = logging.getLogger("stager.daemon")


class SocketOutbox:
    """The handlers' :class:`~stager.daemon.state.Outbox` over the loop's socket; ``on_sent`` observes
    every message that left (the metrics recorder)."""

    def __init__(self, sock: zmq.Socket, *, on_sent: Callable[[bytes, Message], None]):
        self.sock, self._on_sent = sock, on_sent

    def send(self, identity: bytes, msg: Message) -> bool:
        """Send without ever blocking the loop; False when ZeroMQ dropped it (peer gone or not reading)."""
        sent = self._send_frames(identity, msg, track=False) is not None
        if sent:
            self._on_sent(identity, msg)
        return sent

    def send_tracked(self, identity: bytes, msg: Message) -> list | None:
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
            log.log(
                logging.DEBUG if msg.id == 0 else logging.WARNING,
                "dropped a %s message: the peer is not reading",
                msg.TYPE,
            )
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer left
            log.debug("dropped a %s message: %s", msg.TYPE, exc)
        except ProtocolError as exc:  # a reply that cannot be encoded (e.g. odd model_info): say so
            try:
                error = ErrorReply(id=msg.id, code=exc.code.value, message=exc.message)
                self.sock.send_multipart([identity, *error.encode()], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        return None
