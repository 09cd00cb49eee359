"""Remote reads in the reader's dtype: the daemon casts before the wire (issue 25, item 5).

A reader on another host (``remote=True`` here, or a node of a two-node job) that asks for bf16 or
fp16 from an fp32 version receives bf16/fp16 bytes, bit-identical to reading fp32 and casting
locally (round to nearest even, NaN, inf, denormals, -0.0 included); the daemon's ``read_bytes``
counter shows the bytes that crossed. Same-host readers still map the segment.
"""

import time

import pytest
import torch
import zmq

from conftest import RawPeer
from dist_jobs import LLAMA_CONFIG, llama_full, stage_fsdp_llama
from helpers import ONE_LAYER_LLAMA, wait_until
from stager.client import StagingClient, Subscriber
from stager.client.adapters import load_adapter
from stager.client.admin import daemon_status
from stager.client.readers import sources
from stager.daemon import read_cast, reading
from stager.dev.launch import SimulatedCluster, run_ranks
from stager.protocol import (
    Acquire,
    ErrorCode,
    ErrorReply,
    ProtocolError,
    Read,
    ReadItem,
    ReadReply,
    decode,
)

CONFIG = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
INFO = {"adapter": "llama3", "hf_config": CONFIG}
NARROW = [torch.bfloat16, torch.float16]
MIB = 1 << 20


def awkward(shape, seed, dtype=torch.float32) -> torch.Tensor:
    """Random values over many binades, with what rounding gets wrong first: NaN, +-inf, -0.0,
    denormals, exact ties between two bf16/fp16 neighbours, values past fp16's range."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-140, 100, shape, generator=g).double()
    )
    flat = t.view(-1)
    specials = [
        float("nan"),
        float("inf"),
        float("-inf"),
        -0.0,
        0.0,
        1e-40,
        -3e-45,
        1.0 + 2**-8,
        1.0 + 3 * 2**-8,
        2049.0,
        65520.0,
        70000.0,
        -1e5,
        6e-8,
        2.0**-24 * 1.5,
    ]
    flat[: len(specials)] = torch.tensor(specials, dtype=torch.float64)
    return t.to(dtype)


def native_sd(step: int) -> dict:
    return {
        "a": awkward((64, 48), step),
        "b": awkward((301,), step + 1),
        "c.weight": awkward((17, 5, 6), step + 2),
        "d64": awkward((40, 8), step + 3, torch.float64),
        "ints": torch.arange(12).view(3, 4),
        "half": torch.randn(8, 8).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
    }


def llama_sd(step: int) -> dict:
    shapes = ONE_LAYER_LLAMA
    return {k: awkward(s, step * 31 + i) for i, (k, s) in enumerate(shapes.items())}


def stage(endpoint, sd, step=1, info=None):
    with StagingClient(endpoint, strict=True) as c:
        c.stage(sd, step=step, model_info=info).wait(30)


def cast(t: torch.Tensor, dtype) -> torch.Tensor:
    """What a reader casting locally gets (the subscriber's rule: floating tensors only)."""
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or bytes(a.contiguous().view(torch.uint8).view(-1).numpy()) == bytes(
        b.contiguous().view(torch.uint8).view(-1).numpy()
    )


def wire_bytes(tensors, dtype) -> int:
    """Bytes a remote read of ``tensors`` should move: narrowed floats in ``dtype``, the rest as staged."""
    return sum(
        t.numel() * (dtype.itemsize if t.dtype in (torch.float32, torch.float64) else t.element_size()) for t in tensors
    )


def served(endpoints) -> int:
    return sum(daemon_status(e)["counters"]["read_bytes"] for e in endpoints)


# ------------------------------------------------------------------------------ protocol


def test_read_item_dtype_is_a_fourth_element_only_when_given():
    assert ReadItem("w").to_wire() == ["w", None, None]  # the encoding every earlier read used
    assert ReadItem("w", (1, 0), (2, 2), "bf16").to_wire() == ["w", [1, 0], [2, 2], "bf16"]
    msg = Read(id=42, lease=3, items=(ReadItem("w", dtype="f16"), ReadItem("w", (1, 0), (2, 2))))
    assert bytes(msg.encode()[0]).hex() == (  # pinned: the wire form of a cast read
        "84a17601a174a472656164a269642aa16282a56c6561736503a56974656d739294a177c0c0a366313693a177920100920202"
    )
    back = decode(msg.encode())
    assert back.items == msg.items and back.items[0].dtype == "f16" and back.items[1].dtype is None
    for bad, code in (
        (["w", None, None, "float32"], ErrorCode.BAD_DTYPE),
        (["w", None, None, 7], ErrorCode.BAD_DTYPE),
        (["w", None, None, "bf16", 1], ErrorCode.BAD_MESSAGE),
    ):
        with pytest.raises(ProtocolError) as info:
            ReadItem.from_wire(bad)
        assert info.value.code == code


def test_the_daemon_refuses_casts_it_cannot_make_exactly_and_keeps_serving(make_daemon):
    d = make_daemon()
    sd = native_sd(1)
    stage(d.endpoint, sd)
    peer = RawPeer(d.endpoint)
    try:
        peer.hello(role="reader")
        lease = peer.request(Acquire()).lease
        for fqn, dtype in (
            ("ints", "bf16"),
            ("half", "f32"),
            ("a", "f32"),
            ("a", "f8e4m3"),
            ("b", "i32"),
            ("half", "f16"),
        ):
            reply = peer.request(Read(lease=lease, items=(ReadItem(fqn, dtype=dtype),)))
            assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.BAD_VALUE.value, (fqn, dtype)
            assert "cast it yourself" in reply.message
        reply = peer.request_raw("read", {"lease": lease, "items": [["a", None, None, "bfloat16"]]})
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.BAD_DTYPE.value
        reply = peer.request(Read(lease=lease, items=(ReadItem("a", (1, 2), (3, 4), "bf16"), ReadItem("b"))))
        assert isinstance(reply, ReadReply) and reply.count == 2
        got = torch.frombuffer(bytearray(reply.frames[0]), dtype=torch.bfloat16).view(3, 4)
        assert same(got, sd["a"][1:4, 2:6].to(torch.bfloat16))
        assert len(reply.frames[1]) == sd["b"].numel() * 4
    finally:
        peer.close()
    counters = d.status()["counters"]
    assert counters["read_cast_bytes"] == 3 * 4 * 2


# ------------------------------------------------------------------------------ one daemon, remote=True


@pytest.mark.parametrize("dtype", NARROW, ids=["bf16", "fp16"])
def test_remote_native_reads_come_cast_by_the_daemon_bit_exact(make_daemon, dtype, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 2048)  # several row-range requests per tensor
    d = make_daemon()
    sd = native_sd(1)
    stage(d.endpoint, sd)
    expected = {k: cast(v, dtype) for k, v in sd.items()}
    with Subscriber(d.endpoint, dtype=dtype, remote=True) as sub:
        with sub.latest() as snap:
            before = served([d.endpoint])
            got = dict(snap.items())
            assert served([d.endpoint]) - before == wire_bytes(sd.values(), dtype)
            assert sorted(got) == sorted(expected) and all(same(got[k], v) for k, v in expected.items())
            before = served([d.endpoint])
            assert same(snap["a"], expected["a"]) and same(snap["d64"], expected["d64"])
            part = snap.get("c.weight", shard=(0, 1, 3))
            assert same(part, torch.chunk(expected["c.weight"], 3, 0)[1])
            assert served([d.endpoint]) - before == wire_bytes(
                [sd["a"], sd["d64"], torch.chunk(sd["c.weight"], 3)[1]], dtype
            )
            # load_into: destinations in the reader's dtype get its bytes; wider ones get the staged bytes
            dst = {k: torch.full_like(v, 3) for k, v in expected.items()}
            dst["b"] = torch.zeros(301, dtype=torch.float64)
            before = served([d.endpoint])
            assert sorted(snap.load_into(dst)) == sorted(dst)
            assert all(same(dst[k], v) for k, v in expected.items() if k != "b")
            assert same(dst["b"], sd["b"].double())
            assert served([d.endpoint]) - before == wire_bytes([v for k, v in sd.items() if k != "b"], dtype) + 301 * 4
        before = served([d.endpoint])
        many = sub.get_many(["a", "ints"])
        assert same(many["a"], expected["a"]) and same(many["ints"], sd["ints"])
        assert served([d.endpoint]) - before == wire_bytes([sd["a"], sd["ints"]], dtype)


def test_remote_hf_view_reads_move_bf16_bytes_through_the_adapter(make_daemon, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 1024)
    d = make_daemon()
    sd = llama_sd(1)
    stage(d.endpoint, sd, info=INFO)
    hf = load_adapter("llama3", CONFIG).to_hf(sd)
    expected = {k: v.to(torch.bfloat16) for k, v in hf.items()}  # what a reader casting locally gets
    total = wire_bytes(sd.values(), torch.bfloat16)
    with Subscriber(d.endpoint, view="hf", dtype=torch.bfloat16, remote=True) as sub, sub.latest() as snap:
        before = served([d.endpoint])
        got = dict(snap.items())
        assert served([d.endpoint]) - before == total  # half of the fp32 bytes
        assert list(got) == list(expected) and all(same(got[k], v) for k, v in expected.items())
        q = "model.layers.0.self_attn.q_proj.weight"  # rotary-permuted: a permutation commutes with the cast
        assert same(snap[q], expected[q])
        down = "model.layers.0.mlp.down_proj.weight"  # a rename: a slice moves only its bf16 rows
        before = served([d.endpoint])
        assert same(snap.get(down, shard=(0, 1, 4)), expected[down][8:16])
        assert served([d.endpoint]) - before == 8 * 48 * 2
        engine = {k: torch.zeros_like(v) for k, v in expected.items()}
        before = served([d.endpoint])
        assert snap.load_into(engine) == list(expected)
        assert served([d.endpoint]) - before == total
        assert all(same(engine[k], v) for k, v in expected.items())


def test_same_host_reads_still_map_the_segment(make_daemon):
    d = make_daemon()
    sd = native_sd(1)
    stage(d.endpoint, sd)
    before = served([d.endpoint])
    with Subscriber(d.endpoint, dtype=torch.bfloat16) as sub, sub.latest() as snap:
        assert all(same(t, cast(sd[k], torch.bfloat16)) for k, t in snap.items())
        assert snap.is_zero_copy(snap["ints"])
    assert served([d.endpoint]) == before


def test_float8_data_is_read_as_staged_and_dequantized_at_full_precision(make_daemon):
    d = make_daemon()
    data = torch.randn(300, 200).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2) + 0.5
    plain = awkward((10, 10), 5)
    stage(d.endpoint, {"e.weight": data, "e.weight_scale_inv": scale, "plain": plain})
    with Subscriber(d.endpoint, dtype=torch.bfloat16) as sub, sub.latest() as snap:
        local = {k: v.clone() for k, v in snap.items()}
    with Subscriber(d.endpoint, dtype=torch.bfloat16, remote=True) as sub, sub.latest() as snap:
        before = served([d.endpoint])
        got = dict(snap.items())
        # the e4m3 bytes and their fp32 scales as staged; only the plain fp32 tensor narrowed
        assert served([d.endpoint]) - before == 300 * 200 + 6 * 4 + 100 * 2
    assert sorted(got) == sorted(local) and all(same(got[k], v) for k, v in local.items())


class Thirds:
    """A plug-in per-tensor adapter that computes (divides by 3): a cast before it would round twice."""

    def to_hf_items(self, name, tensor):
        return [("hf." + name, tensor / 3)]

    def to_hf(self, state_dict):
        return dict(kv for k, v in state_dict.items() for kv in self.to_hf_items(k, v))

    def from_hf(self, hf_state_dict):
        return {k[3:]: v * 3 for k, v in hf_state_dict.items()}


def test_a_plug_in_adapter_gets_the_staged_bytes_its_arithmetic_needs(make_daemon):
    d = make_daemon()
    sd = {"a": awkward((64, 48), 3), "b": awkward((301,), 4)}
    stage(d.endpoint, sd)
    expected = {"hf." + k: (v / 3).to(torch.bfloat16) for k, v in sd.items()}
    with (
        Subscriber(d.endpoint, view="hf", adapter=Thirds(), dtype=torch.bfloat16, remote=True) as sub,
        sub.latest() as snap,
    ):
        before = served([d.endpoint])
        got = dict(snap.items())
        assert served([d.endpoint]) - before == wire_bytes(sd.values(), torch.float32)  # fp32, as staged
        engine = {k: torch.zeros_like(v) for k, v in expected.items()}
        snap.load_into(engine)
    assert all(same(got[k], v) and same(engine[k], v) for k, v in expected.items())


# ------------------------------------------------------------------------------ two nodes


def test_a_reader_of_a_two_node_job_gets_each_nodes_bytes_in_its_dtype(monkeypatch):
    hf = load_adapter("llama3", LLAMA_CONFIG).to_hf(llama_full(3))
    with SimulatedCluster(2, args=("--memory-limit", "64MiB")) as cluster:
        run_ranks(stage_fsdp_llama, 2, [3], nodes=cluster.nodes)  # each node holds half of every tensor's rows
        endpoints = cluster.endpoints
        for dtype in NARROW:
            expected = {k: v.to(dtype) for k, v in hf.items()}
            with Subscriber(endpoints[1], view="hf", dtype=dtype) as sub, sub.latest() as snap:
                before = served(endpoints)  # this process is on neither node: every byte comes as frames
                got = dict(snap.items())
                assert served(endpoints) - before == wire_bytes(llama_full(3).values(), dtype)
                assert list(got) == list(expected) and all(same(got[k], v) for k, v in expected.items())
                engine = {k: torch.zeros_like(v) for k, v in expected.items()}
                snap.load_into(engine)
                assert all(same(engine[k], v) for k, v in expected.items())
                k = "model.layers.1.mlp.up_proj.weight"
                assert same(snap.get(k, shard=(1, 0, 2)), torch.chunk(expected[k], 2, 1)[0])
            with Subscriber(endpoints[0], dtype=dtype) as sub:
                got = sub.get_many(["tok_embeddings.weight", "norm.weight"])
            assert same(got["tok_embeddings.weight"], llama_full(3)["tok_embeddings.weight"].to(dtype))
        monkeypatch.setenv("STAGER_HOST_ID", "node-0")  # beside node-0: its half mapped, node-1's half as frames
        with Subscriber(endpoints[0], view="hf", dtype=torch.bfloat16) as sub, sub.latest() as snap:
            before = daemon_status(endpoints[0])["counters"]["read_bytes"]
            got = dict(snap.items())
            assert daemon_status(endpoints[0])["counters"]["read_bytes"] == before
            assert all(same(got[k], v.to(torch.bfloat16)) for k, v in hf.items())


def test_cast_replies_count_as_bytes_in_flight_and_their_buffers_are_reused_then_freed(
    make_daemon, raw_peer, monkeypatch
):
    monkeypatch.setattr(reading, "MAX_READ_IN_FLIGHT", 32 * MIB)
    monkeypatch.setattr(read_cast, "IDLE_S", 0.5)
    d = make_daemon(memory_limit=128 * MIB)
    n = 32 * MIB // 4
    w = torch.arange(n, dtype=torch.float32)
    stage(d.endpoint, {"w": w})
    peer = raw_peer(d.endpoint)
    peer.sock.setsockopt(zmq.RCVHWM, 1)  # its queue fills after one reply: the rest wait in the daemon
    peer.sock.setsockopt(zmq.RCVBUF, 64 << 10)
    peer.hello(role="reader")
    lease = peer.request(Acquire()).lease
    for i in range(8):  # 16 MiB of bf16 each, the reader reads none of them yet
        peer.sock.send_multipart(Read(id=100 + i, lease=lease, items=(ReadItem("w", dtype="bf16"),)).encode())
    status = wait_until(lambda: (s := d.status())["reads"]["deferred"] and s)
    assert status["reads"]["bytes_in_flight"] <= 32 * MIB  # two replies queued, the other reads wait
    assert status["reads"]["cast_buffers"] <= 32 * MIB  # a buffer per reply queued, none per read waiting
    expected = w.to(torch.bfloat16)
    for i in range(8):  # reading the replies lets the held-back reads through, in order, their buffers reused
        reply = peer.recv(timeout=30)
        assert reply.id == 100 + i and same(
            torch.frombuffer(bytearray(reply.frames[0]), dtype=torch.bfloat16), expected
        )
        assert d.status()["reads"]["cast_buffers"] <= 48 * MIB
    assert d.status()["counters"]["read_cast_bytes"] == 8 * n * 2
    wait_until(lambda: d.status()["reads"] == {"bytes_in_flight": 0, "deferred": 0, "cast_buffers": 0}, timeout=30)


def test_remote_readers_casting_at_once_stay_within_read_cast_memory_in_turn(make_daemon, raw_peer):
    d = make_daemon(memory_limit=128 * MIB)  # --read-cast-memory by default: 1/8 of it, at least 64 MiB
    limit = 64 * MIB
    n = 32 * MIB // 4
    w = torch.arange(n, dtype=torch.float32) * 0.3
    stage(d.endpoint, {"w": w})
    readers, reads = [], 5
    for _ in range(4):  # 16 MiB of bf16 per read, none received yet: 320 MiB of replies asked for at once
        peer = raw_peer(d.endpoint)
        peer.sock.setsockopt(zmq.RCVHWM, 1)  # its replies stay in the daemon (buffers in flight) until read
        peer.sock.setsockopt(zmq.RCVBUF, 64 << 10)
        peer.hello(role="reader")
        lease = peer.request(Acquire()).lease
        for i in range(reads):
            peer.sock.send_multipart(Read(id=500 + i, lease=lease, items=(ReadItem("w", dtype="bf16"),)).encode())
        readers.append(peer)
    # every read answered or held back (each reader's own 80 MiB are far below its 512 MiB in flight)
    status = wait_until(
        lambda: (s := d.status())["counters"]["read_cast_bytes"] // (n * 2) + s["reads"]["deferred"] == 4 * reads and s
    )
    assert status["reads"]["cast_buffers"] <= limit, status["reads"]  # unbounded, nearly all 320 MiB were held
    assert status["reads"]["deferred"] > 0 and status["counters"]["read_cast_waits"] > 0  # later ones queue behind
    expected = w.to(torch.bfloat16)
    # receiving replies frees their buffers and the waiting reads go, in turn. Every reader receives at once, as
    # readers do: which reader's replies hold the buffers depends on the order the daemon took the reads
    got = {id(peer): 0 for peer in readers}
    deadline = time.monotonic() + 120
    while min(got.values()) < reads:
        assert time.monotonic() < deadline, f"replies received per reader: {list(got.values())} of {reads}"
        for peer in readers:
            if got[id(peer)] < reads and peer.sock.poll(10):
                reply = peer.recv(timeout=30)
                assert reply.id == 500 + got[id(peer)] and same(
                    torch.frombuffer(bytearray(reply.frames[0]), dtype=torch.bfloat16), expected
                )
                got[id(peer)] += 1
        assert d.status()["reads"]["cast_buffers"] <= limit
    assert d.status()["counters"]["read_cast_bytes"] == 4 * reads * n * 2


def test_a_reader_that_stops_receiving_keeps_only_its_share_of_read_cast_memory(make_daemon, raw_peer):
    d = make_daemon(memory_limit=128 * MIB)  # --read-cast-memory 64 MiB
    n = 32 * MIB // 4
    w = torch.arange(n, dtype=torch.float32) * 0.7
    stage(d.endpoint, {"w": w})
    stalled = raw_peer(d.endpoint)
    stalled.sock.setsockopt(zmq.RCVHWM, 1)  # its replies stay in the daemon (cast buffers in flight): never read
    stalled.sock.setsockopt(zmq.RCVBUF, 64 << 10)
    stalled.hello(role="reader")
    lease = stalled.request(Acquire()).lease
    for i in range(8):  # 16 MiB of bf16 each, far below its 512 MiB of replies in flight
        stalled.sock.send_multipart(Read(id=100 + i, lease=lease, items=(ReadItem("w", dtype="bf16"),)).encode())
    status = wait_until(lambda: (s := d.status())["reads"]["deferred"] and s)
    assert status["reads"]["cast_buffers"] <= 32 * MIB  # its share: half the cap while it is the only one
    reader = raw_peer(d.endpoint)
    reader.hello(role="reader")
    lease = reader.request(Acquire()).lease
    expected = w.to(torch.bfloat16)
    for i in range(3):  # every read completes while the other reader's replies stay unread
        reader.sock.send_multipart(Read(id=200 + i, lease=lease, items=(ReadItem("w", dtype="bf16"),)).encode())
        reply = reader.recv(timeout=60)
        got = torch.frombuffer(bytearray(reply.frames[0]), dtype=torch.bfloat16)
        assert reply.id == 200 + i and same(got, expected)
        assert d.status()["reads"]["cast_buffers"] <= 64 * MIB


class Tracker:  # what CastBuffers reads of zmq's MessageTracker
    done = False


@pytest.mark.fast
def test_cast_buffers_hold_at_most_their_limit_and_one_reply_at_most_half_of_it():
    buffers = read_cast.CastBuffers(limit=8 * MIB)
    assert buffers.max_reply() == 4 * MIB and not buffers.within_share(b"a", 5 * MIB, 1)  # refused by the reader
    assert buffers.within_share(b"a", 4 * MIB, 3) and buffers.room_for(4 * MIB)  # the floor: one, up to half
    [(_, big)] = buffers.take([4 * MIB])
    first = Tracker()
    buffers.sent(big, first, b"a")
    assert not buffers.within_share(b"a", 1 * MIB, 3)  # past its share of three readers'
    assert buffers.within_share(b"b", 4 * MIB, 2) and buffers.room_for(4 * MIB)  # another finds room beside it
    assert not buffers.room_for(4 * MIB + 1)
    first.done = True
    assert buffers.room_for(8 * MIB) and buffers.nbytes() == 4 * MIB  # gone out: idle, kept for the next reply
    buffers._trim_idle(0)
    trackers = [Tracker(), Tracker()]
    for (view, buf), tracker in zip(buffers.take([3 * MIB - 5, 3 * MIB]), trackers):
        assert len(view) in (3 * MIB - 5, 3 * MIB) and len(buf) == 3 * MIB
        buffers.sent(buf, tracker)
    assert buffers.busy() == 6 * MIB and buffers.room_for(2 * MIB) and not buffers.room_for(3 * MIB)
    trackers[0].done = True
    buffers.reclaim()
    assert buffers.busy() == 3 * MIB and buffers.nbytes() == 6 * MIB  # one idle, kept for the next reply
    [(_, reused)] = buffers.take([2 * MIB])  # fits in the idle one: reused, not allocated
    assert len(reused) == 3 * MIB and buffers.nbytes() == 3 * MIB
    buffers.sent(reused, None)  # the reply was dropped: idle again at once
    [(_, fresh)] = buffers.take([5 * MIB])  # 3 in flight + 5: the idle 3 MiB is freed to make room
    assert len(fresh) == 5 * MIB and buffers.nbytes() == 3 * MIB


@pytest.mark.fast
def test_one_reader_keeps_a_window_of_the_replies_readers_ask_in_flight():
    buffers = read_cast.CastBuffers(limit=64 * MIB)  # the smallest default --read-cast-memory
    reply = buffers.footprint(sources.CAST_CHUNK_BYTES)
    trackers = []
    while buffers.within_share(b"a", reply, 1) and buffers.room_for(reply):
        [(_, buf)] = buffers.take([sources.CAST_CHUNK_BYTES])
        trackers.append(Tracker())
        buffers.sent(buf, trackers[-1], b"a")
    assert len(trackers) == sources.WINDOW  # the reader's whole window, not one reply at a time


def test_a_reader_that_stops_receiving_the_largest_reply_keeps_no_other_reader_waiting(make_daemon, raw_peer):
    limit = 16 * MIB
    d = make_daemon(read_cast_memory=limit)
    w = torch.arange(4096 * 2048, dtype=torch.float32).view(4096, 2048) * 0.3  # 32 MiB: 16 MiB as bf16
    stage(d.endpoint, {"w": w})
    stalled = raw_peer(d.endpoint)
    stalled.sock.setsockopt(zmq.RCVHWM, 1)  # its replies stay in the daemon (cast buffers in flight): never read
    stalled.sock.setsockopt(zmq.RCVBUF, 64 << 10)
    stalled.hello(role="reader")
    lease = stalled.request(Acquire()).lease
    # all of it (a reply of the whole limit), then half of it (the largest reply allowed), then more behind
    boxes = [((0, 0), (4096, 2048)), ((0, 0), (2048, 2048)), ((2048, 0), (2048, 2048)), ((0, 0), (1024, 2048))]
    for i, (offsets, sizes) in enumerate(boxes):
        item = ReadItem("w", offsets, sizes, "bf16")
        stalled.sock.send_multipart(Read(id=100 + i, lease=lease, items=(item,)).encode())
    wait_until(lambda: d.status()["reads"]["deferred"])  # its first reply is in flight, the later ones wait
    reader = raw_peer(d.endpoint)
    reader.hello(role="reader")
    lease = reader.request(Acquire()).lease
    expected = w.to(torch.bfloat16)
    for i in range(4):  # 4 MiB replies: every one completes while the stalled reader's stays unread
        rows = slice(i * 1024, (i + 1) * 1024)
        item = ReadItem("w", (i * 1024, 0), (1024, 2048), "bf16")
        reader.sock.send_multipart(Read(id=200 + i, lease=lease, items=(item,)).encode())
        reply = reader.recv(timeout=60)
        assert isinstance(reply, ReadReply) and reply.id == 200 + i, reply
        got = torch.frombuffer(bytearray(reply.frames[0]), dtype=torch.bfloat16).view(1024, 2048)
        assert same(got, expected[rows])
        assert d.status()["reads"]["cast_buffers"] <= limit
    first = stalled.recv(timeout=60)  # a reply of the whole limit is refused: the reader splits the read
    assert isinstance(first, ErrorReply) and first.id == 100 and first.code == ErrorCode.BAD_VALUE.value, first
    assert "split the read into smaller boxes" in first.message


def test_a_remote_reader_asks_cast_replies_several_of_which_fit_its_share(make_daemon, monkeypatch):
    d = make_daemon(memory_limit=128 * MIB)  # --read-cast-memory 64 MiB: half of it for a reader alone
    w = torch.randn(4096, 2048)  # 32 MiB: 16 MiB as bf16
    stage(d.endpoint, {"w": w})
    asked = []
    fetch = sources.FramesSource.fetch

    def recorded(self, fqn, box, out=None, dtype=None):
        asked.append(box.numel * (dtype or torch.float32).itemsize)
        return fetch(self, fqn, box, out, dtype)

    monkeypatch.setattr(sources.FramesSource, "fetch", recorded)
    with Subscriber(d.endpoint, dtype=torch.bfloat16, remote=True) as sub:
        got = sub.get_many(["w"])["w"]
    assert same(got, w.to(torch.bfloat16))
    assert sum(asked) == 16 * MIB and max(asked) <= sources.CAST_CHUNK_BYTES  # was one 16 MiB reply
    assert sources.WINDOW * sources.CAST_CHUNK_BYTES <= 64 * MIB // 2
