"""Wire format: every message round-trips; malformed input is a typed error, never a crash."""

import pathlib
import re

import msgpack
import pytest
import torch

from stager.protocol import (
    DTYPES, PROTOCOL_VERSION, Abort, Acquire, AcquireReply, Begin, BeginReply, Commit, ErrorCode, ErrorReply,
    Hello, HelloReply, Ok, Ping, Pong, ProtocolError, Put, Release, Sealed, Status, StatusReply, decode,
    dtype_from_name, dtype_name,
)

MESSAGES = [
    Hello(role="trainer", rank=1, local_world_size=2, world_size=4, pid=10, start_time=1.5, host_id="h"),
    Begin(step=3, digest="abc", plan=[["w", "f32", [4], [0], [4]]], full_world=False, shm=True, wait_ms=5),
    Begin(step=3, digest="abc", plan=None),
    Put(step=1, regions=[0, 2], frames=[b"\x00" * 8, b"\x01" * 4]),
    Commit(step=2, objects={"a": 1, "b": [1.5, "x", None, b"raw"]}, model_info={"adapter": "llama3"}),
    Abort(step=2, reason="copy failed"),
    Acquire(step=None), Acquire(step=7), Release(lease=3), Status(), Ping(),
    HelloReply(session="s", host_id="h", daemon_pid=1),
    BeginReply(step=1, segment="stager-0-1-1", size=64, layout="L1", assignment=[None, [0, [4], [0]]],
               live_segments=["stager-0-1-1"]),
    Sealed(step=1, nbytes=10, tensors=2, partial=False),
    AcquireReply(lease=1, step=1, segment="x", size=64, tensors=[["w", "f32", [4], [[0, [0], [4]]]]],
                 objects={}, model_info=None, partial=False),
    Ok(), StatusReply(status={"pid": 1}), Pong(session="s"), ErrorReply(code="bad_plan", message="m"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    msg.id = 42
    frames = msg.encode()
    back = decode(frames)
    assert type(back) is type(msg) and back.id == 42
    assert back.body() == msg.body()
    assert [bytes(f) for f in back.frames] == [bytes(f) for f in msg.frames]


def _header(**over):
    h = {"v": PROTOCOL_VERSION, "t": "acquire", "id": 1, "b": {"step": None}}
    h.update(over)
    return [msgpack.packb(h)]


BAD = [
    ([], ErrorCode.BAD_MESSAGE, "empty"),
    ([b"\xc1garbage"], ErrorCode.BAD_MESSAGE, "not valid msgpack"),
    ([msgpack.packb([1, 2])], ErrorCode.BAD_MESSAGE, "must be a msgpack map"),
    (_header(v=99), ErrorCode.UNSUPPORTED_VERSION, "version 99"),
    (_header(v=None), ErrorCode.UNSUPPORTED_VERSION, "version None"),
    (_header(t="nope"), ErrorCode.UNKNOWN_TYPE, "unknown message type"),
    (_header(id="x"), ErrorCode.BAD_MESSAGE, "int 'id'"),
    (_header(b=[]), ErrorCode.BAD_MESSAGE, "map 'b'"),
    (_header(b={}), ErrorCode.BAD_MESSAGE, "missing field 'step'"),
    (_header(b={"step": "1"}), ErrorCode.BAD_MESSAGE, "field 'step' must be int"),
    (_header(b={"step": True}), ErrorCode.BAD_MESSAGE, "field 'step' must be int"),
    (_header(t="begin", b={"step": -1, "digest": "", "plan": None, "full_world": True, "shm": True, "wait_ms": 0}),
     ErrorCode.BAD_MESSAGE, "step must be >= 0"),
    (_header(t="hello", b={"role": "root", "rank": 0, "local_world_size": 1, "world_size": 1, "pid": 1,
                           "start_time": 0.0, "host_id": ""}), ErrorCode.BAD_MESSAGE, "role must be"),
    (_header(t="hello", b={"role": "trainer", "rank": 3, "local_world_size": 2, "world_size": 2, "pid": 1,
                           "start_time": 0.0, "host_id": ""}), ErrorCode.BAD_MESSAGE, "out of range"),
    (_header(t="put", b={"step": 1, "regions": [0, 1]}), ErrorCode.BAD_MESSAGE, "one int region index per data frame"),
    (_header(t="hello", b={"role": "trainer", "rank": 0, "local_world_size": 10**9, "world_size": 10**9, "pid": 1,
                           "start_time": 0.0, "host_id": ""}), ErrorCode.BAD_MESSAGE, "ranks per node"),
]


@pytest.mark.parametrize("frames,code,text", BAD, ids=[b[2] for b in BAD])
def test_malformed_is_typed_error(frames, code, text):
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.code == code
    assert text in info.value.message
    if len(frames) == 1 and frames[0][:1] != b"\xc1":  # any readable int id travels with the error
        header = msgpack.unpackb(frames[0]) if isinstance(msgpack.unpackb(frames[0]), dict) else {}
        if isinstance(header.get("id"), int):
            assert info.value.request_id == header["id"]


def test_dtype_table_is_closed_and_covers_training_dtypes():
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn,
               torch.float8_e5m2, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool):
        assert dtype_from_name(dtype_name(dt)) is dt
    with pytest.raises(ProtocolError) as info:
        dtype_from_name("torch.float32")
    assert info.value.code == ErrorCode.BAD_DTYPE
    with pytest.raises(ProtocolError):
        dtype_name(torch.qint8)
    assert len(set(DTYPES.values())) == len(DTYPES)


def test_unencodable_value_is_typed_error():
    with pytest.raises(ProtocolError) as info:
        Commit(step=1, objects={"x": object()}).encode()
    assert info.value.code == ErrorCode.BAD_VALUE


def test_no_pickle_in_the_code():
    root = pathlib.Path(__file__).resolve().parents[1]
    pattern = re.compile(r"\bimport pickle\b|\bcloudpickle\b|send_pyobj|recv_pyobj|torch\.load\(")
    offenders = [str(p) for d in ("stager", "client", "protocol") for p in (root / d).rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []
