"""Full assembly's protocol (serve --assemble-full): the daemon serves assemble_begin / assemble_done
on its private assembler socket only, refuses them on its endpoint (ipc or tcp), refuses a lease or
step it does not hold, and stays up whatever it is sent there. The whole flow across real nodes:
test_multinode.py."""

import itertools
import os
import random
from types import SimpleNamespace

import msgpack
import pytest
import torch

from conftest import InProcessDaemon, RawPeer
from helpers import wait_until
from stager.client import Subscriber
from stager.client.connection import Connection
from stager.client.hook.sender import Sender
from stager.daemon.handlers import Handlers
from stager.daemon.memory import SegmentBudget
from stager.daemon.segments import Segment
from stager.daemon.state import DaemonState
from stager.dev.launch import free_port
from stager.loaders.assemble_full import AssemblerChannel, segment_targets
from stager.loaders.ingest import IngestSession
from stager.protocol import (
    PROTOCOL_VERSION,
    Acquire,
    AssembleBegin,
    AssembleDone,
    AssembleReply,
    Begin,
    BeginReply,
    Commit,
    ErrorCode,
    ErrorReply,
    Hello,
    Ok,
    ProtocolError,
    Sealed,
    StagerError,
    Status,
    StatusReply,
    decode,
)
from stager.protocol.endpoint import host_id, process_start_time
from stager.protocol.layout import Box, PlanEntry, plan_digest
from stager.protocol.shm import segment_name

SPECS = (("w", "f32", (4, 2)),)


# ------------------------------------------------------------------ the messages alone


@pytest.mark.fast
@pytest.mark.parametrize(
    "specs,text",
    [
        ([["w", "f32", [4, 2]], ["w", "f32", [4, 2]]], "appears twice"),
        ([["w", "complex", [4]]], "w: "),
        ([["w", "f32", [-1, 2]]], "negative global shape"),
        ([["w", "f32"]], r"spec 0 must be \[fqn, dtype, shape\]"),
        ([["", "f32", [1]]], "no tensor name"),
        ([["w", "f32", [1] * 65]], "at most 64"),
    ],
    ids=["twice", "dtype", "negative", "short", "no name", "too many dims"],
)
def test_malformed_specs_are_typed_errors(specs, text):
    header = {"v": PROTOCOL_VERSION, "t": "assemble_begin", "id": 3, "b": {"step": 1, "lease": 1, "specs": specs}}
    with pytest.raises(ProtocolError, match=text) as info:
        decode([msgpack.packb(header)])
    assert info.value.code == ErrorCode.BAD_MESSAGE and info.value.request_id == 3


@pytest.mark.fast
@pytest.mark.parametrize(
    "body,text",
    [
        ({"step": 1, "segment": "", "size": 0, "offsets": [], "reason": "bored", "message": ""}, "reason must be"),
        ({"step": 1, "segment": "s", "size": -1, "offsets": [], "reason": "", "message": ""}, "size must be >= 0"),
        ({"step": 1, "segment": "s", "size": 8, "offsets": [["w", -8]], "reason": "", "message": ""}, "an offset must"),
    ],
    ids=["reason", "size", "offset"],
)
def test_malformed_replies_are_typed_errors(body, text):
    with pytest.raises(ProtocolError, match=text):
        decode([msgpack.packb({"v": PROTOCOL_VERSION, "t": "assemble_reply", "id": 1, "b": body})])


@pytest.mark.fast
def test_a_skip_round_trips():
    back = decode(AssembleReply(id=5, step=3, reason="no_memory", message="m").encode())
    assert (back.step, back.segment, back.offsets, back.reason, back.message) == (3, "", (), "no_memory", "m")


@pytest.mark.fast
def test_the_assembler_refuses_offsets_outside_the_segment_or_missing_a_tensor():
    reply = AssembleReply(step=1, segment="stager-0-1-s1", size=16, offsets=(("w", 0),))
    with pytest.raises(StagerError, match="outside its segment"):
        segment_targets(reply, SPECS)  # f32[4, 2] is 32 bytes, the segment 16 (checked before mapping)
    with pytest.raises(StagerError, match="each tensor once"):
        segment_targets(AssembleReply(step=1, segment="stager-0-1-s1", size=64, offsets=()), SPECS)


# ------------------------------------------------------------------ a daemon


def stage_partial(endpoint: str, step: int) -> Connection:
    """Seal ``step`` on this daemon as a node holding the top half of w (rows 0-1 of 4), its
    regions holding 1.0: a partial version, as each node of a multi-node job seals."""
    conn = Connection(endpoint, role="trainer", rank=0, local_world_size=1, world_size=2)
    sender = Sender(conn, full_world=False, timeout=10.0, wait_ms=0, transport="auto")
    entries = [PlanEntry("w", "f32", (4, 2), Box((0, 0), (2, 2)))]
    reply = sender.begin(step, entries, plan_digest(entries), sender.connect())
    from stager.protocol.shm import map_segment

    seg = map_segment(reply.segment, reply.size, writable=True)
    seg.view(torch.float32).fill_(1.0)
    del seg
    rid = sender.commit(step, {}, None, {})
    assert conn.wait_reply(rid, 30.0, "commit", Sealed).partial
    return conn


@pytest.fixture
def daemon(short_dir):
    d = InProcessDaemon(f"ipc://{short_dir}/d.sock", memory_limit=64 << 20, step_timeout=10.0, assemble_full=True)
    yield d
    d.stop()


def refused_on_the_endpoint(endpoint: str) -> None:
    peer = RawPeer(endpoint)
    for msg in (AssembleBegin(id=1, step=1, lease=1, specs=SPECS), AssembleDone(id=2, step=1, segment="x", ok=True)):
        peer.send_frames(msg.encode())
        reply = peer.recv(10.0)
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.FORBIDDEN.value and reply.id == msg.id
        assert "assembler socket" in reply.message


def test_assembly_messages_are_refused_on_the_daemons_ipc_endpoint(daemon):
    refused_on_the_endpoint(daemon.endpoint)
    assert daemon.status()["assembly"] == {"enabled": True, "assembled": []}  # the status keys as before


def test_assembly_messages_are_refused_over_tcp(short_dir):
    d = InProcessDaemon(
        f"tcp://127.0.0.1:{free_port()}", memory_limit=64 << 20, insecure_no_auth=True, assemble_full=True
    )
    try:
        refused_on_the_endpoint(d.endpoint)
        assert d.daemon.assembly_endpoint.startswith("ipc://")  # the assembler's socket is never tcp
    finally:
        d.stop()


def test_the_assembler_socket_is_owner_only_and_gone_with_the_daemon(short_dir):
    d = InProcessDaemon(f"ipc://{short_dir}/d.sock", memory_limit=64 << 20, assemble_full=True)
    path = d.daemon.assembly_endpoint[len("ipc://") :]
    assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0 and os.stat(path).st_mode & 0o077 == 0
    d.stop()
    assert not os.path.exists(path)
    open(path, "w").close()  # as a daemon killed with -9 leaves it: the next one on the endpoint binds anyway
    d = InProcessDaemon(f"ipc://{short_dir}/d.sock", memory_limit=64 << 20, assemble_full=True)
    try:
        assert d.daemon.assembly_endpoint == f"ipc://{path}"
        peer = RawPeer(f"ipc://{path}")
        peer.send_frames(Status(id=1).encode())
        assert isinstance(peer.recv(10.0), StatusReply)
    finally:
        d.stop()


def test_the_assembler_socket_refuses_what_the_daemon_does_not_hold(daemon):
    channel = AssemblerChannel(daemon.daemon.assembly_endpoint)
    try:
        with pytest.raises(StagerError, match="lease 7 is not a lease on step 1") as info:  # no lease at all
            channel.request(AssembleBegin(step=1, lease=7, specs=SPECS), 10.0, AssembleReply)
        assert info.value.code == ErrorCode.UNKNOWN_LEASE
        with IngestSession(daemon.endpoint, step=1) as s:  # a whole version: nothing to assemble
            s.begin({"w": (torch.float32, (4, 2))})["w"].fill_(2.0)
            s.commit()
        with Subscriber(daemon.endpoint) as sub, sub.latest() as snap:
            with pytest.raises(StagerError, match="not a lease on step 2") as info:  # a lease, of another step
                channel.request(AssembleBegin(step=2, lease=snap.lease, specs=SPECS), 10.0, AssembleReply)
            assert info.value.code == ErrorCode.UNKNOWN_LEASE
            reply = channel.request(AssembleBegin(step=1, lease=snap.lease, specs=SPECS), 10.0, AssembleReply)
            assert reply.reason == "not_partial" and not reply.segment
        with pytest.raises(StagerError, match="not the one this daemon gave") as info:  # done, never begun
            channel.request(AssembleDone(step=1, segment="stager-0-1-s1", ok=True), 10.0, Ok)
        assert info.value.code == ErrorCode.UNKNOWN_STEP
    finally:
        channel.close()


def test_a_partial_version_is_swapped_for_the_whole_one_the_assembler_wrote(daemon):
    trainer = stage_partial(daemon.endpoint, 1)
    channel = AssemblerChannel(daemon.daemon.assembly_endpoint)
    try:
        with Subscriber(daemon.endpoint) as sub, sub.latest(allow_partial=True) as snap:
            wrong = (("w", "bf16", (4, 2)),)
            reply = channel.request(AssembleBegin(step=1, lease=snap.lease, specs=wrong), 10.0, AssembleReply)
            assert reply.reason == "mismatch" and "w is f32[4, 2] on this node but bf16[4, 2]" in reply.message
            huge = (("w", "f32", (4, 2)), ("big", "f32", (64 << 20,)))  # 256 MiB more than the 64 MiB limit
            reply = channel.request(AssembleBegin(step=1, lease=snap.lease, specs=huge), 10.0, AssembleReply)
            assert reply.reason == "no_memory" and "no free memory" in reply.message
            reply = channel.request(AssembleBegin(step=1, lease=snap.lease, specs=SPECS), 60.0, AssembleReply)
            assert not reply.reason and reply.size >= 32  # the segment is created in the background first
            segment_targets(reply, SPECS)["w"].copy_(torch.arange(8, dtype=torch.float32).view(4, 2))
            assert isinstance(channel.request(AssembleDone(step=1, segment=reply.segment, ok=True), 10.0, Ok), Ok)
        status = daemon.status()
        assert status["assembly"]["assembled"] == [1] and status["counters"]["assembled"] == 1
        assert status["counters"]["assembly_skipped"] == 1 and status["counters"]["assembly_failed"] == 1
        with Subscriber(daemon.endpoint) as sub, sub.latest() as snap:  # whole now: no allow_partial needed
            assert not snap.partial and torch.equal(snap["w"], torch.arange(8, dtype=torch.float32).view(4, 2))
    finally:
        channel.close()
        trainer.close()


def test_a_failed_assembly_gives_the_segment_back_and_leaves_the_version_partial(daemon):
    trainer = stage_partial(daemon.endpoint, 1)
    channel = AssemblerChannel(daemon.daemon.assembly_endpoint)
    try:
        with Subscriber(daemon.endpoint) as sub, sub.latest(allow_partial=True) as snap:
            reply = channel.request(AssembleBegin(step=1, lease=snap.lease, specs=SPECS), 60.0, AssembleReply)
            done = AssembleDone(step=1, segment=reply.segment, ok=False, reason="a node went down" * 1000)
            assert isinstance(channel.request(done, 10.0, Ok), Ok)
        status = daemon.status()
        assert status["assembly"]["assembled"] == [] and status["counters"]["assembly_failed"] == 1
        assert next(v for v in status["versions"] if v["step"] == 1)["partial"]
    finally:
        channel.close()
        trainer.close()


@pytest.mark.parametrize(
    "frames",
    [
        [b"\xc1"],
        [
            msgpack.packb(
                {"v": PROTOCOL_VERSION, "t": "assemble_begin", "id": 4, "b": {"step": -1, "lease": 0, "specs": []}}
            )
        ],
        [
            msgpack.packb(
                {
                    "v": PROTOCOL_VERSION,
                    "t": "assemble_begin",
                    "id": 4,
                    "b": {"step": 1, "lease": 1, "specs": [[1, 2, 3]] * 3},
                }
            )
        ],
        [
            msgpack.packb(
                {
                    "v": PROTOCOL_VERSION,
                    "t": "assemble_done",
                    "id": 4,
                    "b": {"step": 1, "segment": None, "ok": 1, "reason": ""},
                }
            )
        ],
        [msgpack.packb({"v": PROTOCOL_VERSION, "t": "hello", "id": 4, "b": {}})],
        [msgpack.packb({"v": PROTOCOL_VERSION, "t": "begin", "id": 4, "b": {}})],
        [b"x" * 100, b"y" * 1000],
    ],
    ids=["garbage", "negative step", "bad specs", "bad done", "hello", "begin", "frames"],
)
def test_the_daemon_stays_up_on_a_malformed_assembly_message(daemon, frames):
    peer = RawPeer(daemon.daemon.assembly_endpoint)
    peer.send_frames(frames)
    reply = peer.recv(10.0)
    assert isinstance(reply, ErrorReply) and reply.code in (ErrorCode.BAD_MESSAGE.value, ErrorCode.UNKNOWN_TYPE.value)
    peer.send_frames(Status(id=9).encode())  # the assembler socket still answers
    assert isinstance(peer.recv(10.0), StatusReply)
    assert daemon.status()["state"] == "serving"  # and the endpoint


def test_random_assembly_messages_never_take_the_daemon_down(daemon):
    from test_fuzz import junk

    trainer = stage_partial(daemon.endpoint, 1)
    rng = random.Random(23)
    peer = RawPeer(daemon.daemon.assembly_endpoint)
    try:
        with Subscriber(daemon.endpoint) as sub, sub.latest(allow_partial=True) as snap:
            valid = [
                AssembleBegin(step=1, lease=snap.lease, specs=SPECS).body(),
                AssembleDone(step=1, segment="stager-0-1-s1", ok=True).body(),
            ]
            for i in range(400):
                cls = rng.choice([AssembleBegin, AssembleDone, AssembleReply, Status])
                body = dict(rng.choice(valid)) if rng.random() < 0.5 else {}
                for name in cls.SCHEMA:  # past the decoder into the handler as often as not
                    if name not in body or rng.random() < 0.3:
                        body[name] = junk(rng) if rng.random() < 0.7 else getattr(cls(), name)
                header = {"v": PROTOCOL_VERSION, "t": cls.TYPE, "id": i + 1, "b": body}
                peer.send_frames([msgpack.packb(header, use_bin_type=True)])
                reply = peer.recv(30.0)  # every request is answered (a begin that got a segment: at once or soon)
                assert reply.id == i + 1 and getattr(reply, "code", "") != "internal", (body, reply)
            # the real thing still works after all that
            channel = AssemblerChannel(daemon.daemon.assembly_endpoint)
            try:
                reply = channel.request(AssembleBegin(step=1, lease=snap.lease, specs=SPECS), 60.0, AssembleReply)
                segment_targets(reply, SPECS)["w"].fill_(3.0)
                channel.request(AssembleDone(step=1, segment=reply.segment, ok=True), 10.0, Ok)
            finally:
                channel.close()
        assert daemon.status()["assembly"]["assembled"] == [1]
    finally:
        trainer.close()


def test_a_begin_waiting_for_its_segment_is_answered_when_another_begin_supersedes_it(daemon):
    trainer = stage_partial(daemon.endpoint, 1)
    peer = RawPeer(daemon.daemon.assembly_endpoint)
    try:
        with Subscriber(daemon.endpoint) as sub, sub.latest(allow_partial=True) as snap:
            for rid in (1, 2):  # the first waits for its segment (created in the background); the second at once
                peer.send_frames(AssembleBegin(id=rid, step=1, lease=snap.lease, specs=SPECS).encode())
            replies = {r.id: r for r in (peer.recv(30.0), peer.recv(30.0))}
            assert isinstance(replies[2], AssembleReply) and replies[2].segment
            first = replies[1]  # superseded while it waited, or answered before the second arrived
            assert isinstance(first, AssembleReply) or first.code == ErrorCode.STEP_FAILED.value
            peer.send_frames(AssembleDone(id=3, step=1, segment=replies[2].segment, ok=False).encode())
            assert isinstance(peer.recv(10.0), Ok)
    finally:
        trainer.close()


# ------------------------------------------------------------------ the handlers alone, driven by hand
# A daemon's loop collects finished segments every few milliseconds, so which of its calls pools the
# assembly's segment is a race a real daemon cannot be made to lose on purpose; here the test is the
# loop: it decides what happens between the assemble_begin and the next housekeeping tick.


class Recorded:
    """An outbox that keeps what the handlers send (the socket's part: the daemon tests above)."""

    def __init__(self):
        self.sent = []

    def send(self, identity, msg):
        self.sent.append((identity, msg))
        return True

    def send_tracked(self, identity, msg):
        self.sent.append((identity, msg))
        return []


TOP_HALF = [PlanEntry("w", "f32", (4, 2), Box((0, 0), (2, 2)))]
LARGER = [*TOP_HALF, PlanEntry("v", "f32", (3 << 20,), Box((0,), (3 << 20,)))]  # 12 MiB of 16


def trainer_begin(node, rid: int, step: int, plan) -> None:
    """The trainer's Begin of ``step``, answered now or (its segment being created) at a later tick."""
    h = node.handlers
    reply = h.handle(b"trainer", Begin(id=rid, step=step, digest=plan_digest(plan), plan=tuple(plan), full_world=False))
    if reply is None:
        wait_until(lambda: h.collect_segments() or any(m.id == rid for _, m in node.trainer.sent))
        reply = next(m for _, m in node.trainer.sent if m.id == rid)
    assert isinstance(reply, BeginReply), reply


@pytest.fixture
def by_hand():
    """Handlers over a real budget (segments in /dev/shm, 16 MiB) holding a partial version of step 1,
    leased by a reader on this node, every segment of the trainer's rotation created and pooled."""
    serial = itertools.count(1)
    state = DaemonState(keep=2, step_timeout=60.0, peer_timeout=60.0, host_id=host_id(), session="byhand00")
    budget = SegmentBudget(16 << 20, Segment, lambda: segment_name(os.getpid(), state.session, next(serial)))
    trainer, assembler = Recorded(), Recorded()
    h = Handlers(state, budget, trainer, advertise="ipc:///tmp/byhand", loop_status=dict, assembly_outbox=assembler)
    node = SimpleNamespace(handlers=h, budget=budget, trainer=trainer, assembler=assembler)
    try:
        me = {"pid": os.getpid(), "start_time": process_start_time(os.getpid()), "host_id": state.host_id}
        h.handle(b"trainer", Hello(role="trainer", world_size=2, **me))
        trainer_begin(node, 1, 1, TOP_HALF)
        h.handle(b"trainer", Commit(id=2, step=1))
        assert state.sealed[1].layout.partial
        wait_until(lambda: h.collect_segments() or not budget.creating)  # the rotation: all pooled
        h.handle(b"reader", Hello(role="reader", **me))
        node.lease = h.handle(b"reader", Acquire(id=3, step=1)).lease
        yield node
    finally:
        h.close()
        budget.close()


def nothing(node):
    """The loop's own collect finds the segment."""


def a_trainer_begins_a_step(node):
    """Its Begin takes a pooled segment of the trainer's; take() collected first, pooling the assembly's."""
    trainer_begin(node, 11, 2, TOP_HALF)


def a_trainer_step_needs_the_memory(node):
    """A larger layout: take() pools the assembly's segment, then drops it to make room."""
    trainer_begin(node, 11, 2, LARGER)


@pytest.mark.fast
@pytest.mark.parametrize(
    "between, answer",
    [
        (nothing, "segment"),
        (a_trainer_begins_a_step, "segment"),
        (a_trainer_step_needs_the_memory, "no_memory"),
    ],
    ids=["nothing", "a trainer's begin pooled it", "a trainer's step took its memory"],
)
def test_a_begin_waiting_for_its_segment_is_answered_at_the_next_tick_whoever_collected_it(by_hand, between, answer):
    node, h = by_hand, by_hand.handlers
    specs = (("w", "f32", (4, 2)), ("big", "f32", (2 << 20,)))  # 8 MiB: created in the background
    assert h.handle_assembly(b"assembler", AssembleBegin(id=21, step=1, lease=node.lease, specs=specs)) is None
    wait_until(lambda: node.budget._done.qsize() > 0)  # created, and not collected by anyone yet
    between(node)
    # housekeeping ticks, as the loop runs them: before the fix, the second row's begin waited for
    # BEGIN_TIMEOUT_S (300 s) here, its segment pooled and the partial version leased all along
    wait_until(lambda: h.housekeep() or node.assembler.sent, timeout=10.0)
    [(identity, reply)] = node.assembler.sent
    assert identity == b"assembler" and isinstance(reply, AssembleReply) and reply.id == 21
    if answer == "segment":
        assert reply.segment and not reply.reason and reply.size >= 8 << 20
    else:
        assert reply.reason == "no_memory" and not reply.segment
