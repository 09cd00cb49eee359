"""The daemon against hand-made requests: typed errors, isolation between clients, memory policy."""

import hashlib
import os

import msgpack
import pytest
import torch

from conftest import error_code, wire_plan
from helpers import wait_until
from stager.client import StagingClient, Subscriber
from stager.daemon.segments import list_segments
from stager.protocol import (
    PROTOCOL_VERSION,
    Abort,
    Acquire,
    Begin,
    BeginReply,
    Bye,
    Commit,
    ErrorCode,
    ErrorReply,
    HelloReply,
    Ping,
    Pong,
    Put,
    Release,
    Sealed,
    StagerError,
    Status,
)
from stager.protocol.layout import plan_digest


def begin(step, plan, **kw):
    """A Begin carrying ``plan`` (typed, or wire-form entries) under its true digest."""
    if plan and isinstance(plan[0], list):
        plan = wire_plan(*plan)
    return Begin(step=step, digest=plan_digest(plan), plan=plan, **kw)


W4 = wire_plan(["w", "f32", [4], [0], [4]])
W4_DIGEST = plan_digest(W4)


def plan_of(sd):
    return wire_plan(*[[k, "f32", list(v.shape), [0] * v.dim(), list(v.shape)] for k, v in sd.items()])


def sealed_steps(d):
    return [v["step"] for v in d.status()["versions"] if v["state"] == "sealed"]


def stage_and_check(endpoint, step, sd):
    with StagingClient(endpoint, rank=0, local_world_size=1, world_size=1) as c:
        return c.stage(sd, step=step).wait(10)


MALFORMED = [
    [b"\xc1\xc1"],
    [msgpack.packb({"v": PROTOCOL_VERSION, "t": "begin", "id": 1, "b": {"step": "x"}})],
    [msgpack.packb({"v": 0, "t": "ping", "id": 1, "b": {}})],
    [
        msgpack.packb(
            {"v": PROTOCOL_VERSION, "t": "hello_reply", "id": 1, "b": {"session": "", "host_id": "", "daemon_pid": 1}}
        )
    ],
    [msgpack.packb({"v": PROTOCOL_VERSION, "t": "nope", "id": 1, "b": {}})],
]


def test_malformed_messages_get_errors_and_daemon_keeps_serving(make_daemon, raw_peer):
    d = make_daemon()
    bad = raw_peer(d.endpoint)
    for frames in MALFORMED:
        bad.send_frames(frames)
        reply = bad.recv()
        assert isinstance(reply, ErrorReply) and reply.message
    assert error_code(bad.request(Begin(step=1, digest="x", plan=None))) == ErrorCode.NOT_REGISTERED.value
    assert error_code(bad.request(Commit(step=1))) == ErrorCode.NOT_REGISTERED.value
    # another client is unaffected
    sd = {"w": torch.randn(8, 8)}
    assert stage_and_check(d.endpoint, 1, sd)["tensors"] == 1
    assert isinstance(bad.request(Ping()), Pong)


def test_inconsistent_plans_fail_the_step_for_every_rank(make_daemon, raw_peer):
    d = make_daemon()
    r0, r1 = raw_peer(d.endpoint), raw_peer(d.endpoint)
    assert isinstance(r0.hello(rank=0, local_world_size=2), HelloReply)
    assert isinstance(r1.hello(rank=1, local_world_size=2), HelloReply)
    r0.sock.send_multipart(begin(1, [["w", "f32", [4], [0], [3]]], id=1).encode())
    r1.sock.send_multipart(begin(1, [["w", "f32", [4], [2], [2]]], id=1).encode())
    for peer in (r0, r1):
        reply = peer.recv()
        assert error_code(reply) == ErrorCode.BAD_PLAN.value and "overlap" in reply.message
    # the daemon still stages a good step afterwards from the same ranks
    r0.sock.send_multipart(begin(2, [["w", "f32", [4], [0], [2]]], id=2).encode())
    r1.sock.send_multipart(begin(2, [["w", "f32", [4], [2], [2]]], id=2).encode())
    assert isinstance(r0.recv(), BeginReply) and isinstance(r1.recv(), BeginReply)
    status = d.status()
    assert any(v["state"] == "failed" and v["step"] == 1 for v in status["versions"])


@pytest.mark.parametrize(
    "plan,code,text",
    [
        ([["w", "f32", [4], [0], [2]]], ErrorCode.BAD_PLAN, "cover 2 of 4"),
        ([["w", "f32", [4], [3], [2]]], ErrorCode.BAD_PLAN, "outside the global shape"),
        ([["w", "f32", [4], [0]]], ErrorCode.BAD_PLAN, "must be [fqn"),
        ("garbage", ErrorCode.BAD_MESSAGE, "field 'plan' must be list"),
    ],
)
def test_bad_plan_from_single_rank(make_daemon, raw_peer, plan, code, text):
    d = make_daemon()
    p = raw_peer(d.endpoint)
    p.hello()
    digest = hashlib.blake2b(msgpack.packb(plan), digest_size=16).hexdigest()  # what plan_digest computes
    reply = p.request_raw(
        "begin", {"step": 1, "digest": digest, "plan": plan, "full_world": True, "shm": True, "wait_ms": 0}
    )
    assert error_code(reply) == code.value and text in reply.message


def test_protocol_misuse(make_daemon, raw_peer):
    d = make_daemon()
    p = raw_peer(d.endpoint)
    p.hello()
    assert error_code(p.request(Begin(step=1, digest="unknown", plan=None))) == ErrorCode.PLAN_REQUIRED.value
    assert error_code(p.request(Commit(step=9))) == ErrorCode.UNKNOWN_STEP.value
    reply = p.request(Begin(step=1, digest="forged", plan=W4))
    assert error_code(reply) == ErrorCode.BAD_PLAN.value and "does not match its digest" in reply.message
    reply = p.request(begin(1, W4))
    assert isinstance(reply, BeginReply) and [p.to_wire() for p in reply.assignment] == [[0, [4], [0]]]
    assert error_code(p.request(Begin(step=1, digest=W4_DIGEST, plan=None))) == ErrorCode.BAD_MESSAGE.value
    # puts: wrong region, wrong byte count
    assert "not assigned" in p.request(Put(step=1, regions=[5], frames=[b"\0" * 16])).message
    assert "got 3 bytes" in p.request(Put(step=1, regions=[0], frames=[b"\0" * 3])).message
    assert error_code(p.request(Release(lease=77))) == ErrorCode.UNKNOWN_LEASE.value
    assert error_code(p.request(Acquire(step=None))) == ErrorCode.NO_VERSION.value
    # a rank that sends frames must send all of them before committing
    began = p.request(Begin(step=2, digest=W4_DIGEST, plan=None, shm=False))
    assert isinstance(began, BeginReply)
    reply = p.request(Commit(step=2))
    assert error_code(reply) == ErrorCode.STEP_FAILED.value and "without sending" in reply.message
    # stale steps
    p.request(Begin(step=5, digest=W4_DIGEST, plan=None, shm=False))
    p.request(Put(step=5, regions=[0], frames=[bytes(range(16))]))
    assert isinstance(p.request(Commit(step=5)), Sealed)
    reply = p.request(Begin(step=4, digest=W4_DIGEST, plan=None))
    assert error_code(reply) == ErrorCode.STALE_STEP.value


def test_rank_conflict_between_live_processes(make_daemon, raw_peer):
    d = make_daemon()
    a, b = raw_peer(d.endpoint), raw_peer(d.endpoint)
    a.hello(rank=0, local_world_size=2)
    other_pid = os.getppid()  # a live process that is not us
    reply = b.hello(rank=0, local_world_size=2, pid=other_pid)
    assert error_code(reply) == ErrorCode.RANK_CONFLICT.value
    reply = b.hello(rank=1, local_world_size=4)
    assert error_code(reply) == ErrorCode.RANK_CONFLICT.value and "must agree" in reply.message


def test_retention_keeps_newest_and_pools_segments(make_daemon):
    d = make_daemon(keep=2)
    sd = {"w": torch.randn(256, 256)}
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        for step in range(1, 7):
            sd["w"].add_(1)
            c.stage(sd, step=step).wait(10)
    assert sealed_steps(d) == [5, 6]
    # keep=2 sealed + the one being written: three segments in rotation, never more
    assert len(list_segments(os.getpid())) <= 3
    with Subscriber(d.endpoint) as sub, sub.latest() as snap:
        assert snap.step == 6 and torch.equal(snap["w"], sd["w"])
        with pytest.raises(ValueError, match="view must be"):
            Subscriber(d.endpoint, view="onnx")


def test_lease_survives_retention_and_memory_limit_refuses(make_daemon):
    size = 4 << 20
    d = make_daemon(keep=1, memory_limit=2 * size + 4096)
    sd = {"w": torch.zeros(size // 4)}
    with Subscriber(d.endpoint) as sub, StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        c.stage(sd, step=1).wait(10)
        held = sub.latest()
        sd["w"].fill_(2)
        c.stage(sd, step=2).wait(10)  # step 1 is past keep=1 but leased: it stays
        assert sealed_steps(d) == [1, 2]
        assert held.step == 1 and float(held["w"][0]) == 0.0
        held2 = sub.latest()
        # both leased and the budget holds two: a third stage is refused with a clear message
        h = c.stage(sd, step=3)
        with pytest.raises(StagerError) as info:
            h.wait(10)
        assert info.value.code == ErrorCode.MEMORY_LIMIT and "release leases" in info.value.message
        assert h.wait_copied() is False
        held.release()
        held2.release()
        assert c.stage(sd, step=4).wait(10)["step"] == 4
        assert sealed_steps(d) == [4]


def test_backpressure_waits_for_a_lease(make_daemon):
    size = 1 << 20
    d = make_daemon(keep=1, memory_limit=2 * size + 4096)
    sd = {"w": torch.zeros(size // 4)}
    with (
        Subscriber(d.endpoint) as sub,
        StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, backpressure_timeout=5.0) as c,
    ):
        c.stage(sd, step=1).wait(10)
        a = sub.latest()
        c.stage(sd, step=2).wait(10)
        b = sub.latest()
        h = c.stage(sd, step=3)
        wait_until(lambda: d.status()["retention"]["waiting_for_memory"] == [3])
        assert not h.done()  # held for memory, not refused
        a.release()
        assert h.wait(10)["step"] == 3
        b.release()


def test_snapshot_larger_than_limit_is_refused(make_daemon):
    d = make_daemon(memory_limit=1 << 20)
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        with pytest.raises(StagerError) as info:
            c.stage({"w": torch.zeros(1 << 19)}, step=1).wait(10)
    assert info.value.code == ErrorCode.MEMORY_LIMIT and "--memory-limit" in info.value.message


def test_frames_transport_and_readonly_reader(make_daemon):
    d = make_daemon()
    sd = {
        "a": torch.randn(33, 7),
        "b": torch.arange(10, dtype=torch.int64),
        "t": torch.randn(6, 4).t(),
        "f8": torch.randn(5).to(torch.float8_e4m3fn),
        "flag": torch.tensor(True),
    }
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, transport="frames") as c:
        assert c.stage(sd, step=1).wait(10)["tensors"] == 5
    with Subscriber(d.endpoint) as sub, sub.latest() as snap:
        for k, v in sd.items():
            assert snap[k].dtype == v.dtype and torch.equal(snap[k].view(torch.uint8), v.contiguous().view(torch.uint8))


def test_non_tensor_leaves_and_model_info(make_daemon):
    d = make_daemon()
    sd = {"w": torch.ones(3), "train": {"step": 7, "name": "run", "hist": [1, 2.5, None], "raw": b"\x01"}}
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        c.stage(sd, step=7, model_info={"adapter": "llama3", "hf_config": {"n_heads": 4}}).wait(10)
        bad = c.stage({"w": torch.ones(3), "x": {1, 2}}, step=8)
        assert bad.wait_copied() is False and "cannot be staged" in str(bad.error)
    with Subscriber(d.endpoint) as sub, sub.latest() as snap:
        assert snap.objects == {
            "train.step": 7,
            "train.name": "run",
            "train.hist": [1, 2.5, None],
            "train.raw": b"\x01",
        }
        assert snap.model_info == {"adapter": "llama3", "hf_config": {"n_heads": 4}}


def test_status_request(make_daemon, raw_peer):
    d = make_daemon()
    p = raw_peer(d.endpoint)
    status = p.request(Status()).status
    assert status["memory"]["limit"] == 64 << 20 and status["versions"] == []


def test_restarted_job_with_fewer_ranks_replans(make_daemon, raw_peer):
    """A 2-rank job of replicated tensors, then a 1-rank job with the same plan: no stale layout."""
    d = make_daemon()
    r0, r1 = raw_peer(d.endpoint), raw_peer(d.endpoint)
    r0.hello(rank=0, local_world_size=2)
    r1.hello(rank=1, local_world_size=2)
    for p in (r0, r1):
        p.sock.send_multipart(begin(1, W4, id=1, shm=False).encode())
    assert isinstance(r0.recv(), BeginReply) and isinstance(r1.recv(), BeginReply)
    assert r0.request(Put(step=1, regions=[0], frames=[bytes(16)])).TYPE == "ok"
    r0.sock.send_multipart(Commit(id=7, step=1).encode())
    r1.sock.send_multipart(Commit(id=7, step=1).encode())
    assert isinstance(r0.recv(), Sealed) and isinstance(r1.recv(), Sealed)
    for p in (r0, r1):
        assert p.request(Bye()).TYPE == "ok"
    solo = raw_peer(d.endpoint)
    solo.hello(rank=0, local_world_size=1)
    assert isinstance(solo.request(Begin(step=2, digest=W4_DIGEST, plan=None, shm=False)), BeginReply)
    solo.request(Put(step=2, regions=[0], frames=[bytes(range(16))]))
    assert isinstance(solo.request(Commit(step=2)), Sealed)


def test_bye_and_close_end_leases(make_daemon):
    d = make_daemon()
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        c.stage({"w": torch.ones(4)}, step=1).wait(10)
    sub = Subscriber(d.endpoint)
    sub.latest()
    sub.latest()
    assert d.status()["leases"] == 2
    sub.close()
    wait_until(lambda: not (d.status()["leases"] or d.status()["readers"]))


def test_a_subscriber_dropped_without_close_is_finalized_and_its_leases_end(make_daemon):
    import gc
    import weakref

    d = make_daemon()
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        c.stage({"w": torch.ones(4)}, step=1).wait(10)
    sub = Subscriber(d.endpoint)
    held = sub.latest()
    dropped = weakref.ref(sub)
    assert d.status()["leases"] == 1 and d.status()["readers"] == 1
    del sub, held  # never closed: its finalizer says bye (a live process on this host is never dropped otherwise)
    gc.collect()
    assert dropped() is None  # nothing of the reader holds it: collected
    wait_until(lambda: not (d.status()["leases"] or d.status()["readers"]))


def test_rehello_under_another_rank_frees_the_first(make_daemon, raw_peer):
    d = make_daemon()
    a = raw_peer(d.endpoint)
    a.hello(rank=0, local_world_size=2)
    a.hello(rank=1, local_world_size=2)
    b = raw_peer(d.endpoint)
    assert isinstance(b.hello(rank=0, local_world_size=2), HelloReply)


def test_caps_on_steps_in_flight_and_leases(make_daemon, raw_peer):
    d = make_daemon()
    p = raw_peer(d.endpoint)
    p.hello()
    for step in range(1, 9):
        assert isinstance(
            p.request(
                begin(step, W4, shm=False) if step == 1 else Begin(step=step, digest=W4_DIGEST, plan=None, shm=False)
            ),
            BeginReply,
        )
    reply = p.request(Begin(step=9, digest=W4_DIGEST, plan=None, shm=False))
    assert error_code(reply) == ErrorCode.MEMORY_LIMIT.value and "still staging" in reply.message
    p.request(Put(step=8, regions=[0], frames=[bytes(16)]))
    assert isinstance(p.request(Commit(step=8)), Sealed)
    leases = [p.request(Acquire(step=None)) for _ in range(64)]
    assert all(r.TYPE == "acquire_reply" for r in leases)
    assert "release" in p.request(Acquire(step=None)).message


def test_a_restarted_job_may_stage_a_step_that_failed_in_the_old_one(make_daemon, raw_peer):
    d = make_daemon()
    old = raw_peer(d.endpoint)
    old.hello()
    assert isinstance(old.request(begin(1, W4)), BeginReply)
    assert old.request(Abort(step=1, reason="killed")).TYPE == "ok"
    assert error_code(old.request(begin(1, W4))) == ErrorCode.STEP_FAILED.value  # same job: step 1 is gone
    assert old.request(Bye()).TYPE == "ok"
    new = raw_peer(d.endpoint)  # the job restarted: a new timeline of steps
    new.hello()
    assert isinstance(new.request(begin(1, W4, shm=False)), BeginReply)
