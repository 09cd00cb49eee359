"""The train-loop hook's parts, each alone and without a daemon: Planner, write_spans,
SegmentWriter, Sender and SealTracker. Time is passed in explicitly; nothing sleeps."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from stager.client.hook import planner as planner_mod
from stager.client.hook import writer as writer_mod
from stager.client.hook.copier import CopyEngine
from stager.client.hook.handle import StageHandle
from stager.client.hook.planner import Plan, Planner
from stager.client.hook.replies import SEAL_PING_S, SealTracker
from stager.client.hook.sender import PLAN_ACK_S_PER_ENTRY, Sender
from stager.client.hook.writer import SegmentWriter
from stager.protocol import (
    Begin,
    BeginReply,
    Commit,
    ErrorCode,
    ErrorReply,
    HelloReply,
    Ok,
    Ping,
    Pong,
    Put,
    RemoteError,
    Sealed,
    StagerError,
)
from stager.protocol.dtypes import dtype_from_name
from stager.protocol.layout import Box, Placement, PlanEntry
from stager.protocol.quant import QuantSpec
from stager.protocol.shm import SHM_DIR, placement_view

pytestmark = pytest.mark.fast  # the fast tier: no daemon process, no torch.distributed job


def entry(fqn, dtype, gshape, offset, lshape) -> PlanEntry:
    return PlanEntry(fqn, dtype, tuple(gshape), Box(tuple(offset), tuple(lshape)))


# ---------------------------------------------------------------------------------------- Planner


def test_planner_builds_a_typed_plan():
    w, b = torch.ones(2, 3), torch.zeros(4, dtype=torch.bfloat16)
    plan = Planner().plan({"model": {"w": w, "b": b}, "step": 7, "cfg": {"lr": 0.1}})
    assert isinstance(plan, Plan)
    by_name = {e.fqn: (e, t) for e, t in zip(plan.entries, plan.locals)}
    assert by_name["model.w"][0] == entry("model.w", "f32", (2, 3), (0, 0), (2, 3))
    assert by_name["model.b"][0] == entry("model.b", "bf16", (4,), (0,), (4,))
    assert by_name["model.w"][1] is w and by_name["model.b"][1] is b  # the live tensors, not copies
    assert plan.objects == {"step": 7, "cfg.lr": 0.1}
    assert plan.quant == {}
    assert len(plan.digest) == 32


def test_planner_pairs_float8_with_its_scale():
    plan = Planner().plan({"w": torch.zeros(4, dtype=torch.float8_e4m3fn), "w_scale_inv": torch.ones(1)})
    assert plan.quant == {"w": QuantSpec("w_scale_inv", "mul", "bf16")}
    assert sorted(e.fqn for e in plan.entries) == ["w", "w_scale_inv"]


def test_planner_digest_is_stable_and_computed_once(monkeypatch):
    calls = []
    real = planner_mod.plan_digest
    monkeypatch.setattr(planner_mod, "plan_digest", lambda p: calls.append(1) or real(p))
    planner = Planner()
    digests = {planner.plan({"w": torch.ones(3, 2), "b": torch.ones(2), "step": s}).digest for s in range(5)}
    assert len(digests) == 1  # non-tensor values do not change the layout
    assert len(calls) == 1  # unchanged plan: the cached digest
    assert digests == {Planner().plan({"w": torch.zeros(3, 2), "b": torch.zeros(2)}).digest}  # values don't count


BASE = {"w": torch.ones(3, 2), "b": torch.ones(2)}


@pytest.mark.parametrize(
    "changed",
    [
        {"w": torch.ones(4, 2), "b": torch.ones(2)},  # a shape
        {"w": torch.ones(2, 3), "b": torch.ones(2)},  # same numel, other shape
        {"w": torch.ones(3, 2, dtype=torch.float16), "b": torch.ones(2)},  # a dtype
        {"w": torch.ones(3, 2), "bias": torch.ones(2)},  # a name
        {"w": torch.ones(3, 2)},  # a tensor fewer
        {"w": torch.ones(3, 2), "b": torch.ones(2), "c": torch.ones(1)},  # a tensor more
    ],
    ids=["shape", "reshape", "dtype", "name", "fewer", "more"],
)
def test_planner_digest_changes_with_the_layout(changed):
    planner = Planner()
    before = planner.plan(BASE).digest
    after = planner.plan(changed).digest
    assert after != before
    assert planner.plan(BASE).digest == before  # and back


def test_planner_refuses_bad_leaves():
    with pytest.raises(StagerError) as info:
        Planner().plan({"x": object()})
    assert info.value.code == ErrorCode.BAD_VALUE


# ------------------------------------------------------------------------------------ write_spans


@pytest.mark.parametrize(
    "plan,assignment,spans",
    [
        # rows 4..7 of an (8, 4) f32 block at 0: bytes 64..128
        ([entry("w", "f32", (8, 4), (4, 0), (4, 4))], [Placement(0, (8, 4), (4, 0))], [(64, 128)]),
        # a replica another rank writes: nothing
        ([entry("b", "f32", (8,), (0,), (8,))], [None], []),
        # a column shard covers the rows it crosses, first to last element
        ([entry("t", "f32", (4, 6), (0, 3), (4, 3))], [Placement(8192, (4, 6), (0, 3))], [(8192 + 12, 8192 + 96)]),
        # itemsize comes from the dtype
        ([entry("h", "bf16", (10,), (0,), (10,))], [Placement(100, (10,), (0,))], [(100, 120)]),
        # an empty shard is skipped
        ([entry("e", "f32", (0, 4), (0, 0), (0, 4))], [Placement(0, (0, 4), (0, 0))], []),
        # two blocks less than a page apart merge, also out of order
        (
            [entry("a", "f32", (16,), (0,), (16,)), entry("c", "f32", (16,), (0,), (16,))],
            [Placement(4000, (16,), (0,)), Placement(0, (16,), (0,))],
            [(0, 4064)],
        ),
        # more than a page apart: separate
        (
            [entry("a", "f32", (16,), (0,), (16,)), entry("c", "f32", (16,), (0,), (16,))],
            [Placement(0, (16,), (0,)), Placement(64 + 4097, (16,), (0,))],
            [(0, 64), (4161, 4225)],
        ),
    ],
    ids=["rows", "replica", "columns", "bf16", "empty", "merge", "apart"],
)
def test_write_spans(plan, assignment, spans):
    assert writer_mod.write_spans(plan, assignment) == spans


# ---------------------------------------------------------------------------------- SegmentWriter


@pytest.fixture
def segment_names():
    """Names of real segment files (this process's pid, so no daemon reclaims them); removed after."""
    made = []

    def make(size: int | None) -> str:
        name = f"stager-{os.getuid()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        made.append(name)
        if size is not None:
            with open(os.path.join(SHM_DIR, name), "wb") as f:
                f.truncate(size)
        return name

    yield make
    for name in made:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass


def _reply(segment, size, layout="L1", live=()):
    return BeginReply(
        step=1, segment=segment, size=size, layout=layout, assignment=None, live_segments=[segment, *live]
    )


def test_writer_copies_each_shard_to_its_placement(segment_names):
    seg = segment_names(4096)
    plan = [
        entry("w", "f32", (4, 4), (2, 0), (2, 4)),
        entry("b", "f32", (3,), (0,), (3,)),
        entry("c", "f32", (2, 6), (0, 2), (2, 2)),
    ]
    assignment = [Placement(0, (4, 4), (2, 0)), None, Placement(1024, (2, 6), (0, 2))]
    locals_ = [torch.arange(8.0).view(2, 4), torch.ones(3), torch.full((2, 2), 5.0)]
    writer = SegmentWriter(CopyEngine())
    dsts = writer.destinations(_reply(seg, 4096), plan, assignment, now=0.0)
    assert dsts[1] is None
    assert writer.copy(dsts, locals_, None) == []  # CPU copies: no CUDA events
    mapped = writer.segments[seg]
    for e, where, local in zip(plan, assignment, locals_):
        if where is not None:
            assert torch.equal(placement_view(mapped, dtype_from_name(e.dtype), where, e.box.shape), local)
    assert writer.destinations(_reply(seg, 4096), plan, assignment, now=1.0) is dsts  # cached per (segment, layout)
    writer.close()


def test_writer_drops_retired_segments_and_other_layouts(segment_names):
    a, b = segment_names(4096), segment_names(4096)
    plan, assignment = [entry("w", "f32", (4,), (0,), (4,))], [Placement(0, (4,), (0,))]
    writer = SegmentWriter(CopyEngine())
    writer.destinations(_reply(a, 4096, live=[b]), plan, assignment, now=0.0)
    assert set(writer.upcoming) == {b}  # the other live segment is pre-faulted while idle
    writer.destinations(_reply(b, 4096, layout="L2"), plan, assignment, now=0.0)  # a retired
    assert set(writer.segments) == {b} and list(writer.dst_cache) == [(b, "L2")]
    assert writer.upcoming == {}
    writer.close()


def test_premap_waits_for_a_segment_then_gives_up(segment_names):
    current, missing = segment_names(4096), segment_names(None)
    plan, assignment = [entry("w", "f32", (4,), (0,), (4,))], [Placement(0, (4,), (0,))]
    writer = SegmentWriter(CopyEngine())
    writer.destinations(_reply(current, 4096, live=[missing]), plan, assignment, now=100.0)
    assert writer.premap_one(1 << 20, now=100.0) is False  # not created yet: the caller waits a little
    assert missing in writer.upcoming
    assert writer.premap_one(1 << 20, now=100.0 + writer_mod.PREFAULT_GIVE_UP_S + 1) is True
    assert writer.upcoming == {} and missing not in writer.segments
    writer.close()


def test_premap_faults_in_spans_in_budget_sized_chunks(segment_names, monkeypatch):
    current, upcoming = segment_names(1 << 16), segment_names(1 << 16)
    calls = []
    monkeypatch.setattr(writer_mod, "prefault", lambda seg, start, stop: calls.append((start, stop)) or True)
    plan = [entry("a", "u8", (10000,), (0,), (10000,)), entry("b", "u8", (100,), (0,), (100,))]
    assignment = [Placement(0, (10000,), (0,)), Placement(30000, (100,), (0,))]
    writer = SegmentWriter(CopyEngine())
    writer.destinations(_reply(current, 1 << 16, live=[upcoming]), plan, assignment, now=0.0)
    assert writer.spans == [(0, 10000), (30000, 30100)]
    assert calls == [(0, 10000), (30000, 30100)]  # the step's own segment: all of it, before the copy
    calls.clear()
    steps = []
    while writer.upcoming:
        assert writer.premap_one(4096, now=0.0) is True
        steps.append(list(calls))
        calls.clear()
    assert steps == [[(0, 4096)], [(4096, 8192)], [(8192, 10000), (30000, 30100)]]
    assert upcoming in writer.segments  # mapped for the step that will use it
    writer.destinations(_reply(upcoming, 1 << 16, live=[current]), plan, assignment, now=1.0)
    assert calls == [] and writer.upcoming == {}  # both faulted in already: nothing to do again
    writer.close()


def test_a_partly_prefaulted_segment_is_finished_when_its_step_comes(segment_names, monkeypatch):
    current, upcoming = segment_names(1 << 16), segment_names(1 << 16)
    calls = []
    monkeypatch.setattr(writer_mod, "prefault", lambda seg, start, stop: calls.append((start, stop)) or True)
    plan, assignment = [entry("a", "u8", (10000,), (0,), (10000,))], [Placement(0, (10000,), (0,))]
    writer = SegmentWriter(CopyEngine())
    writer.destinations(_reply(current, 1 << 16, live=[upcoming]), plan, assignment, now=0.0)
    assert writer.premap_one(4096, now=0.0) is True  # one chunk, then a stage() came
    calls.clear()
    writer.destinations(_reply(current, 1 << 16, live=[upcoming]), plan, assignment, now=1.0)
    assert set(writer.upcoming) == {upcoming}  # still upcoming, its progress kept
    writer.destinations(_reply(upcoming, 1 << 16, live=[current]), plan, assignment, now=2.0)
    assert calls == [(4096, 10000)]  # the rest, in bulk, before its step's copy
    writer.close()


# ----------------------------------------------------------------------------------------- Sender


class FakeConn:
    """The parts of Connection the sender and the tracker use, scripted by the test."""

    def __init__(self, replies=()):
        self.session, self.same_host, self.connected, self.generation = "s1", True, True, 1
        self.link_up = True  # what the socket monitor reports on the next poll_monitor()
        self.replies = list(replies)  # request() answers in order; an exception is raised
        self.requests, self.sent, self.hellos, self.resets = [], [], 0, 0
        self.send_error: StagerError | None = None
        self._id = 0
        self.ack_timeout, self.acks = 1.0, []  # the connection's ack timeout; each request's own
        self.expects = []  # the reply type each request asked for

    def hello(self, timeout):
        self.hellos += 1
        self.session = f"s{self.hellos + 1}"
        return HelloReply(session=self.session)

    def request(self, msg, timeout, *, expect=None, ack_timeout=None):
        self.requests.append(msg)
        self.acks.append(ack_timeout)
        self.expects.append(expect)
        msg.sent_bytes = [bytes(f) for f in msg.frames]  # frames as the socket would read them now
        answer = self.replies.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if expect is not None and not isinstance(answer, expect):  # as Connection.request does
            raise StagerError(ErrorCode.BAD_MESSAGE, f"unexpected {answer.TYPE} reply to {msg.TYPE}")
        return answer

    def send(self, msg):
        if self.send_error is not None:
            raise self.send_error
        self._id += 1
        msg.id = self._id
        self.sent.append(msg)
        return msg.id

    def poll_monitor(self, timeout_ms=0):
        self.connected = self.link_up
        return self.connected

    def reset(self, silent_since=None):
        self.resets += 1
        self.generation += 1
        self.connected, self.session = False, None


PLAN = [entry("w", "f32", (4,), (0,), (4,))]


def _sender(conn, transport="auto"):
    return Sender(conn, full_world=True, timeout=1.0, wait_ms=0, transport=transport)


@pytest.mark.parametrize(
    "transport,same_host,shm",
    [
        ("auto", True, True),
        ("auto", False, False),
        ("shm", False, True),
        ("frames", True, False),
    ],
)
def test_sender_chooses_the_transport(transport, same_host, shm):
    conn = FakeConn()
    conn.session, conn.same_host = None, same_host
    assert _sender(conn, transport).connect() is shm
    assert conn.hellos == 1  # no session: hello first


def test_begin_sends_the_plan_once_per_session():
    conn = FakeConn([BeginReply(layout="L"), BeginReply(layout="L")])
    sender = _sender(conn)
    sender.begin(1, PLAN, "d1", True)
    sender.begin(2, PLAN, "d1", True)
    assert [m.plan for m in conn.requests] == [tuple(PLAN), None]
    assert all(isinstance(m, Begin) and m.digest == "d1" for m in conn.requests)
    # the daemon decodes and lays out a plan before it can acknowledge anything: more time per entry
    assert conn.acks == [1.0 + len(PLAN) * PLAN_ACK_S_PER_ENTRY, 1.0]


@pytest.mark.parametrize(
    "first,hellos",
    [
        (RemoteError(ErrorCode.PLAN_REQUIRED, "resend"), 0),
        (RemoteError(ErrorCode.NOT_REGISTERED, "who?"), 1),
        (RemoteError(ErrorCode.SESSION_EXPIRED, "silent too long"), 1),  # the daemon dropped a stopped rank
    ],
)
def test_begin_retries_once_with_the_plan(first, hellos):
    conn = FakeConn([BeginReply(layout="L"), first, BeginReply(layout="L")])
    sender = _sender(conn)
    sender.begin(1, PLAN, "d1", True)
    assert sender.begin(2, PLAN, "d1", True).layout == "L"
    assert [m.plan is not None for m in conn.requests] == [True, False, True]
    assert conn.hellos == hellos


@pytest.mark.parametrize(
    "replies,code",
    [
        (
            [RemoteError(ErrorCode.PLAN_REQUIRED, "x"), RemoteError(ErrorCode.PLAN_REQUIRED, "x")],
            ErrorCode.PLAN_REQUIRED,
        ),
        ([RemoteError(ErrorCode.BAD_PLAN, "no")], ErrorCode.BAD_PLAN),
        ([Ok()], ErrorCode.BAD_MESSAGE),
    ],
)
def test_begin_failures(replies, code):
    with pytest.raises(StagerError) as info:
        _sender(FakeConn(replies)).begin(1, PLAN, "d1", True)
    assert info.value.code == code


PLACED = Placement(0, (2,), (0,))


def test_the_sender_names_the_reply_type_each_request_expects():
    conn = FakeConn([BeginReply(layout="L", assignment=[]), Ok()])
    sender = _sender(conn)
    sender.begin(1, [], "d0", False)
    sender.put(1, [PLACED], [torch.ones(2)], 1 << 20)
    assert conn.expects == [BeginReply, Ok]


def test_assignment_is_remembered_per_session_and_layout():
    conn = FakeConn()
    sender = _sender(conn)
    given = (Placement(0, (4,), (0,)),)
    assert sender.assignment(BeginReply(layout="L", assignment=given), 1) == given
    assert sender.assignment(BeginReply(layout="L"), 1) == given  # the daemon sends it only when new
    with pytest.raises(StagerError) as info:
        sender.assignment(BeginReply(layout="L"), 2)  # does not match the plan
    assert info.value.code == ErrorCode.INTERNAL
    conn.session = "restarted"
    with pytest.raises(StagerError):
        sender.assignment(BeginReply(layout="L"), 1)
    sender.assignment(BeginReply(layout="M", assignment=given), 1)
    assert list(sender.assignments) == [("restarted", "M")]  # the old session's are dropped


@pytest.mark.parametrize("batch_bytes,batches", [(1 << 20, [[0, 2, 3]]), (16, [[0], [2], [3]]), (40, [[0, 2], [3]])])
def test_put_sends_assigned_regions_in_batches(batch_bytes, batches):
    locals_ = [torch.arange(4.0), torch.ones(4), torch.arange(12.0).view(3, 4).t(), torch.full((2,), 9.0)]
    where = Placement(0, (1,), (0,))
    conn = FakeConn([Ok() for _ in batches])
    _sender(conn).put(5, [where, None, where, where], locals_, batch_bytes)
    assert [m.regions for m in conn.requests] == batches
    assert all(isinstance(m, Put) and m.step == 5 for m in conn.requests)
    frames = {i: f for m in conn.requests for i, f in zip(m.regions, m.sent_bytes)}
    for i, frame in frames.items():
        assert frame == locals_[i].contiguous().numpy().tobytes()  # strided shards go contiguous


def test_commit_and_abort():
    conn = FakeConn()
    sender = _sender(conn)
    rid = sender.commit(3, {"step": 3}, {"m": 1}, {})
    assert isinstance(conn.sent[0], Commit) and conn.sent[0].id == rid and conn.sent[0].objects == {"step": 3}
    sender.abort(3, "x" * 1000)
    assert conn.sent[1].step == 3 and len(conn.sent[1].reason) == 500
    conn.send_error = StagerError(ErrorCode.UNAVAILABLE, "gone")
    sender.abort(4, "best effort")  # an unreachable daemon is not an error here


# ------------------------------------------------------------------------------------ SealTracker


def _tracked(seal_timeout=10.0, now=100.0):
    conn = FakeConn()
    tracker = SealTracker(conn, seal_timeout)
    handle = StageHandle(7, strict=False)
    tracker.add(41, handle, now)
    return conn, tracker, handle


def _error(handle) -> StagerError:
    assert handle.done()
    with pytest.raises(StagerError) as info:
        handle.wait(0)
    return info.value


def test_sealed_reply_completes_the_handle():
    _, tracker, handle = _tracked()
    tracker.on_reply(Sealed(id=41, step=7, nbytes=16, tensors=1, partial=False))
    assert handle.wait(0) == {"step": 7, "nbytes": 16, "tensors": 1, "partial": False}
    assert tracker.pending == {} and not tracker.awaiting


@pytest.mark.parametrize(
    "reply,code",
    [
        (ErrorReply(id=41, code=ErrorCode.STEP_FAILED.value, message="rank 1 died"), ErrorCode.STEP_FAILED),
        (ErrorReply(id=41, code=ErrorCode.MEMORY_LIMIT.value, message="full"), ErrorCode.MEMORY_LIMIT),
        (Ok(id=41), ErrorCode.BAD_MESSAGE),
    ],
)
def test_error_replies_fail_the_handle(reply, code):
    _, tracker, handle = _tracked()
    tracker.on_reply(reply)
    assert _error(handle).code == code and tracker.pending == {}


def test_replies_to_other_requests_are_ignored():
    _, tracker, handle = _tracked()
    tracker.on_reply(Sealed(id=99, step=7))
    tracker.on_reply(Pong(id=99, session="other"))  # not our ping
    assert not handle.done() and list(tracker.pending) == [41]


@pytest.mark.parametrize("now,failed", [(109.9, False), (110.0, True), (500.0, True)])
def test_deadline_expiry_fails_with_timeout(now, failed):
    _, tracker, handle = _tracked(seal_timeout=10.0, now=100.0)
    tracker.maintain(now, keepalive_s=5.0, ping_timeout_s=5.0)
    assert handle.done() is failed
    if failed:
        assert _error(handle).code == ErrorCode.TIMEOUT and tracker.pending == {}


def test_generation_change_fails_only_older_requests():
    conn, tracker, old = _tracked()
    conn.generation += 1  # the socket was rebuilt: the daemon will never answer request 41
    new = StageHandle(8, strict=False)
    tracker.add(42, new, 100.0)
    tracker.maintain(100.0, keepalive_s=5.0, ping_timeout_s=5.0)
    assert _error(old).code == ErrorCode.UNAVAILABLE
    assert not new.done() and list(tracker.pending) == [42]


def test_disconnect_fails_pending_handles():
    conn, tracker, handle = _tracked()
    tracker.check_connection()
    assert not handle.done()
    conn.link_up = False
    tracker.check_connection()
    assert _error(handle).code == ErrorCode.UNAVAILABLE


@pytest.mark.parametrize("session,lost", [("s1", False), ("s2", True)])
def test_pong_with_a_new_session_fails_pending(session, lost):
    conn, tracker, handle = _tracked()
    tracker.maintain(100.0, keepalive_s=5.0, ping_timeout_s=5.0)
    ping = conn.sent[-1]
    assert isinstance(ping, Ping) and tracker.ping_id == ping.id
    tracker.on_reply(Pong(id=ping.id, session=session))
    assert tracker.ping_id is None and handle.done() is lost
    if lost:
        assert _error(handle).code == ErrorCode.UNAVAILABLE and conn.session is None


@pytest.mark.parametrize(
    "pending,times,pings",
    [
        (True, [100.0, 100.0 + SEAL_PING_S / 2, 100.0 + SEAL_PING_S * 1.5], 2),  # every second while a seal is due
        (False, [100.0, 101.5, 104.0], 1),  # idle: every keepalive_s
        (False, [100.0, 105.5, 111.0], 3),
    ],
)
def test_ping_schedule(pending, times, pings):
    conn = FakeConn()
    tracker = SealTracker(conn, 300.0)
    if pending:
        tracker.add(1000, StageHandle(1, strict=False), 0.0)
    for now in times:
        tracker.maintain(now, keepalive_s=5.0, ping_timeout_s=60.0)
        if conn.sent and isinstance(conn.sent[-1], Ping):
            tracker.on_reply(Pong(id=conn.sent[-1].id, session="s1"))
    assert sum(isinstance(m, Ping) for m in conn.sent) == pings


def test_unanswered_ping_resets_and_fails():
    conn, tracker, handle = _tracked(seal_timeout=300.0)
    tracker.maintain(100.0, keepalive_s=5.0, ping_timeout_s=5.0)
    tracker.maintain(103.0, keepalive_s=5.0, ping_timeout_s=5.0)  # still waiting: no second ping
    assert sum(isinstance(m, Ping) for m in conn.sent) == 1 and conn.resets == 0
    tracker.maintain(105.5, keepalive_s=5.0, ping_timeout_s=5.0)
    assert conn.resets == 1 and tracker.ping_id is None
    assert _error(handle).code == ErrorCode.UNAVAILABLE


def test_no_ping_without_a_session_or_when_send_fails():
    conn = FakeConn()
    conn.session = None
    tracker = SealTracker(conn, 300.0)
    tracker.maintain(100.0, keepalive_s=5.0, ping_timeout_s=5.0)
    assert conn.sent == []
    conn.session, conn.send_error = "s1", StagerError(ErrorCode.UNAVAILABLE, "gone")
    tracker.maintain(100.0, keepalive_s=5.0, ping_timeout_s=5.0)
    assert tracker.ping_id is None and not tracker.awaiting


def test_fail_all_names_the_step():
    _, tracker, handle = _tracked()
    tracker.fail_all(ErrorCode.UNAVAILABLE, "the client was closed before the step was sealed")
    error = _error(handle)
    assert error.code == ErrorCode.UNAVAILABLE and "step 7" in error.message and tracker.pending == {}
