"""tcp daemons authenticate every client (loopback too); IPv6 literals bind and serve."""

import os

import pytest
import zmq
from zmq.auth import create_certificates, load_certificate

from conftest import InProcessDaemon, RawPeer
from helpers import has_ipv6_loopback
from stager.protocol import Status, StatusReply


@pytest.fixture
def keys(tmp_path):
    from stager.cli import main

    path = str(tmp_path / "keys")
    assert main(["keygen", path]) == 0
    return path


@pytest.fixture
def tcp_daemon(keys):
    made = []

    def make(endpoint="tcp://127.0.0.1:0", **config):
        d = InProcessDaemon(endpoint, memory_limit=16 << 20, step_timeout=10.0, **config)
        d.endpoint = d.daemon.endpoint  # port 0 resolved
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()


def curve_peer(endpoint, keys, client_secret=None, ipv6=False, curve=True):
    """A RawPeer speaking CURVE to the daemon of ``keys`` with the key pair in ``client_secret``
    (default: the client key `stager keygen` made), or without CURVE at all (``curve=False``)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if ipv6:
        sock.setsockopt(zmq.IPV6, 1)
    if curve:
        sock.curve_serverkey = load_certificate(os.path.join(keys, "server.key"))[0]
        sock.curve_publickey, sock.curve_secretkey = load_certificate(
            client_secret or os.path.join(keys, "client.key_secret")
        )
    sock.connect(endpoint)
    return RawPeer(endpoint, sock=sock)


def answered(peer, timeout=1.5) -> bool:
    msg = Status(id=peer.next_id())
    try:  # a refused peer has no pipe to the daemon: a blocking send would wait forever
        peer.sock.send_multipart(msg.encode(), flags=zmq.NOBLOCK)
    except zmq.Again:
        return False
    if not peer.sock.poll(int(timeout * 1000)):
        return False
    return isinstance(peer.recv(), StatusReply)


def test_tcp_daemon_answers_only_clients_with_authorized_keys(tcp_daemon, keys, tmp_path):
    d = tcp_daemon(auth_dir=keys)
    no_keys = curve_peer(d.endpoint, keys, curve=False)
    _, stranger_secret = create_certificates(str(tmp_path), "stranger")  # well-formed, not in authorized/
    stranger = curve_peer(d.endpoint, keys, client_secret=stranger_secret)
    member = curve_peer(d.endpoint, keys)
    try:
        assert not answered(no_keys)  # no keys: no handshake, so no answer and nothing handled
        assert not answered(stranger)  # valid CURVE, unknown key: refused by the authenticator
        assert answered(member)  # the key `stager keygen` authorized
        counted = member.request(Status()).status["counters"]["requests"]
        assert counted == 2  # the member's first request and this one: nothing of the others reached the daemon
    finally:
        for p in (no_keys, stranger, member):
            p.close()


def test_insecure_opt_out_is_reported_in_status(tcp_daemon, monkeypatch, caplog):
    from stager.client.admin import daemon_status

    monkeypatch.delenv("STAGER_AUTH_DIR", raising=False)
    with caplog.at_level("WARNING", logger="stager.daemon"):
        d = tcp_daemon(insecure_no_auth=True)
    assert any("WITHOUT AUTHENTICATION" in r.getMessage() for r in caplog.records)
    assert daemon_status(d.endpoint)["insecure"] is True


def test_secure_daemon_status_has_no_insecure_flag(tcp_daemon, keys, monkeypatch):
    from stager.client.admin import daemon_status

    monkeypatch.setenv("STAGER_AUTH_DIR", keys)
    d = tcp_daemon(auth_dir=keys)
    assert "insecure" not in daemon_status(d.endpoint)


def test_a_reader_given_an_auth_dir_uses_it_and_leaves_the_environment_alone(tcp_daemon, keys, monkeypatch):
    """A vLLM engine's init_info brings an auth dir from a peer: it serves that reader only, never the process."""
    import torch

    from stager.client import StagingClient, Subscriber

    d = tcp_daemon(auth_dir=keys)
    monkeypatch.setenv("STAGER_AUTH_DIR", keys)
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, transport="frames", strict=True) as c:
        c.stage({"w": torch.arange(6.0)}, step=1).wait(10)
    monkeypatch.delenv("STAGER_AUTH_DIR")
    with Subscriber(d.endpoint, timeout=5, auth_dir=keys) as sub, sub.latest() as snap:
        assert torch.equal(snap["w"], torch.arange(6.0))
    assert "STAGER_AUTH_DIR" not in os.environ


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="this host has no IPv6 loopback (::1)")


@needs_ipv6
def test_ipv6_loopback_bind_and_a_raw_peer(tcp_daemon, keys):
    d = tcp_daemon("tcp://[::1]:0", auth_dir=keys)
    assert d.endpoint.startswith("tcp://[::1]:") and not d.endpoint.endswith(":0")
    peer = curve_peer(d.endpoint, keys, ipv6=True)
    try:
        assert answered(peer, timeout=5)
    finally:
        peer.close()


@needs_ipv6
def test_ipv6_clients_reach_the_daemon(tcp_daemon, keys, monkeypatch):
    import torch

    from stager.client import StagingClient, Subscriber

    monkeypatch.setenv("STAGER_AUTH_DIR", keys)
    d = tcp_daemon("tcp://[::1]:0", auth_dir=keys)
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, transport="frames", strict=True) as c:
        c.stage({"w": torch.arange(6.0)}, step=1).wait(10)
    with Subscriber(d.endpoint, timeout=5) as sub, sub.latest() as snap:
        assert torch.equal(snap["w"], torch.arange(6.0))


def test_bind_errors_are_typed(tcp_daemon, keys):
    from stager.daemon import Daemon, DaemonConfig
    from stager.protocol import StagerError

    d = tcp_daemon(auth_dir=keys)
    taken = d.endpoint.replace("127.0.0.1", "localhost")  # the same port (another lock file)
    with pytest.raises(StagerError, match="cannot bind"):  # a clear, typed error, not a raw ZMQError
        Daemon(DaemonConfig(endpoint=taken, memory_limit=1 << 20, auth_dir=keys))
    with pytest.raises(StagerError, match="cannot bind"):  # the failed start released its lock: not "already serves"
        Daemon(DaemonConfig(endpoint=taken, memory_limit=1 << 20, auth_dir=keys))
