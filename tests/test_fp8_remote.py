"""FP8 quantized where the bytes are (issue 25, item 5): a remote reader of ``quantize="fp8-block"`` receives
e4m3 weights and fp32 scales quantized by the daemon, bit for bit what it would have quantized itself
(:func:`stager.protocol.fp8_block.quantize_block_fp8`, vLLM's ``per_block_cast_to_fp8``): partial edge
blocks, all-zero blocks, NaN and inf included. A daemon that predates FP8 reads refuses them (BAD_MESSAGE)
and the reader quantizes the staged bytes itself, as before.
"""

import math

import pytest
import torch

from helpers import lazy_importorskip
from native_llama import NativeLlama
from stager.client import StagingClient, Subscriber
from stager.client.adapters import load_adapter
from stager.client.adapters.fp8_scope import llama_fp8_weight
from stager.client.admin import daemon_status
from stager.client.readers import sources
from stager.protocol import Acquire, ErrorCode, ErrorReply, ProtocolError, Read, ReadItem, ReadReply
from stager.protocol.fp8_block import E4M3, quantize_block_fp8, scale_shape
from stager.protocol.read_checks import check_read_fp8

transformers = lazy_importorskip("transformers")

# q [160, 160], k/v [80, 160], gate/up [200, 160], down [160, 200]: partial 128 x 128 edge blocks everywhere
CONFIG = {
    "vocab_size": 96,
    "hidden_size": 160,
    "intermediate_size": 200,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 64,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
# the projections the llama3 adapter only renames; q and k have their rows permuted for HF's rotary order:
# the daemon gathers their rows in HF order, then quantizes (all of them cross the wire as e4m3 and scales)
RENAMED = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PERMUTED = ("q_proj", "k_proj")


def native_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in NativeLlama(CONFIG).state_dict().items()}
    w1 = sd["layers.0.feed_forward.w1.weight"]  # gate [200, 160]
    w1[:128, :128] = 0.0  # an all-zero block
    w1[130, 3] = 0.0 * -1.0  # -0.0 in a partial block
    w3 = sd["layers.0.feed_forward.w3.weight"]  # up [200, 160]
    w3[5, 140] = float("nan")  # NaN in a partial column block
    w3[150, 7] = float("inf")  # inf in a partial row block
    sd["layers.0.feed_forward.w2.weight"][:, 128:] *= 1e-30  # tiny values: the 1e-4 amax floor
    sd["layers.0.attention.wv.weight"][7, 9] = float("-inf")
    return sd


def stage(endpoint: str, sd: dict) -> None:
    c = {k: v for k, v in CONFIG.items() if k != "rope_theta"}
    hf = transformers.LlamaConfig(**c, rope_theta=CONFIG["rope_theta"]).to_dict()
    with StagingClient(endpoint, strict=True) as client:
        client.stage(sd, step=1, model_info={"adapter": "llama3", "hf_config": hf}).wait(30)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN payloads and -0.0 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def served(endpoint: str) -> int:
    return daemon_status(endpoint)["counters"]["read_bytes"]


def read(endpoint: str, remote: bool) -> tuple[dict, dict, int]:
    """The FP8 view by items() and by load_into(), and the bytes the daemon sent meanwhile."""
    before = served(endpoint)
    with (
        Subscriber(endpoint, view="hf", quantize="fp8-block", dtype=torch.bfloat16, remote=remote) as sub,
        sub.latest() as snap,
    ):
        got = {k: v.clone() for k, v in snap.items()}
        engine = {k: torch.empty_like(v) for k, v in got.items()}
        snap.load_into(engine)
        single = {n: snap[n].clone() for n in got if "up_proj" in n}  # one weight and its scales, by name
    return got, {**engine, **{"by name " + k: v for k, v in single.items()}}, served(endpoint) - before


def expected_bytes(view: dict, sd: dict, by_daemon=RENAMED + PERMUTED) -> int:
    """What a remote read of the view moves twice (items, then load_into) plus the single reads: the
    weights of ``by_daemon`` as e4m3 + scales, other weights as staged fp32 (quantized by the reader), the
    rest cast to bf16."""
    total = 0
    for name, t in view.items():
        if name.endswith("_scale_inv"):
            continue
        if llama_fp8_weight(name) and name.split(".")[-2] in by_daemon:
            total += t.numel() + 4 * math.prod(scale_shape(tuple(t.shape), (128, 128)))
        elif llama_fp8_weight(name):
            total += t.numel() * 4
        else:
            total += t.numel() * 2
    up = next(t for n, t in view.items() if n.endswith("up_proj.weight"))
    return 2 * total + 2 * (up.numel() + 4 * math.prod(scale_shape(tuple(up.shape), (128, 128))))


def test_a_remote_fp8_read_is_quantized_by_the_daemon_bit_for_bit_and_moves_e4m3_and_scales(make_daemon, monkeypatch):
    d = make_daemon()
    sd = native_sd()
    stage(d.endpoint, sd)
    local, local_engine, mapped = read(d.endpoint, remote=False)
    assert mapped == 0  # the same host maps the segment and quantizes: no wire
    monkeypatch.setattr(sources, "CHUNK_BYTES", 128 * 160 * 4)  # 128 fp32 rows per request: several per weight
    remote, remote_engine, moved = read(d.endpoint, remote=True)
    assert list(remote) == list(local) and all(same(remote[k], v) for k, v in local.items())
    assert all(same(remote_engine[k], v) for k, v in local_engine.items())
    up = local["model.layers.0.mlp.up_proj.weight"]
    assert up.dtype == E4M3 and same(up, quantize_block_fp8(sd["layers.0.feed_forward.w3.weight"])[0])
    gate_scales = local["model.layers.0.mlp.gate_proj.weight_scale_inv"]
    assert gate_scales[0, 0].item() == pytest.approx(1e-4 / 448)  # the all-zero block
    assert moved == expected_bytes(local, sd)  # e4m3 + scales: a quarter of the fp32 bytes, and a bit
    adapter = load_adapter("llama3", CONFIG)
    for native, hf in (("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj")):
        # the HF tensor's 128-row blocks mix heads: quantized after the permutation, as the reference does it
        ((_, w),) = adapter.to_hf_items(f"layers.0.{native}.weight", sd[f"layers.0.{native}.weight"])
        data, scales = quantize_block_fp8(w)
        assert same(remote[f"model.layers.0.{hf}.weight"], data)
        assert same(remote[f"model.layers.0.{hf}.weight_scale_inv"], scales)
        assert not same(data, quantize_block_fp8(sd[f"layers.0.{native}.weight"])[0])  # the order matters


def test_a_daemon_that_predates_fp8_reads_refuses_them_and_the_reader_quantizes_itself(make_daemon, monkeypatch):
    d = make_daemon()
    sd = native_sd()
    stage(d.endpoint, sd)
    local, local_engine, _ = read(d.endpoint, remote=False)
    plain = ReadItem.from_wire.__func__

    def old(cls, item):  # the daemon's decoding before FP8 reads: three or four elements
        if isinstance(item, list) and len(item) >= 5:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "read: item must be [fqn, offsets, sizes] ...")
        return plain(cls, item)

    monkeypatch.setattr(ReadItem, "from_wire", classmethod(old))
    remote, remote_engine, moved = read(d.endpoint, remote=True)
    assert all(same(remote[k], v) for k, v in local.items())
    assert all(same(remote_engine[k], v) for k, v in local_engine.items())
    staged = sum(
        t.numel() * (4 if llama_fp8_weight(n) else 2) for n, t in local.items() if not n.endswith("_scale_inv")
    )
    up = local["model.layers.0.mlp.up_proj.weight"].numel() * 4
    assert moved == 2 * staged + 2 * up  # every weight as staged: quantized by the reader, as before


def test_a_daemon_that_predates_fp8_row_gathers_quantizes_the_renamed_weights_and_the_reader_q_k(
    make_daemon, monkeypatch
):
    """A daemon that serves FP8 reads but predates their rows (a six-element item: BAD_MESSAGE): the
    reader quantizes q and k itself, and still asks the daemon for the renamed weights."""
    d = make_daemon()
    sd = native_sd()
    stage(d.endpoint, sd)
    local, local_engine, _ = read(d.endpoint, remote=False)
    plain = ReadItem.from_wire.__func__

    def old(cls, item):  # the daemon's decoding with FP8 reads, before rows: up to five elements
        if isinstance(item, list) and len(item) == 6:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "read: item must be [fqn, offsets, sizes] ...")
        return plain(cls, item)

    monkeypatch.setattr(ReadItem, "from_wire", classmethod(old))
    remote, remote_engine, moved = read(d.endpoint, remote=True)
    assert all(same(remote[k], v) for k, v in local.items())
    assert all(same(remote_engine[k], v) for k, v in local_engine.items())
    assert moved == expected_bytes(local, sd, by_daemon=RENAMED)


def test_fp8_reads_on_the_wire_box_by_box(make_daemon, raw_peer):
    d = make_daemon()
    w = torch.randn(300, 200) * 3
    w[128:256, 128:] = 0.0
    stage(d.endpoint, {"w": w, "b": torch.randn(300), "i": torch.arange(6).view(2, 3)})
    peer = raw_peer(d.endpoint)
    peer.hello(role="reader")
    lease = peer.request(Acquire()).lease
    assert ReadItem("w", (128, 0), (172, 200), "f8e4m3", (128, 128)).to_wire() == [
        "w",
        [128, 0],
        [172, 200],
        "f8e4m3",
        [128, 128],
    ]
    data, scales = quantize_block_fp8(w)
    for offsets, sizes in (((0, 0), (300, 200)), ((128, 0), (172, 200)), ((128, 128), (128, 72)), ((0, 0), (0, 200))):
        reply = peer.request(Read(lease=lease, items=(ReadItem("w", offsets, sizes, "f8e4m3", (128, 128)),)))
        assert isinstance(reply, ReadReply), reply
        frame = bytes(reply.frames[0])
        grid = scale_shape(sizes, (128, 128))
        split = 4 * math.prod(grid)
        assert len(frame) == split + math.prod(sizes)
        if not frame:  # an empty box: no scales, no data
            continue
        r, c = offsets[0] // 128, offsets[1] // 128
        got_scales = torch.frombuffer(bytearray(frame[:split]), dtype=torch.float32).view(grid)
        assert same(got_scales, scales[r : r + grid[0], c : c + grid[1]].contiguous())
        got = torch.frombuffer(bytearray(frame[split:]), dtype=torch.uint8).view(E4M3).view(sizes)
        box = data[offsets[0] : offsets[0] + sizes[0], offsets[1] : offsets[1] + sizes[1]].contiguous()
        assert same(got, box)
    for item, code in (
        (ReadItem("w", (1, 0), (128, 200), "f8e4m3", (128, 128)), ErrorCode.BAD_VALUE),  # not on a block
        (ReadItem("w", (0, 0), (100, 200), "f8e4m3", (128, 128)), ErrorCode.BAD_VALUE),  # ends inside one
        (ReadItem("b", None, None, "f8e4m3", (128, 128)), ErrorCode.BAD_VALUE),  # 1-D
        (ReadItem("i", None, None, "f8e4m3", (1, 1)), ErrorCode.BAD_VALUE),  # integers
        (ReadItem("w", None, None, "f8e4m3", (65536, 65536)), ErrorCode.BAD_VALUE),  # 16 GiB of padding
        (ReadItem("w", None, None, "bf16", (128, 128)), ErrorCode.BAD_MESSAGE),  # an FP8 block names e4m3
        (ReadItem("w", None, None, "f8e4m3", (0, 128)), ErrorCode.BAD_MESSAGE),
    ):
        reply = peer.request(Read(lease=lease, items=(item,)))
        assert isinstance(reply, ErrorReply) and reply.code == code.value, (item, reply)
    assert peer.request(Acquire()).lease  # the daemon serves on


@pytest.mark.parametrize("gather", [16 << 20, 1], ids=["one gather", "a row of blocks per gather"])
def test_fp8_reads_of_reordered_rows_on_the_wire(make_daemon, raw_peer, monkeypatch, gather):
    """``ReadItem.rows``: the daemon gathers the rows in the order named, then quantizes the box of the
    reordered tensor (its blocks, its edge), bit for bit the reference on that tensor, however many rows
    it gathers at a time; rows that do not fit are typed errors, and the daemon serves on."""
    from stager.daemon import read_fp8

    monkeypatch.setattr(read_fp8, "CHUNK_BYTES", gather)
    d = make_daemon()
    w = torch.randn(300, 200) * 3
    stage(d.endpoint, {"w": w, "s": torch.tensor(2.0), "v": torch.randn(300)})
    peer = raw_peer(d.endpoint)
    peer.hello(role="reader")
    lease = peer.request(Acquire()).lease
    assert ReadItem("w", (0, 0), (2, 200), "f8e4m3", (128, 128), (2, 0)).to_wire() == [
        "w",
        [0, 0],
        [2, 200],
        "f8e4m3",
        [128, 128],
        [2, 0],
    ]
    order = torch.randperm(300, generator=torch.Generator().manual_seed(3))  # reordered row i = w's row order[i]
    data, scales = quantize_block_fp8(w[order])
    for offsets, sizes in (((0, 0), (300, 200)), ((128, 0), (172, 200)), ((128, 128), (128, 72)), ((0, 0), (0, 200))):
        rows = tuple(order[offsets[0] : offsets[0] + sizes[0]].tolist())
        reply = peer.request(Read(lease=lease, items=(ReadItem("w", offsets, sizes, "f8e4m3", (128, 128), rows),)))
        assert isinstance(reply, ReadReply), reply
        frame = bytes(reply.frames[0])
        grid = scale_shape(sizes, (128, 128))
        split = 4 * math.prod(grid)
        assert len(frame) == split + math.prod(sizes)
        if not frame:
            continue
        r, c = offsets[0] // 128, offsets[1] // 128
        got_scales = torch.frombuffer(bytearray(frame[:split]), dtype=torch.float32).view(grid)
        assert same(got_scales, scales[r : r + grid[0], c : c + grid[1]].contiguous())
        got = torch.frombuffer(bytearray(frame[split:]), dtype=torch.uint8).view(E4M3).view(sizes)
        assert same(got, data[offsets[0] : offsets[0] + sizes[0], offsets[1] : offsets[1] + sizes[1]].contiguous())
    for item, code in (
        (ReadItem("w", (0, 0), (128, 200), "f8e4m3", (128, 128), tuple(range(127))), ErrorCode.BAD_VALUE),  # short
        (ReadItem("w", (0, 0), (128, 200), "f8e4m3", (128, 128), (300,) * 128), ErrorCode.BAD_VALUE),  # past the end
        (ReadItem("w", (0, 0), (128, 200), "f8e4m3", (128, 128), (-1,) * 128), ErrorCode.BAD_MESSAGE),  # negative
        (ReadItem("w", (1, 0), (128, 200), "f8e4m3", (128, 128), tuple(range(128))), ErrorCode.BAD_VALUE),  # off-block
        (ReadItem("s", None, None, "f8e4m3", (128, 128), ()), ErrorCode.BAD_VALUE),  # 0-D: no rows to gather
        (ReadItem("v", (0,), (128,), "f8e4m3", (128, 128), tuple(range(128))), ErrorCode.BAD_VALUE),  # 1-D
        # more rows than any FP8 read may gather: refused before the list is walked
        (ReadItem("w", (0, 0), (1 << 20, 200), "f8e4m3", (128, 128), (0,) * ((1 << 20) + 1)), ErrorCode.BAD_MESSAGE),
    ):
        reply = peer.request(Read(lease=lease, items=(item,)))
        assert isinstance(reply, ErrorReply) and reply.code == code.value, (item, reply)
    assert peer.request(Acquire()).lease  # the daemon serves on


def test_fp8_reads_are_bounded_by_their_real_reply_size_and_the_daemons_work(make_daemon, raw_peer):
    d = make_daemon(read_cast_memory=4 << 20)  # one cast or FP8 reply may take half of it: 2 MiB
    w = torch.randn(2048, 2048)  # its FP8 reply: 4 MiB of e4m3 plus scales
    narrow = torch.randn(300, 200)
    wide = torch.randn(128, 100, dtype=torch.float64)
    stage(d.endpoint, {"w": w, "n": narrow, "d": wide})
    peer = raw_peer(d.endpoint)
    peer.hello(role="reader")
    lease = peer.request(Acquire()).lease
    for item, says in (
        # a scale per element: five bytes of reply per element (a 256 MiB bf16 box made a 640 MiB buffer)
        (ReadItem("w", (0, 0), (256, 128), "f8e4m3", (1, 1)), "at least [16, 16]"),
        # over what one reply may hold of the cast buffers, whatever else is in flight: the reader splits
        (ReadItem("w", None, None, "f8e4m3", (128, 128)), "split the read into smaller boxes"),
        (ReadItem("w", None, None, "bf16"), "split the read into smaller boxes"),
        # a 300 x 200 box padded to 304 x 65536: the quantizer's work is the padded box's
        (ReadItem("n", None, None, "f8e4m3", (16, 65536)), "split the read into smaller boxes"),
        # float64: the padded copy and the float64 product, 16 bytes per element (128 MiB), not fp32's 4
        (ReadItem("d", None, None, "f8e4m3", (128, 65536)), "MiB of temporaries"),
    ):
        reply = peer.request(Read(lease=lease, items=(item,)))
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.BAD_VALUE.value, (item, reply)
        assert says in reply.message, reply.message
    data, scales = quantize_block_fp8(w)
    reply = peer.request(Read(lease=lease, items=(ReadItem("w", (0, 0), (512, 2048), "f8e4m3", (128, 128)),)))
    assert isinstance(reply, ReadReply), reply  # a quarter of it: 1 MiB and its scales, served
    frame = bytes(reply.frames[0])
    assert same(torch.frombuffer(bytearray(frame[:256]), dtype=torch.float32).view(4, 16), scales[:4].contiguous())
    assert same(torch.frombuffer(bytearray(frame[256:]), dtype=torch.uint8).view(E4M3).view(512, 2048), data[:512])
    reply = peer.request(Read(lease=lease, items=(ReadItem("d", None, None, "f8e4m3", (128, 128)),)))
    assert isinstance(reply, ReadReply) and len(reply.frames[0]) == 4 + 128 * 100  # float64 in 128 x 128: served


@pytest.mark.fast
def test_check_read_fp8_counts_the_float64_product_and_the_padding():
    check_read_fp8("w", torch.float32, (128, 100), (0, 0), (128, 100), (128, 65536))  # 64 MiB: at the bound
    with pytest.raises(ProtocolError, match="128 MiB of temporaries"):
        check_read_fp8("w", torch.float64, (128, 100), (0, 0), (128, 100), (128, 65536))
    with pytest.raises(ProtocolError, match="at least"):
        check_read_fp8("w", torch.bfloat16, (4096, 4096), (0, 0), (4096, 4096), (128, 8))
    with pytest.raises(ProtocolError, match="split the read"):  # 16 Mi elements and one more row of blocks
        check_read_fp8("w", torch.bfloat16, (4096 + 128, 4096), (0, 0), (4096 + 128, 4096), (128, 128))
    check_read_fp8("w", torch.bfloat16, (4096, 4096), (0, 0), (4096, 4096), (128, 128))
