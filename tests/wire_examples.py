"""One example of every message type, shared by the round-trip and golden-bytes tests."""

from stager.protocol import (
    Abort,
    Acquire,
    AcquireReply,
    Announce,
    Begin,
    BeginReply,
    Bye,
    Changes,
    ChangesReply,
    Commit,
    ErrorReply,
    Hello,
    HelloReply,
    Ok,
    Ping,
    Pong,
    Put,
    Read,
    ReadItem,
    ReadReply,
    Release,
    Sealed,
    Status,
    StatusReply,
    Subscribe,
    SubscribeReply,
)
from stager.protocol.assembly import AssembleBegin, AssembleDone, AssembleReply
from stager.protocol.job import JobInfo, JobInfoReply, Join
from stager.protocol.layout import Placement, layouts_from_wire, plan_from_wire
from stager.protocol.nixl import NixlInfo, NixlInfoReply
from stager.protocol.quant import QuantSpec

PLAN = plan_from_wire([["w", "f32", [4, 2], [2, 0], [2, 2]], ["s", "f8e4m3", [4], [0], [4]]])
TENSORS = layouts_from_wire([["w", "f32", [4, 2], [[0, [0, 0], [4, 2]]]], ["s", "f32", [1], [[64, [0], [1]]]]])
QUANT = {"w8": QuantSpec("w8:scale", "div", "bf16")}

EXAMPLES = [
    Hello(role="trainer", rank=1, local_world_size=2, world_size=4, pid=10, start_time=1.5, host_id="h:boot"),
    Begin(step=3, digest="abc", plan=PLAN, full_world=False, shm=True, wait_ms=5),
    Put(step=1, regions=[0, 1], frames=[b"\x00" * 8, b"\x01" * 4]),
    Commit(
        step=2, objects={"train.step": 2, "b": [1.5, "x", None, b"raw"]}, model_info={"adapter": "llama3"}, quant=QUANT
    ),
    Abort(step=2, reason="copy failed"),
    Bye(),
    Status(),
    Ping(),
    Acquire(step=7),
    Release(lease=3),
    Subscribe(),
    Read(lease=3, items=(ReadItem("w"), ReadItem("w", (1, 0), (2, 2)))),
    HelloReply(session="s1", host_id="h:boot", daemon_pid=1),
    BeginReply(
        step=1,
        segment="stager-0-1-s1",
        size=128,
        layout="L1",
        assignment=(None, Placement(0, (4, 2), (2, 0))),
        live_segments=["stager-0-1-s1"],
    ),
    Sealed(step=1, nbytes=36, tensors=2, partial=False),
    Ok(),
    StatusReply(status={"pid": 1, "versions": []}),
    Pong(session="s1"),
    ErrorReply(code="bad_plan", message="m"),
    AcquireReply(
        lease=1,
        step=1,
        seq=4,
        segment="stager-0-1-s1",
        size=128,
        tensors=TENSORS,
        objects={"train.step": 1},
        model_info=None,
        quant=QUANT,
        partial=False,
    ),
    SubscribeReply(step=None, seq=0),
    Announce(step=5, seq=6, tensors=2, nbytes=36, model_info={"adapter": "identity"}, partial=False),
    ReadReply(count=1, frames=[b"\x02" * 8]),
    Changes(lease=3, since=5, since_seq=6, dtype="bf16", want="values", fqns=["w"]),
    ChangesReply(
        step=7,
        since=5,
        dtype="bf16",
        tensors=[["w", "indices", 2], ["b", "unchanged", 0]],
        frames=[b"\x01\x00\x00\x00\x03\x00\x00\x00", b"\x80\x3f\x00\x40"],
    ),
    Join(
        job="j1",
        node="a",
        nodes={"a": "ipc:///a.sock", "b": "tcp://b:7555"},
        ranks={"a": [0, 1], "b": [2, 3]},
        world_size=4,
    ),
    JobInfo(members=False),
    JobInfoReply(
        job="j1",
        node="a",
        endpoint="ipc:///a.sock",
        nodes={"a": "ipc:///a.sock", "b": "tcp://b:7555"},
        sealed=[3, 4],
        staging=[5],
        failed=[2],
    ),
    AssembleBegin(step=4, lease=9, specs=(("w", "f32", (4, 2)), ("s", "f8e4m3", ()))),
    AssembleReply(step=4, segment="stager-0-1-s1", size=128, offsets=(("w", 0), ("s", 64))),
    AssembleDone(step=4, segment="stager-0-1-s1", ok=True, reason=""),
    NixlInfo(lease=3),
    NixlInfoReply(agent="a", metadata=b"xy", addr=4096, size=128, device=0),
]
