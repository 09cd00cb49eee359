"""Live weights: announcements, HF views, sliced and remote reads, parameter-server gets, leases."""

import threading

import pytest
import torch

from conftest import error_code
from helpers import ONE_LAYER_LLAMA, EagerPlugin
from stager.client import StagingClient, Subscriber
from stager.client.adapters import load_adapter
from stager.client.readers import sources
from stager.protocol import Acquire, ErrorCode, Read, ReadItem, StagerError, Subscribe, SubscribeReply

CONFIG = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
INFO = {"adapter": "llama3", "hf_config": CONFIG}


def llama_sd(step: float) -> dict:
    g = torch.Generator().manual_seed(int(step))
    shapes = ONE_LAYER_LLAMA
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def stage(endpoint, steps, make=llama_sd, info=INFO):
    with StagingClient(endpoint, strict=True) as c:
        for step in steps:
            c.stage(make(step), step=step, model_info=info).wait(10)


@pytest.mark.parametrize("remote", [False, True], ids=["shared memory", "frames"])
def test_hf_view_cast_names_and_items(make_daemon, remote):
    d = make_daemon()
    stage(d.endpoint, [1])
    expected = load_adapter("llama3", CONFIG).to_hf(llama_sd(1))
    with Subscriber(d.endpoint, view="hf", remote=remote) as sub, sub.latest() as snap:
        assert list(snap) == list(expected) and snap.step == 1
        got = dict(snap.items())
        assert all(torch.equal(got[k], v) and torch.equal(snap[k], v) for k, v in expected.items())
        # same host: renames need no transform, views of the daemon's memory; permuted q/k are new. Frames: no view
        assert snap.is_zero_copy(snap["model.norm.weight"]) != remote
        assert not snap.is_zero_copy(snap["model.layers.0.self_attn.q_proj.weight"])
    wanted = ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    with Subscriber(d.endpoint, view="hf", dtype=torch.bfloat16, names=wanted, remote=remote) as sub:
        with sub.latest() as snap:
            assert sorted(snap) == sorted(wanted)
            assert all(t.dtype == torch.bfloat16 and torch.equal(t, expected[n].bfloat16()) for n, t in snap.items())
            with pytest.raises(KeyError, match="not in step 1's hf view"):
                snap["model.norm.weight"]


@pytest.mark.parametrize("remote", [False, True], ids=["shared memory", "frames"])
@pytest.mark.parametrize(
    "view,name",
    [
        ("native", "layers.0.feed_forward.w1.weight"),
        ("hf", "model.layers.0.mlp.down_proj.weight"),  # a rename: sliced in place
        ("hf", "model.layers.0.self_attn.q_proj.weight"),  # rotary-permuted: sliced after the permutation
    ],
)
def test_sliced_reads_match_chunks_of_the_view(make_daemon, remote, view, name):
    d = make_daemon()
    stage(d.endpoint, [1])
    sd = llama_sd(1)
    full = sd[name] if view == "native" else load_adapter("llama3", CONFIG).to_hf(sd)[name]
    with Subscriber(d.endpoint, view=view, remote=remote) as sub, sub.latest() as snap:
        for dim in (0, 1):
            for rank, chunk in enumerate(torch.chunk(full, 3, dim)):
                assert torch.equal(snap.get(name, shard=(dim, rank, 3)), chunk)
        assert torch.equal(snap.get(name, offsets=[2, 5], sizes=[3, 4]), full[2:5, 5:9])
        with pytest.raises(StagerError, match="does not fit"):
            snap.get(name, offsets=[0, 0], sizes=[999, 1])


def test_remote_slices_move_only_their_bytes(make_daemon, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 1024)  # many row-range requests per tensor
    d = make_daemon()
    stage(d.endpoint, [1])
    sd = llama_sd(1)
    with Subscriber(d.endpoint, view="hf", remote=True) as sub, sub.latest() as snap:
        before = d.status()["counters"]["read_bytes"]
        part = snap.get("model.layers.0.mlp.down_proj.weight", shard=(0, 1, 4))  # 8 of 32 rows
        assert d.status()["counters"]["read_bytes"] - before == part.numel() * 4
        assert torch.equal(part, sd["layers.0.feed_forward.w2.weight"][8:16])
        before = d.status()["counters"]["read_bytes"]
        assert torch.equal(snap["lm_head.weight"], sd["output.weight"])  # 12 KiB in 1 KiB requests
        assert d.status()["counters"]["read_bytes"] - before == sd["output.weight"].numel() * 4


def test_announcements_wake_readers_and_iteration_skips_to_the_newest(make_daemon):
    d = make_daemon(keep=4)
    with Subscriber(d.endpoint) as sub:
        with pytest.raises(StagerError) as info:
            sub.wait_for_newer(None, timeout=0.2)
        assert info.value.code == ErrorCode.TIMEOUT
        threading.Timer(0.3, stage, (d.endpoint, [1])).start()
        with sub.wait_for_newer(None, timeout=10) as snap:  # woken by the announcement of step 1
            assert snap.step == 1
        it = iter(sub)
        first = next(it)
        assert (first.step, first.skipped) == (1, 0)
        stage(d.endpoint, [2, 3, 4])  # the reader is busy: it will skip 2 and 3
        newest = next(it)
        assert (newest.step, newest.skipped) == (4, 2)
        with pytest.raises(StagerError):
            first["norm.weight"]  # the iterator released the previous version
        newest.release()
        assert d.status()["subscribers"] == 1


def test_readers_that_do_not_read_or_die_never_delay_staging(make_daemon, raw_peer):
    d = make_daemon(keep=1)
    laggard = raw_peer(d.endpoint)
    laggard.hello(role="reader")
    assert isinstance(laggard.request(Subscribe()), SubscribeReply)  # then never reads again
    gone = raw_peer(d.endpoint)
    gone.hello(role="reader")
    gone.request(Subscribe())
    gone.close()
    sd = {"w": torch.zeros(1000)}
    with StagingClient(d.endpoint, strict=True) as c:
        for step in range(1, 1201):  # more announcements than ZeroMQ queues for the laggard
            sd["w"].fill_(step)
            c.stage(sd, step=step).wait(10)
    status = d.status()
    assert status["seq"] == 1200 and status["counters"]["announcements_dropped"] > 0


def test_get_many_is_consistent_under_concurrent_readers(make_daemon):
    d = make_daemon(keep=2)
    names = [f"t{i}" for i in range(8)]

    def version(step):
        return {n: torch.full((64,), float(step)) for n in names}

    stage(d.endpoint, [1], version, None)
    errors, reads = [], [0]

    def reader():
        try:
            with Subscriber(d.endpoint) as sub:
                for _ in range(30):
                    got = sub.get_many(names)
                    values = {float(t[0]) for t in got.values()}
                    assert len(values) == 1, values  # every tensor from one version
                    got["t0"].add_(1)  # copies: the daemon's memory is untouched
                    reads[0] += 1
                w = sub.get("t3", step=None, offsets=[8], sizes=[4])
                assert w.shape == (4,)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    stage(d.endpoint, range(2, 40), version, None)
    for t in threads:
        t.join(60)
    assert not errors and reads[0] == 120
    with Subscriber(d.endpoint) as sub, pytest.raises(StagerError, match="not held"):
        sub.get("t0", step=1)


def test_leased_versions_are_never_freed_and_a_full_budget_refuses(make_daemon):
    one = 256 * 256 * 4
    d = make_daemon(keep=1, memory_limit=3 * one + (64 << 10))  # three segments of this layout
    sd = {"w": torch.zeros(256, 256)}
    with StagingClient(d.endpoint, strict=True, backpressure_timeout=0.2) as c, Subscriber(d.endpoint) as sub:
        held = []
        for step in (1, 2, 3):
            sd["w"].fill_(step)
            c.stage(sd, step=step).wait(10)
            held.append(sub.latest())
        sd["w"].fill_(4)
        with pytest.raises(StagerError) as info:  # all memory leased: refused, not freed
            c.stage(sd, step=4).wait(10)
        assert info.value.code == ErrorCode.MEMORY_LIMIT
        status = d.status()
        assert status["retention"]["leased_steps"] == [1, 2, 3] and "never freed" in status["retention"]["policy"]
        assert status["counters"]["memory_refusals"] == 1
        assert [float(s["w"][0, 0]) for s in held] == [1.0, 2.0, 3.0]  # intact under their readers
        for snap in held:
            snap.release()
        c.stage(sd, step=5).wait(10)
    assert [v["step"] for v in d.status()["versions"] if v["state"] == "sealed"] == [5]


@pytest.mark.parametrize(
    "items,code",
    [
        ([["nope", None, None]], "bad_value"),
        ([["w", [0, 0], [5, 1]]], "bad_value"),
        ([["w", [0], [1]]], "bad_value"),
    ],
)
def test_bad_reads_get_typed_errors(make_daemon, raw_peer, items, code):
    d = make_daemon()
    stage(d.endpoint, [1], lambda s: {"w": torch.zeros(4, 4)}, None)
    peer = raw_peer(d.endpoint)
    peer.hello(role="reader")
    assert error_code(peer.request(Read(lease=99, items=(ReadItem("w"),)))) == "unknown_lease"
    lease = peer.request(Acquire()).lease
    assert error_code(peer.request_raw("read", {"lease": lease, "items": items})) == code
    assert peer.request(Read(lease=lease, items=(ReadItem("w", (1, 0), (2, 4)),))).frames[0].__len__() == 32


def test_hf_view_through_a_plug_in_adapter(make_daemon):

    d = make_daemon()
    stage(d.endpoint, [1])
    sd = llama_sd(1)
    with Subscriber(d.endpoint, view="hf", adapter=EagerPlugin({"prefix": "x."})) as sub, sub.latest() as snap:
        assert list(snap) == ["x." + k for k in sd]
        assert all(torch.equal(snap["x." + k], v) for k, v in sd.items())
        assert all(torch.equal(t, sd[n[2:]]) for n, t in snap.items())
        assert torch.equal(snap.get("x.norm.weight", shard=(0, 1, 2)), sd["norm.weight"][16:])


@pytest.mark.parametrize(
    "view,remote", [("hf", False), ("hf", True), ("native", False)], ids=["hf shared memory", "hf frames", "native"]
)
def test_load_into_fills_existing_tensors_in_place(make_daemon, view, remote):
    d = make_daemon()
    stage(d.endpoint, [1])
    sd = llama_sd(1)
    expected = load_adapter("llama3", CONFIG).to_hf(sd) if view == "hf" else sd
    dst = {n: torch.full(t.shape, -1.0, dtype=torch.bfloat16) for n, t in expected.items()}
    dst.pop(next(iter(dst)))  # a name left out is not read
    before = {n: t.data_ptr() for n, t in dst.items()}
    with Subscriber(d.endpoint, view=view, remote=remote) as sub, sub.latest() as snap:
        assert snap.load_into(dst) == list(dst)
    assert {n: t.data_ptr() for n, t in dst.items()} == before  # the same tensors, written in place
    assert all(torch.equal(t, expected[n].bfloat16()) for n, t in dst.items())


def test_load_into_checks_every_shape_before_reading(make_daemon):
    d = make_daemon()
    stage(d.endpoint, [1])
    q = "model.layers.0.self_attn.q_proj.weight"
    dst = {"model.norm.weight": torch.zeros(32), q: torch.zeros(16, 32)}
    with Subscriber(d.endpoint, view="hf") as sub, sub.latest() as snap:
        with pytest.raises(StagerError, match=r"q_proj.weight: step 1 holds shape \[32, 32\].* is \[16, 32\]"):
            snap.load_into(dst)
        with pytest.raises(KeyError, match="not in step 1's hf view"):
            snap.load_into({"model.nope": torch.zeros(1)})
    assert not dst["model.norm.weight"].any()  # nothing was written


def test_load_into_through_a_whole_dict_plug_in(make_daemon):
    d = make_daemon()
    stage(d.endpoint, [1])
    sd = llama_sd(1)
    dst = {"x.norm.weight": torch.zeros(32), "x.output.weight": torch.zeros(96, 32)}
    with Subscriber(d.endpoint, view="hf", adapter=EagerPlugin({"prefix": "x."})) as sub, sub.latest() as snap:
        assert snap.load_into(dst) == ["x.norm.weight", "x.output.weight"]
    assert torch.equal(dst["x.norm.weight"], sd["norm.weight"]) and torch.equal(
        dst["x.output.weight"], sd["output.weight"]
    )


@pytest.mark.parametrize("remote", [False, True], ids=["shared memory", "frames"])
def test_tensors_handed_to_callers_carry_nothing_of_stager(make_daemon, remote):
    # a tensor attribute is pickled by torch.save and keeps what it holds alive: nothing of stager rides along
    d = make_daemon()
    stage(d.endpoint, [1])
    sd = llama_sd(1)
    for view in ("native", "hf"):
        with Subscriber(d.endpoint, view=view, remote=remote) as sub:
            with sub.latest() as snap:
                name, names = next(iter(snap)), list(snap)[:3]
                leased = [t for _, t in snap.items()] + [snap[name], snap.get(name, shard=(0, 1, 2))]
                assert all(t.__dict__ == {} for t in leased)
            copied = [sub.get(name), *sub.get_many(names).values()]
            assert all(t.__dict__ == {} for t in copied)
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as client:
        assert client.restore(target) == 1
    assert all(t.__dict__ == {} for t in target.values())
    assert all(torch.equal(target[k], v) for k, v in sd.items())
