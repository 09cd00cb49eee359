import os
import shutil
import signal
import sys
import tempfile
import threading

import msgpack
import pytest
import torch
import zmq

from stager.daemon import Daemon, DaemonConfig
from stager.protocol import PROTOCOL_VERSION, ErrorReply, Hello, Message, decode
from stager.protocol.endpoint import host_id, process_start_time

# A suite started in the background by a non-interactive shell (`bash .ci/run &`) inherits SIGINT
# and SIGQUIT ignored, and so would every process it starts: the followers that tests stop with
# SIGINT, as a user's ^C would, would never stop, and each such test would hang until its timeout.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)

# the tiny torchtitan-style reference models live with the examples that use them
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


@pytest.fixture
def short_dir():
    d = tempfile.mkdtemp(prefix="stg", dir="/tmp")  # ipc paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


class InProcessDaemon:
    def __init__(self, endpoint, **config):
        self.daemon = Daemon(DaemonConfig(endpoint=endpoint, **config))
        self.endpoint = endpoint
        self.thread = threading.Thread(target=self.daemon.serve, daemon=True)
        self.thread.start()

    def status(self) -> dict:
        """The daemon's status, asked over the protocol as any client would."""
        from stager.client.admin import daemon_status

        return daemon_status(self.endpoint)

    def stop(self):
        self.daemon.stop()
        self.thread.join(10)


@pytest.fixture
def make_daemon(short_dir):
    made = []

    def make(**config):
        config.setdefault("memory_limit", 64 << 20)
        config.setdefault("step_timeout", 10.0)
        d = InProcessDaemon(f"ipc://{short_dir}/d{len(made)}.sock", **config)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()


class RawPeer:
    """A hand-driven protocol peer: sends exactly the frames a test asks for."""

    def __init__(self, endpoint, sock=None):
        """A DEALER connected to ``endpoint``, or ``sock`` as given (set up and connected by the caller)."""
        if sock is None:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
        self.sock = sock
        self.last_id = 0

    def next_id(self) -> int:
        """The id of the next request (ids count up from 1, as a client's do)."""
        self.last_id += 1
        return self.last_id

    def send_frames(self, frames):
        self.sock.send_multipart(frames)

    def recv(self, timeout=5.0) -> Message:
        assert self.sock.poll(int(timeout * 1000)), "no reply from the daemon"
        return decode(self.sock.recv_multipart())

    def request(self, msg, timeout=5.0) -> Message:
        msg.id = self.next_id()
        self.sock.send_multipart(msg.encode())
        reply = self.recv(timeout)
        assert reply.id == msg.id
        return reply

    def request_raw(self, kind: str, body: dict, timeout=5.0) -> Message:
        """Send a ``kind`` message whose body is given in wire form, exactly as written (for
        malformed or hand-made bodies that the typed classes would refuse to build)."""
        rid = self.next_id()
        self.sock.send_multipart([msgpack.packb({"v": PROTOCOL_VERSION, "t": kind, "id": rid, "b": body})])
        reply = self.recv(timeout)
        assert reply.id == rid
        return reply

    def hello(self, rank=0, local_world_size=1, role="trainer", pid=None):
        pid = pid or os.getpid()
        return self.request(
            Hello(
                role=role,
                rank=rank,
                local_world_size=local_world_size,
                world_size=local_world_size,
                pid=pid,
                start_time=process_start_time(pid),
                host_id=host_id(),
            )
        )

    def close(self):
        self.sock.close(0)


@pytest.fixture
def endpoint(short_dir):
    """An ipc endpoint for the daemon a test starts (see :func:`daemon_processes`)."""
    return f"ipc://{short_dir}/d.sock"


@pytest.fixture
def daemon_processes():
    """``start(endpoint, *args)``: a real `stager serve` process with ``args``, which the test may
    kill, stop (SIGSTOP) or restart; whatever still runs at the end is continued and killed."""
    from stager.dev.launch import DaemonProcess

    started = []

    def start(endpoint, *args):
        d = DaemonProcess(endpoint, args=args).start()
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            os.kill(d.pid, signal.SIGCONT)
        d.stop(signal.SIGKILL)


@pytest.fixture
def raw_peer():
    peers = []

    def make(endpoint):
        p = RawPeer(endpoint)
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.close()


def error_code(reply):
    assert isinstance(reply, ErrorReply), f"expected an error, got {reply!r}"
    return reply.code


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)


def wire_plan(*entries):
    """A typed plan from wire-form entries ``[fqn, dtype, global_shape, global_offset, local_shape]``."""
    from stager.protocol.layout import plan_from_wire

    return plan_from_wire([list(e) for e in entries])
