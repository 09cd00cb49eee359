"""Delta reads: ``Snapshot.load_into(out, since=N)`` moves only what changed and is always bit-exact
to a full read of the leased step: over random chains of versions staged to a real daemon, readers
that skip versions, bases whose data (or map) is gone, layout changes, tensors written since, and
readers on the daemon's host (shared memory) and elsewhere (frames)."""

import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import InProcessDaemon
from helpers import ONE_LAYER_LLAMA, wait_until
from stager.client import StagingClient, Subscriber
from stager.client.adapters import load_adapter

CONFIG = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
INFO = {"adapter": "llama3", "hf_config": CONFIG}
SHAPES = ONE_LAYER_LLAMA


def first(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def rl_step(sd: dict, g: torch.Generator, frac: float = 0.02) -> dict:
    """Every fp32 element moves a little (mostly below bf16), ``frac`` of them past a bf16 ulp."""
    out = {}
    for k, v in sd.items():
        n = v.clone()
        if k.endswith("norm.weight"):
            out[k] = n  # RL steps leave norms alone
            continue
        n += torch.randn(n.shape, generator=g) * 1e-6
        hit = torch.rand(n.shape, generator=g) < frac
        n[hit] += 0.05
        out[k] = n
    return out


def full(sub, step, like: dict) -> dict:
    """A fresh full read of ``step`` into new tensors like ``like``'s."""
    fresh = {n: torch.empty_like(t) for n, t in like.items()}
    with sub.at(step) as snap:
        snap.load_into(fresh)
    return fresh


def read_bytes(d) -> int:
    return d.status()["counters"]["read_bytes"]


def changed(d, step):
    return next((v.get("changed") for v in d.status()["versions"] if v["step"] == step), None)


@pytest.mark.parametrize("remote", [False, True], ids=["shared memory", "frames"])
def test_delta_moves_only_what_changed_and_equals_a_full_read(make_daemon, remote):
    d = make_daemon(change_maps="bfloat16")
    g = torch.Generator().manual_seed(1)
    sds = [first()]
    sds.append(rl_step(sds[0], g))
    dst = {k: torch.empty(s, dtype=torch.bfloat16) for k, s in SHAPES.items()}
    with StagingClient(d.endpoint, strict=True) as c, Subscriber(d.endpoint, remote=remote) as sub:
        c.stage(sds[0], step=1).wait(10)
        with sub.latest() as snap:
            snap.load_into(dst)
        c.stage(sds[1], step=2).wait(10)
        wait_until(lambda: changed(d, 2))
        before = read_bytes(d)
        with sub.latest() as snap:
            assert snap.load_into(dst, since=1) == list(SHAPES)
        moved = read_bytes(d) - before
        expected = full(sub, 2, dst)
    assert all(torch.equal(dst[k], expected[k]) for k in SHAPES)
    n_changed = sum((sds[1][k].bfloat16() != sds[0][k].bfloat16()).sum().item() for k in SHAPES)
    assert 0 < n_changed < 0.05 * sum(t.numel() for t in dst.values())
    if remote:  # only indices and values crossed the wire
        assert moved == n_changed * (4 + 2)
    else:  # indices only: the values come from shared memory
        assert moved == n_changed * 4


@pytest.mark.parametrize("remote", [False, True], ids=["shared memory", "frames"])
def test_hf_view_renamed_and_permuted_tensors_take_deltas(make_daemon, remote):
    """Through the llama3 adapter: renamed tensors and the rotary-permuted q/k alike move only their
    changed elements (the maps are of the staged rows; the reader maps them to HF rows), bit-exact."""
    d = make_daemon(change_maps="bfloat16")
    g = torch.Generator().manual_seed(2)
    sds = [first(), None]
    sds[1] = rl_step(sds[0], g)
    adapter = load_adapter("llama3", CONFIG)
    hf = [{k: v.bfloat16() for k, v in adapter.to_hf(sd).items()} for sd in sds]
    dst = {n: torch.empty(t.shape, dtype=torch.bfloat16) for n, t in hf[0].items()}
    permuted = {k for k in dst if k.endswith(("q_proj.weight", "k_proj.weight"))}
    with StagingClient(d.endpoint, strict=True) as c, Subscriber(d.endpoint, view="hf", remote=remote) as sub:
        c.stage(sds[0], step=1, model_info=INFO).wait(10)
        with sub.latest() as snap:
            snap.load_into(dst)
        c.stage(sds[1], step=2, model_info=INFO).wait(10)
        wait_until(lambda: changed(d, 2))
        before = read_bytes(d)
        with sub.latest() as snap:
            assert set(snap.load_into(dst, since=1)) == set(dst)
        moved = read_bytes(d) - before
        expected = full(sub, 2, dst)
    assert all(torch.equal(dst[k], expected[k]) for k in dst)
    assert all(torch.equal(dst[k], hf[1][k]) for k in permuted)
    counts = {k: int((hf[1][k] != hf[0][k]).sum()) for k in dst}
    assert all(counts[k] for k in permuted)
    assert moved == sum(counts.values()) * (4 + 2 if remote else 4)  # q/k: their changes only, not whole


@pytest.mark.parametrize("remote", [False, True], ids=["shared memory", "frames"])
def test_engine_changes_of_permuted_tensors_are_in_hf_rows(make_daemon, remote):
    """What an engine tracking its own base is given (``changes_since``, the vLLM backend's in-place
    patch): q/k through the rotary permutation come with indices and values too, the indices in HF
    rows; written into step 1's HF tensors they give step 2's, bit for bit."""
    from stager.client.readers.engine_changes import base_of, changes_since
    from stager.protocol.changes import INDICES, UNCHANGED, apply

    d = make_daemon(change_maps="bfloat16")
    g = torch.Generator().manual_seed(6)
    sds = [first()]
    sds.append(rl_step(sds[0], g))
    adapter = load_adapter("llama3", CONFIG)
    hf = [{k: v.bfloat16() for k, v in adapter.to_hf(sd).items()} for sd in sds]
    with StagingClient(d.endpoint, strict=True) as c, Subscriber(d.endpoint, view="hf", remote=remote) as sub:
        c.stage(sds[0], step=1, model_info=INFO).wait(10)
        with sub.latest() as snap:
            base = base_of(snap)
        c.stage(sds[1], step=2, model_info=INFO).wait(10)
        wait_until(lambda: changed(d, 2))
        with sub.latest() as snap:
            got = changes_since(snap, list(hf[0]), base, torch.bfloat16, values=True)
    permuted = [k for k in hf[0] if k.endswith(("q_proj.weight", "k_proj.weight"))]
    assert len(permuted) == 2 and all(got[k].kind == INDICES and got[k].values is not None for k in permuted)
    for k, change in got.items():
        held = hf[0][k].clone()
        if change.kind == INDICES:
            apply(held, change.indices, change.values)
        else:
            assert change.kind == UNCHANGED, k
        assert torch.equal(held, hf[1][k]), k


@pytest.mark.parametrize("remote", [False, True], ids=["shared memory", "frames"])
def test_changes_over_the_reply_bound_are_asked_again_or_read_whole(make_daemon, monkeypatch, remote):
    """A reply holds at most MAX_REPLY_BYTES (made tiny here): the daemon answers the tensors that
    fit and the reader asks again for the rest; a tensor whose own changes pass MAX_TENSOR_BYTES is
    answered whole and read in full, never refused. The result is still the full read's."""
    import stager.daemon.change_replies as daemon_changes

    d = make_daemon(change_maps="bfloat16")
    g = torch.Generator().manual_seed(5)
    sds = [first()]
    sds.append(rl_step(sds[0], g))
    per = 4 + (2 if remote else 0)
    counts = {k: int((sds[1][k].bfloat16() != sds[0][k].bfloat16()).sum()) for k in SHAPES}
    biggest = max(counts, key=counts.get)
    bound = counts[biggest] * per - 1  # every tensor but the most changed one fits, a few per reply
    assert sum(counts.values()) * per > 2 * bound
    monkeypatch.setattr(daemon_changes, "MAX_REPLY_BYTES", bound)
    monkeypatch.setattr(daemon_changes, "MAX_TENSOR_BYTES", bound)
    dst = {k: torch.empty(s, dtype=torch.bfloat16) for k, s in SHAPES.items()}
    with StagingClient(d.endpoint, strict=True) as c, Subscriber(d.endpoint, remote=remote) as sub:
        c.stage(sds[0], step=1).wait(10)
        with sub.latest() as snap:
            snap.load_into(dst)
        c.stage(sds[1], step=2).wait(10)
        wait_until(lambda: changed(d, 2))
        before = read_bytes(d)
        with sub.latest() as snap:
            assert snap.load_into(dst, since=1) == list(SHAPES)
        moved = read_bytes(d) - before
        expected = full(sub, 2, dst)
    assert all(torch.equal(dst[k], expected[k]) for k in SHAPES)
    whole = dst[biggest].numel() * (2 if remote else 0)  # read in full (shared memory: copied, not served)
    assert moved == (sum(counts.values()) - counts[biggest]) * per + whole


def test_unprovable_tensors_are_read_in_full(make_daemon):
    """A tensor written since its load, one loaded under another name, and a base that is not what
    the tensors hold: each is read in full, and the result is still the full read's."""
    d = make_daemon(change_maps="bfloat16")
    g = torch.Generator().manual_seed(3)
    sds = [first()]
    for _ in range(2):
        sds.append(rl_step(sds[-1], g))
    dst = {k: torch.empty(s, dtype=torch.bfloat16) for k, s in SHAPES.items()}
    with StagingClient(d.endpoint, strict=True) as c, Subscriber(d.endpoint) as sub:
        c.stage(sds[0], step=1).wait(10)
        with sub.latest() as snap:
            snap.load_into(dst)
        dst["output.weight"].view(-1)[0] = 7.0  # written since: not step 1 any more
        c.stage(sds[1], step=2).wait(10)
        wait_until(lambda: changed(d, 2))
        with sub.latest() as snap:
            snap.load_into(dst, since=1)
        assert all(torch.equal(dst[k], full(sub, 2, dst)[k]) for k in SHAPES)
        c.stage(sds[2], step=3).wait(10)
        wait_until(lambda: changed(d, 3))
        with sub.latest() as snap:
            snap.load_into(dst, since=1)  # wrong: they hold 2; nothing proves 1, so all is read
        assert all(torch.equal(dst[k], full(sub, 3, dst)[k]) for k in SHAPES)


@pytest.mark.parametrize("view", ["native", "hf"])
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_chains_are_bit_exact(view, data):
    """Random chains: sparse and dense steps, a layout change, readers on both paths skipping versions
    at random, small --keep (bases evicted) and few kept maps (chains broken). ``hf``: a model staged
    with the llama3 adapter read by HF names, its q/k through the rotary permutation."""
    keep = data.draw(st.integers(1, 3), label="keep")
    maps_keep = data.draw(st.integers(1, 6), label="change_maps_keep")
    steps = data.draw(st.integers(3, 7), label="steps")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    tmp = tempfile.mkdtemp(prefix="stg", dir="/tmp")
    d = InProcessDaemon(
        f"ipc://{tmp}/d.sock",
        memory_limit=64 << 20,
        step_timeout=10.0,
        keep=keep,
        change_maps="bfloat16",
        change_maps_keep=maps_keep,
    )
    try:
        sd = dict(first(seed), h=torch.randn(24, 24, generator=g).bfloat16())  # staged in the reader's dtype
        info, how = None, {}
        if view == "hf":  # the adapter knows no "h"
            sd, info, how = first(seed), INFO, {"view": "hf"}
        readers = {False: ({}, None), True: ({}, None)}  # remote -> (dst, step it holds)
        with (
            StagingClient(d.endpoint, strict=True) as c,
            Subscriber(d.endpoint, **how) as local,
            Subscriber(d.endpoint, remote=True, **how) as remote,
        ):
            subs = {False: local, True: remote}
            for step in range(1, steps + 1):
                kind = data.draw(st.sampled_from(["sparse", "sparse", "dense", "same", "reshape"]), label="kind")
                if step > 1:
                    if kind == "sparse":
                        sd = rl_step(sd, g)
                    elif kind == "dense":
                        sd = rl_step(sd, g, frac=0.5)
                    elif kind == "reshape":
                        sd = dict(sd, **{"norm.weight": torch.randn(32 + step, generator=g)})
                c.stage(sd, step=step, model_info=info).wait(10)
                if data.draw(st.booleans(), label="settle"):
                    wait_until(lambda: changed(d, step) or step == 1)
                for is_remote, sub in subs.items():
                    if not data.draw(st.booleans(), label=f"read remote={is_remote}"):
                        continue  # this reader skips the version
                    dst, held = readers[is_remote]
                    with sub.latest() as snap:
                        for name, _, shape in snap.specs():
                            if name not in dst or tuple(dst[name].shape) != tuple(shape):
                                dst[name] = torch.empty(shape, dtype=torch.bfloat16)  # new: nothing to prove
                        snap.load_into(dst, since=held)
                        got_step = snap.step
                    expected = full(sub, got_step, dst)
                    assert all(torch.equal(dst[k], expected[k]) for k in dst), (step, is_remote)
                    readers[is_remote] = (dst, got_step)
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize(
    "tensors,frames,why",
    [
        ([["w", "indices", 1]], [torch.tensor([9], dtype=torch.int32), torch.ones(1, dtype=torch.bfloat16)], "fit"),
        (
            [["w", "indices", 1]],
            [torch.tensor([-1], dtype=torch.int32), torch.ones(1, dtype=torch.bfloat16)],
            "negative",
        ),
        (
            [["w", "indices", 2]],
            [torch.tensor([0, 1], dtype=torch.int32), torch.ones(1, dtype=torch.bfloat16)],
            "short",
        ),
        ([["v", "unchanged", 0]], [], "names 'v'"),
        (
            [["w", "indices", 3]],
            [torch.tensor([1, -3, 3], dtype=torch.int32), torch.ones(3, dtype=torch.bfloat16)],
            "negative",
        ),
        (
            [["w", "indices", 3]],
            [torch.tensor([1, 99, 3], dtype=torch.int32), torch.ones(3, dtype=torch.bfloat16)],
            "fit",
        ),
        ([["w", "indices", 1]], [torch.tensor([1], dtype=torch.int32).view(torch.uint8)[:3]], "not whole"),
    ],
    ids=["out of range", "negative", "values short", "another tensor", "negative inside", "over inside", "torn frame"],
)
def test_a_bad_changes_reply_is_a_typed_error_and_writes_nothing(tensors, frames, why):
    from stager.client.readers.delta import _apply, _Plan
    from stager.protocol import Box, ChangesReply, StagerError

    dst = torch.zeros(4, dtype=torch.bfloat16)
    reply = ChangesReply(
        step=2,
        since=1,
        tensors=tensors,
        frames=[
            f.numpy().tobytes() if f.dtype != torch.bfloat16 else f.view(torch.int16).numpy().tobytes() for f in frames
        ],
    )
    with pytest.raises(StagerError, match=why):
        _apply(None, "n", [_Plan("w", "w", dst, {"n": [Box((0,), (4,))]}, {})], reply, torch.bfloat16, False)
    assert not dst.any()


def test_a_changes_reply_outside_the_boxes_asked_of_a_node_writes_nothing():
    """A node serving rows 0-1 of a (4, 2) tensor (a job spanning nodes) answers an index in row 3:
    the values path checks every index against the boxes asked before any write."""
    from stager.client.readers.delta import _apply, _Plan
    from stager.protocol import Box, ChangesReply, StagerError

    dst = torch.zeros(4, 2, dtype=torch.bfloat16)
    idx, vals = torch.tensor([1, 6], dtype=torch.int32), torch.ones(2, dtype=torch.bfloat16)
    reply = ChangesReply(
        step=2,
        since=1,
        tensors=[["w", "indices", 2]],
        frames=[idx.numpy().tobytes(), vals.view(torch.int16).numpy().tobytes()],
    )
    plan = _Plan("w", "w", dst, {"n": [Box((0, 0), (2, 2))]}, {})
    with pytest.raises(StagerError, match="outside the boxes"):
        _apply(None, "n", [plan], reply, torch.bfloat16, False)
    assert not dst.any()


def test_a_base_loaded_from_an_export_is_proven_by_checksums(make_daemon, tmp_path):
    """A reader whose tensors hold step 1 because it loaded `export-hf`'s files (not through
    load_into: nothing in this process proves them) gets a delta: the daemon checks the crc32 of its
    copies against step 1's, kept with the maps. The permuted q/k too: their checksums are taken
    through the adapter's row order (the staged layout the daemon's are of). A q whose copy is not
    step 1's fails its checksum and is read whole."""
    import os

    from safetensors.torch import load_file

    from stager.writers.export_hf import export_hf

    d = make_daemon(change_maps="bfloat16")
    g = torch.Generator().manual_seed(4)
    sds = [first()]
    sds.append(rl_step(sds[0], g))
    adapter = load_adapter("llama3", CONFIG)
    with StagingClient(d.endpoint, strict=True) as c:
        c.stage(sds[0], step=1, model_info=INFO).wait(10)
        path = export_hf(str(tmp_path / "hf"), endpoint=d.endpoint, step=1, progress=False)[0]
        c.stage(sds[1], step=2, model_info=INFO).wait(10)
    wait_until(lambda: changed(d, 2))
    files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")]
    dst = {k: v.bfloat16() for f in files for k, v in load_file(f).items()}  # as an engine loads a checkpoint
    permuted = {k for k in dst if k.endswith(("q_proj.weight", "k_proj.weight"))}
    wrong = "model.layers.0.self_attn.q_proj.weight"
    dst[wrong].view(-1)[-1] += 1  # not step 1's any more: its checksum proves nothing
    hf = [{k: v.bfloat16() for k, v in adapter.to_hf(sd).items()} for sd in sds]
    delta = sum(int((hf[1][k] != hf[0][k]).sum()) * (4 + 2) for k in dst if k != wrong)
    with Subscriber(d.endpoint, view="hf", remote=True) as sub:
        before = read_bytes(d)
        with sub.at(2) as snap:
            snap.load_into(dst, since=1)
        moved = read_bytes(d) - before
        expected = full(sub, 2, dst)
    assert all(torch.equal(dst[k], expected[k]) for k in dst)
    assert len(permuted) == 2 and all(int((hf[1][k] != hf[0][k]).sum()) for k in permuted)
    assert 0 < delta and moved == delta + dst[wrong].numel() * 2


@pytest.mark.parametrize("remote", [False, True], ids=["shared memory", "frames"])
def test_writes_the_version_counter_misses_are_caught_by_verify_base(make_daemon, remote):
    """Tensors written where torch's version counter does not see it (a numpy view, ``.data``)
    still look proven by the ledger; ``verify_base=True`` checksums them: those two are read
    whole, the others take the delta, and the result is the full read's."""
    d = make_daemon(change_maps="bfloat16")
    g = torch.Generator().manual_seed(5)
    sds = [first()]
    sds.append(rl_step(sds[0], g))
    dst = {k: torch.empty(s, dtype=torch.bfloat16) for k, s in SHAPES.items()}
    with StagingClient(d.endpoint, strict=True) as c, Subscriber(d.endpoint, remote=remote) as sub:
        c.stage(sds[0], step=1).wait(10)
        with sub.latest() as snap:
            snap.load_into(dst)
        c.stage(sds[1], step=2).wait(10)
        wait_until(lambda: changed(d, 2))
        counters = {k: t._version for k, t in dst.items()}
        dst["output.weight"].view(torch.int16).numpy()[0, 0] ^= 0x40  # under torch's feet
        dst["tok_embeddings.weight"].data[3, 3] = 1000.0
        assert {k: t._version for k, t in dst.items()} == counters  # the ledger cannot tell
        touched = ("output.weight", "tok_embeddings.weight")
        before = read_bytes(d)
        with sub.latest() as snap:
            snap.load_into(dst, since=1, verify_base=True)
        moved = read_bytes(d) - before
        expected = full(sub, 2, dst)
    assert all(torch.equal(dst[k], expected[k]) for k in SHAPES)
    per = 4 if not remote else 4 + 2
    delta = sum(int((sds[1][k].bfloat16() != sds[0][k].bfloat16()).sum()) * per for k in SHAPES if k not in touched)
    assert 0 < delta and moved == delta + (sum(dst[k].numel() * 2 for k in touched) if remote else 0)
