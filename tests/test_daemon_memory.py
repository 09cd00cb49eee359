"""Memory the daemon holds for others: /dev/shm smaller than the limit, unread read replies, and
segments that queued zero-copy frames still point into."""

import torch
import zmq
from conftest import error_code
from helpers import wait_until

from stager.client import StagingClient
from stager.daemon import reading, segments
from stager.protocol import Acquire, ErrorCode, Read, ReadItem, ReadReply, Release, StagerError

MIB = 1 << 20


def _client(d):
    return StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1)


def test_a_full_dev_shm_is_refused_at_once_with_the_sizes(make_daemon, monkeypatch):
    monkeypatch.setattr(segments, "shm_free_bytes", lambda: 1 * MIB)  # /dev/shm smaller than the limit
    d = make_daemon(memory_limit=64 * MIB, step_timeout=60.0)
    with _client(d) as c:
        h = c.stage({"w": torch.zeros(MIB)}, step=1)  # 4 MiB
        try:
            h.wait(30)
            raise AssertionError("staged although /dev/shm is full")
        except StagerError as exc:  # refused by the daemon, not a timeout of the client
            assert exc.code == ErrorCode.MEMORY_LIMIT and "/dev/shm has 1 MiB free" in exc.message, exc
    status = d.status()
    assert [v["state"] for v in status["versions"]] == ["failed"] and status["memory"]["used"] == 0


def _stalled_reader(endpoint, raw_peer, n_reads):
    """A reader that asks for ``n_reads`` whole copies of ``w`` and does not read the replies yet."""
    peer = raw_peer(endpoint)
    peer.sock.setsockopt(zmq.RCVHWM, 1)  # its queue fills after one reply: the rest wait in the daemon
    peer.sock.setsockopt(zmq.RCVBUF, 64 << 10)
    peer.hello(role="reader")
    lease = peer.request(Acquire()).lease
    for i in range(n_reads):
        peer.sock.send_multipart(Read(id=100 + i, lease=lease, items=(ReadItem("w"),)).encode())
    return peer, lease


def test_released_lease_keeps_its_segment_until_queued_frames_are_sent(make_daemon, raw_peer):
    d = make_daemon(keep=1, memory_limit=256 * MIB)
    n = 32 * MIB // 4
    with _client(d) as c:
        c.stage({"w": torch.full((n,), 1.0)}, step=1).wait(30)
        peer, lease = _stalled_reader(d.endpoint, raw_peer, 6)
        wait_until(lambda: d.status()["reads"]["bytes_in_flight"] > 0)
        peer.sock.send_multipart(Release(id=99, lease=lease).encode())
        for step in (2, 3, 4):  # keep=1: step 1's segment is evicted and, without the guard, reused
            c.stage({"w": torch.full((n,), float(step))}, step=step).wait(30)
        for i in range(6):
            reply = peer.recv(timeout=30)
            assert isinstance(reply, ReadReply) and reply.id == 100 + i
            got = torch.frombuffer(bytearray(reply.frames[0]), dtype=torch.float32)
            assert torch.all(got == 1.0), f"read {i} saw bytes of a later step"
        assert peer.recv().id == 99  # the release
        wait_until(lambda: d.status()["memory"]["draining"] == 0)
        c.stage({"w": torch.full((n,), 5.0)}, step=5).wait(30)


def test_a_reader_that_does_not_read_is_held_back_not_buffered(make_daemon, raw_peer, monkeypatch):
    monkeypatch.setattr(reading, "MAX_READ_IN_FLIGHT", 64 * MIB)
    d = make_daemon(memory_limit=128 * MIB)
    n = 32 * MIB // 4
    with _client(d) as c:
        c.stage({"w": torch.arange(n, dtype=torch.float32)}, step=1).wait(30)
    peer, _ = _stalled_reader(d.endpoint, raw_peer, 8)
    status = wait_until(lambda: (s := d.status())["reads"]["deferred"] and s)
    assert status["reads"]["bytes_in_flight"] <= 64 * MIB  # 2 replies queued, the other reads wait
    for i in range(8):  # reading the replies lets the held-back reads through, in order
        reply = peer.recv(timeout=30)
        got = torch.frombuffer(bytearray(reply.frames[0]), dtype=torch.float32)
        assert reply.id == 100 + i and torch.equal(got, torch.arange(n, dtype=torch.float32))
    wait_until(lambda: d.status()["reads"] == {"bytes_in_flight": 0, "deferred": 0})


def test_too_many_held_back_reads_are_refused(make_daemon, raw_peer, monkeypatch):
    monkeypatch.setattr(reading, "MAX_READ_IN_FLIGHT", 1)
    monkeypatch.setattr(reading, "MAX_DEFERRED_READS", 2)
    d = make_daemon()
    with _client(d) as c:
        c.stage({"w": torch.zeros(4 * MIB // 4)}, step=1).wait(30)
    peer, _ = _stalled_reader(d.endpoint, raw_peer, 4)
    replies = [peer.recv(timeout=30) for _ in range(4)]
    assert [error_code(r) for r in replies if r.TYPE == "error"] == [ErrorCode.MEMORY_LIMIT.value]


def test_a_limit_larger_than_dev_shm_is_warned_about_at_start(make_daemon, caplog):
    with caplog.at_level("WARNING", logger="stager.daemon"):
        make_daemon(memory_limit=1 << 50)  # 1 PiB: more than any /dev/shm
    assert any("/dev/shm holds only" in r.getMessage() for r in caplog.records)
