"""Memory the daemon holds for others: /dev/shm smaller than the limit, unread read replies, and
segments that queued zero-copy frames still point into."""

import os

import torch
import zmq

from conftest import error_code
from helpers import wait_until
from stager.client import StagingClient, Subscriber
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
    wait_until(lambda: d.status()["reads"] == {"bytes_in_flight": 0, "deferred": 0, "cast_buffers": 0})


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


def test_the_first_step_is_written_into_memory_preallocated_at_start(make_daemon):
    d = make_daemon(memory_limit=64 * MIB, preallocate=16 * MIB)
    status = wait_until(lambda: (s := d.status())["memory"]["preallocated"] and s)
    assert status["memory"] == {**status["memory"], "used": 16 * MIB, "preallocated": 16 * MIB}
    (reserve,) = segments.list_segments(os.getpid())
    allocated = os.stat(segments.segment_path(reserve))
    assert allocated.st_blocks * 512 >= 16 * MIB  # allocated, not a sparse file
    with _client(d) as c:
        c.stage({"w": torch.full((MIB,), 3.0)}, step=1).wait(30)  # 4 MiB: takes the preallocated pages
        wait_until(lambda: not d.daemon.budget.pending)  # the rotation's other segments, made after it
        status = d.status()
        stats = [os.stat(segments.segment_path(n)) for n in segments.list_segments(os.getpid())]
        assert reserve not in segments.list_segments(os.getpid()) and status["memory"]["preallocated"] == 0
        assert allocated.st_ino in [st.st_ino for st in stats]  # the same file, under a segment's name
        assert all(st.st_size == 4 * MIB for st in stats) and status["memory"]["used"] == 4 * MIB * len(stats)
        with Subscriber(d.endpoint) as sub, sub.latest() as snap:
            assert torch.equal(snap["w"], torch.full((MIB,), 3.0))


def test_preallocated_memory_a_step_cannot_use_is_given_back_to_it(make_daemon):
    d = make_daemon(memory_limit=40 * MIB, preallocate=16 * MIB, keep=1)
    wait_until(lambda: d.status()["memory"]["preallocated"])
    with _client(d) as c:  # 32 MiB: more than was preallocated, and both together exceed the limit
        c.stage({"w": torch.full((8 * MIB,), 1.0)}, step=1).wait(30)
    status = d.status()
    assert status["memory"]["preallocated"] == 0 and status["memory"]["used"] == 32 * MIB
    assert len(segments.list_segments(os.getpid())) == 1
