"""Wire format: malformed input is a typed error, never a crash (round trips: test_wire_golden.py)."""

import os
import pathlib
import re

import msgpack
import pytest
import torch

from stager.protocol import (
    DTYPES,
    PROTOCOL_VERSION,
    Commit,
    ErrorCode,
    ProtocolError,
    StagerError,
    decode,
    dtype_from_name,
    dtype_name,
)

pytestmark = pytest.mark.fast  # the fast tier: no daemon process, no torch.distributed job


def _header(**over):
    h = {"v": PROTOCOL_VERSION, "t": "acquire", "id": 1, "b": {"step": None}}
    h.update(over)
    return [msgpack.packb(h)]


CHANGES = {"lease": 1, "since": 1, "since_seq": 1, "dtype": "bf16", "want": "indices", "fqns": ["w"]}
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
    (
        _header(t="begin", b={"step": -1, "digest": "", "plan": None, "full_world": True, "shm": True, "wait_ms": 0}),
        ErrorCode.BAD_MESSAGE,
        "step must be >= 0",
    ),
    (
        _header(
            t="hello",
            b={
                "role": "root",
                "rank": 0,
                "local_world_size": 1,
                "world_size": 1,
                "pid": 1,
                "start_time": 0.0,
                "host_id": "",
            },
        ),
        ErrorCode.BAD_MESSAGE,
        "role must be",
    ),
    (
        _header(
            t="hello",
            b={
                "role": "trainer",
                "rank": 3,
                "local_world_size": 2,
                "world_size": 2,
                "pid": 1,
                "start_time": 0.0,
                "host_id": "",
            },
        ),
        ErrorCode.BAD_MESSAGE,
        "out of range",
    ),
    (_header(t="put", b={"step": 1, "regions": [0, 1]}), ErrorCode.BAD_MESSAGE, "one int region index per data frame"),
    (
        _header(t="changes", b={**CHANGES, "boxes": [[[[0], [1, 2]]]]}),
        ErrorCode.BAD_MESSAGE,
        "boxes must be empty or one entry per tensor",
    ),
    (_header(t="changes", b={**CHANGES, "boxes": [[], []]}), ErrorCode.BAD_MESSAGE, "boxes must be empty"),
    (_header(t="changes", b={**CHANGES, "sums": [[1 << 32]]}), ErrorCode.BAD_MESSAGE, "sums must be empty"),
    (_header(t="changes", b={**CHANGES, "sums": ["ab"]}), ErrorCode.BAD_MESSAGE, "sums must be empty"),
    (_header(t="changes", b={**CHANGES, "fqns": ["w"] * 3}), ErrorCode.BAD_MESSAGE, "names a tensor twice"),
    (
        _header(t="changes", b={**CHANGES, "fqns": [f"t{i}" for i in range(17)], "boxes": [[[[0], [1]]] * 1024] * 17}),
        ErrorCode.BAD_MESSAGE,
        "boxes in all",
    ),
    (
        _header(
            t="hello",
            b={
                "role": "trainer",
                "rank": 0,
                "local_world_size": 10**9,
                "world_size": 10**9,
                "pid": 1,
                "start_time": 0.0,
                "host_id": "",
            },
        ),
        ErrorCode.BAD_MESSAGE,
        "ranks per node",
    ),
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
    for dt in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int64,
        torch.int32,
        torch.int8,
        torch.uint8,
        torch.bool,
    ):
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
    """No pickle on the wire, not even as a fallback. The one module that unpickles is the restricted
    reader of DCP's on-disk ``.metadata`` (torch writes it with pickle): its Unpickler admits only
    DCP's metadata classes (find_class), and it never touches a socket."""
    root = pathlib.Path(__file__).resolve().parents[1]
    pattern = re.compile(r"\bimport pickle\b|\bcloudpickle\b|send_pyobj|recv_pyobj|torch\.load\(")
    restricted = root / "stager" / "formats" / "safe_dcp.py"
    offenders = [
        str(p)
        for d in ("stager", "client", "protocol")
        for p in (root / d).rglob("*.py")
        if pattern.search(p.read_text()) and p != restricted
    ]
    assert offenders == []
    text = restricted.read_text()
    assert "def find_class(" in text and "zmq" not in text and "pickle.load(" not in text


def _deep(depth):
    value = 1
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize(
    "info,text",
    [
        (["adapter"], "field 'model_info' must be dict"),
        ({"adapter": ["x"]}, "'adapter' must be a string"),
        ({"adapter": "a" * 500}, "'adapter' must be a string"),
        ({"hf_config": "/etc/passwd"}, "never a path"),
        ({"hf_config": [1, 2]}, "'hf_config' must be a dict"),
        ({"hf_config": _deep(12)}, "nested deeper"),
        ({"blob": "x" * (70 << 10)}, "bytes encoded"),
        ({1: "x"}, "str keys"),
    ],
)
def test_model_info_is_validated_on_both_sides(info, text):
    header = {
        "v": PROTOCOL_VERSION,
        "t": "commit",
        "id": 9,
        "b": {"step": 1, "objects": {}, "model_info": info, "quant": {}},
    }
    with pytest.raises(ProtocolError) as info_:
        decode([msgpack.packb(header)])
    assert text in info_.value.message and info_.value.request_id == 9
    if isinstance(info, dict):  # a rank cannot even send it
        with pytest.raises(ProtocolError, match="model_info"):
            Commit(step=1, model_info=info).encode()


@pytest.mark.parametrize(
    "header",
    [
        {"v": PROTOCOL_VERSION, "t": ["begin"], "id": 3, "b": {}},  # unhashable type header
        {"v": [1], "t": "begin", "id": 3, "b": {}},
        {
            "v": PROTOCOL_VERSION,
            "t": "commit",
            "id": 3,
            "b": {
                "step": 1,
                "objects": {},
                "model_info": None,
                "quant": {"w": {"scale": "s", "mode": ["mul"], "dtype": "bf16"}},
            },
        },
        {
            "v": PROTOCOL_VERSION,
            "t": "commit",
            "id": 3,
            "b": {
                "step": 1,
                "objects": {},
                "model_info": None,
                "quant": {"w": {"scale": "s", "mode": "mul", "dtype": [1]}},
            },
        },
        {"v": PROTOCOL_VERSION, "t": "read", "id": 3, "b": {"lease": 1, "items": [_deep(40)]}},
        {
            "v": PROTOCOL_VERSION,
            "t": "commit",
            "id": 3,
            "b": {"step": 1, "objects": _deep(30), "model_info": None, "quant": {}},
        },
    ],
)
def test_hostile_headers_are_typed_errors_with_their_request_id(header):
    with pytest.raises(ProtocolError) as info:
        decode([msgpack.packb(header)])
    assert info.value.request_id == 3 and len(info.value.message) < 2000


def test_repeated_log_lines_are_rate_limited():
    import logging

    from stager.protocol.logs import RateLimit

    now = [0.0]
    limit = RateLimit(burst=2, window=10.0, clock=lambda: now[0])

    def record(msg="segment %s failed"):
        return logging.LogRecord("stager.daemon", logging.WARNING, __file__, 1, msg, ("x",), None)

    passed = [limit.filter(record()) for _ in range(50)]
    assert passed == [True, True] + [False] * 48
    assert limit.filter(record("another message %s"))  # each template has its own budget
    now[0] = 11.0
    summary = record()
    assert limit.filter(summary) and "48 more like it" in summary.getMessage()


def test_a_link_planted_at_a_segment_name_is_never_followed(tmp_path):
    from stager.loaders.ingest import SegmentFile
    from stager.protocol.shm import map_segment, segment_name, segment_path

    victim = tmp_path / "victim"
    victim.write_bytes(b"\0" * 4096)
    name = segment_name(os.getpid(), "linktest", 1)
    os.symlink(victim, segment_path(name))
    try:
        for writable in (False, True):
            with pytest.raises(OSError):
                map_segment(name, 4096, writable=writable)
        with pytest.raises(StagerError, match="cannot be opened"):
            SegmentFile(name, 4096)
    finally:
        os.unlink(segment_path(name))
    assert victim.read_bytes() == b"\0" * 4096


def test_optional_fields_are_left_out_while_empty_and_default_when_absent():
    """Fields added after a message shipped (Changes' boxes and sums): an older peer's message,
    without them, parses; a message not using them encodes as before (the golden bytes); one using
    them round-trips."""
    from stager.protocol import Changes

    old = decode([msgpack.packb({"v": PROTOCOL_VERSION, "t": "changes", "id": 3, "b": CHANGES})])
    assert isinstance(old, Changes) and old.boxes == [] and old.sums == []
    assert "boxes" not in Changes(fqns=["w"]).body() and "sums" not in Changes(fqns=["w"]).body()
    new = Changes(lease=1, since=1, fqns=["w", "v"], boxes=[[[[0, 4], [2, 4]]], []], sums=[[7, 9], None])
    back = decode(new.encode())
    assert (back.boxes, back.sums) == (new.boxes, new.sums)


def test_changes_reply_says_when_it_checked_the_sums():
    """``checked``: optional, left out while false (a reply to a request without sums encodes as
    before), false when absent (an older daemon's reply), true round-trips."""
    from stager.protocol import ChangesReply

    assert "checked" not in ChangesReply(step=2, tensors=[["w", "unchanged", 0]]).body()
    old = decode(
        [
            msgpack.packb(
                {
                    "v": PROTOCOL_VERSION,
                    "t": "changes_reply",
                    "id": 3,
                    "b": {"step": 2, "since": 1, "dtype": "bf16", "tensors": []},
                }
            )
        ]
    )
    assert isinstance(old, ChangesReply) and old.checked is False
    assert decode(ChangesReply(step=2, checked=True).encode()).checked is True
