"""Change maps in the daemon: computed after each seal on its own thread, shown in status, served
to readers (Changes), kept beyond --keep, and yielding to staging when memory is short."""

import gc
import threading
import types

import pytest
import torch

from conftest import error_code, wire_plan
from helpers import wait_until
from stager.client import StagingClient
from stager.daemon import change_gate
from stager.protocol import (
    Abort,
    Acquire,
    Begin,
    BeginReply,
    Changes,
    ChangesReply,
    Commit,
    ErrorCode,
    Ok,
    Put,
    Sealed,
    StagerError,
)
from stager.protocol.changes import INDICES, UNCHANGED, WHOLE
from stager.protocol.layout import plan_digest


def chain(n: int, seed: int = 0) -> list[dict]:
    """``n`` fp32 state dicts: each step moves every element a little (below bf16) and a few a lot."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "w": torch.randn(64, 32, generator=g).bfloat16().float(),
        "b": torch.randn(40, generator=g),
        "n": torch.ones(16),
        "i": torch.arange(8),
    }
    out = [sd]
    for _ in range(n - 1):
        nxt = {k: v.clone() for k, v in sd.items()}
        nxt["w"] += 1e-6  # fp32 moves everywhere, bf16 nowhere
        nxt["w"].view(-1)[torch.randint(0, 64 * 32, (20,), generator=g)] += 0.5
        nxt["b"] = torch.randn(40, generator=g)  # dense: whole
        out.append(nxt)
        sd = nxt
    return out


def stage_all(d, sds, first_step=1, settle=False):
    """Stage ``sds`` as consecutive steps; ``settle``: wait for each one's change map before the next
    (a step that needs the memory a map in progress pins takes it, and that map is dropped)."""
    with StagingClient(d.endpoint, strict=True) as c:
        for i, sd in enumerate(sds):
            c.stage(sd, step=first_step + i).wait(10)
            if settle and i:
                wait_until(lambda: changed(d, first_step + i))


def changed(d, step):
    for v in d.status()["versions"]:
        if v["step"] == step and "changed" in v:
            return v["changed"]
    return None


def hold_maps(d) -> tuple[threading.Event, threading.Event]:
    """Each map of in-process daemon ``d`` waits at its start (``entered`` set) until ``release`` is set."""
    maps = d.daemon.handlers.changes
    release, entered = threading.Event(), threading.Event()
    compute = maps._compute

    def held(job):
        entered.set()
        release.wait(30)
        compute(job)

    maps._compute = held
    return release, entered


def test_status_shows_what_changed_in_the_readers_dtype(make_daemon):
    d = make_daemon(change_maps="bfloat16")
    sds = chain(3)
    stage_all(d, sds, settle=True)  # a map still being made when its base is dropped is dropped too
    entry = wait_until(lambda: changed(d, 3))["bf16"]
    w = (sds[2]["w"].bfloat16() != sds[1]["w"].bfloat16()).sum().item()
    numel = 64 * 32 + 40 + 16 + 8
    assert entry["since"] == 2 and entry["tensors"] == [2, 4] and entry["whole"] == 1
    assert entry["elements"] == pytest.approx((w + 40) / numel, abs=1e-6)
    assert 0 < entry["bytes"] < 0.1 and entry["delta_bytes"] == w * 6 + 40 * 2
    status = d.status()
    assert status["changes"]["dtypes"] == ["bf16"] and status["changes"]["kept"] == 2
    assert all(v["leases"] == 0 for v in status["versions"])  # the thread's pins are not readers' leases


def test_changes_request_and_unknown_base(make_daemon, raw_peer):
    d = make_daemon(keep=1, change_maps="bfloat16", change_maps_keep=2)
    sds = chain(5)
    stage_all(d, sds, settle=True)
    wait_until(lambda: changed(d, 5))
    peer = raw_peer(d.endpoint)
    peer.hello(role="reader")
    acq = peer.request(Acquire())
    assert acq.step == 5 and acq.seq == 5
    reply = peer.request(Changes(lease=acq.lease, since=3, since_seq=3, dtype="bf16", want="values"))
    assert isinstance(reply, ChangesReply)
    kinds = {f: (k, n) for f, k, n in reply.tensors}
    assert kinds["b"][0] == WHOLE and kinds["n"] == (UNCHANGED, 0) and kinds["i"] == (UNCHANGED, 0)
    assert kinds["w"][0] == INDICES  # step 3's data is gone (keep=1): the union of maps 3->4->5
    idx = torch.frombuffer(bytearray(reply.frames[0]), dtype=torch.int32)
    vals = torch.frombuffer(bytearray(reply.frames[1]), dtype=torch.bfloat16)
    expect = (sds[4]["w"].bfloat16() != sds[2]["w"].bfloat16()).view(-1).nonzero().view(-1)
    assert torch.equal(idx.long(), expect) and torch.equal(vals, sds[4]["w"].bfloat16().view(-1)[expect])
    # the map 2->3 was dropped (change_maps_keep=2): from step 2 there is no chain; a wrong seq is not step 2
    assert error_code(peer.request(Changes(lease=acq.lease, since=2, since_seq=2))) == "unknown_base"
    assert error_code(peer.request(Changes(lease=acq.lease, since=4, since_seq=9))) == "unknown_base"
    assert error_code(peer.request(Changes(lease=acq.lease, since=4, since_seq=4, dtype="f16"))) == "unknown_base"
    same = peer.request(Changes(lease=acq.lease, since=5, since_seq=5, want="counts"))
    assert all(k == UNCHANGED for _, k, _ in same.tensors) and not same.frames
    assert error_code(peer.request(Changes(lease=acq.lease + 1, since=4, since_seq=4))) == "unknown_lease"
    assert error_code(peer.request(Changes(lease=acq.lease, since=4, since_seq=4, fqns=["nope"]))) == "bad_value"
    assert (
        error_code(
            peer.request_raw(
                "changes",
                {"lease": acq.lease, "since": 4, "since_seq": 4, "dtype": "zz", "want": "indices", "fqns": []},
            )
        )
        == "bad_dtype"
    )
    assert (
        error_code(
            peer.request_raw(
                "changes", {"lease": acq.lease, "since": 4, "since_seq": 4, "dtype": "bf16", "want": "all", "fqns": []}
            )
        )
        == "bad_message"
    )


def test_layout_change_makes_the_changed_tensors_whole(make_daemon, raw_peer):
    d = make_daemon(change_maps="bfloat16")
    sds = chain(2)
    stage_all(d, [sds[0], dict(sds[1], b=torch.randn(41))])
    entry = wait_until(lambda: changed(d, 2))["bf16"]
    assert entry["whole"] == 1  # b's shape changed; w is compared as before
    peer = raw_peer(d.endpoint)
    peer.hello(role="reader")
    acq = peer.request(Acquire())
    kinds = {f: k for f, k, _ in peer.request(Changes(lease=acq.lease, since=1, since_seq=1, want="counts")).tensors}
    assert kinds == {"w": INDICES, "b": WHOLE, "n": UNCHANGED, "i": UNCHANGED}


def test_no_change_maps_when_turned_off(make_daemon, raw_peer):
    d = make_daemon(change_maps="none")
    stage_all(d, chain(2))
    assert d.status()["changes"]["dtypes"] == []
    peer = raw_peer(d.endpoint)
    peer.hello(role="reader")
    acq = peer.request(Acquire())
    assert error_code(peer.request(Changes(lease=acq.lease, since=1, since_seq=1))) == "unknown_base"


def test_a_staging_step_takes_memory_a_change_map_pinned(make_daemon):
    """Memory for two versions only, keep=1, and the change-map thread held inside its work (so
    its pins stay): each next step needs the pinned previous version's segment, and gets it at
    once (the map is dropped), with no back-pressure wait allowed."""
    big = {"w": torch.zeros(1 << 20)}  # 4 MiB
    d = make_daemon(keep=1, memory_limit=(8 << 20) + (1 << 16), change_maps="bfloat16")
    release, entered = hold_maps(d)
    try:
        with StagingClient(d.endpoint, strict=True, backpressure_timeout=0) as c:
            for step in range(1, 6):
                big["w"][step] = step
                c.stage(big, step=step).wait(10)
                if step == 2:
                    assert entered.wait(10)
    finally:
        release.set()
    status = d.status()
    assert status["counters"]["memory_refusals"] == 0 and status["counters"]["sealed"] == 5
    assert status["changes"]["skipped"] >= 1


def test_changes_inside_boxes_and_a_base_proven_by_checksums(make_daemon, raw_peer):
    """``boxes``: only the changes inside them, as flat indices of the whole tensor (what a reader
    reading part of a tensor from this node asks). ``sums``: the crc32 of the reader's copy in the
    map's dtype; step 2's prove a base named by its step alone (``since_seq`` 0), others make the
    tensor whole, as does a base named by its step alone without them."""
    from stager.protocol.changes import checksum

    d = make_daemon(change_maps="bfloat16")
    sds = chain(3)
    stage_all(d, sds, settle=True)
    wait_until(lambda: changed(d, 3))
    peer = raw_peer(d.endpoint)
    peer.hello(role="reader")
    acq = peer.request(Acquire())
    w = [sd["w"].bfloat16() for sd in sds]
    flat = (w[2] != w[1]).view(-1).nonzero().view(-1)
    rows = flat[(flat >= 8 * 32) & (flat < 24 * 32)]  # rows 8 to 23
    assert 0 < rows.numel() < flat.numel()
    box = [[8, 0], [16, 32]]
    reply = peer.request(Changes(lease=acq.lease, since=2, since_seq=2, want="values", fqns=["w"], boxes=[[box]]))
    idx = torch.frombuffer(bytearray(reply.frames[0]), dtype=torch.int32)
    vals = torch.frombuffer(bytearray(reply.frames[1]), dtype=torch.bfloat16)
    assert reply.tensors == [["w", INDICES, rows.numel()]]
    assert torch.equal(idx.long(), rows) and torch.equal(vals, w[2].view(-1)[rows])

    def kinds(seq, sums=None):
        got = peer.request(
            Changes(lease=acq.lease, since=2, since_seq=seq, want="counts", fqns=["w", "n"], sums=sums or [])
        )
        return [k for _, k, _ in got.tensors]

    right = [[checksum(w[1])], [checksum(sds[1]["n"].bfloat16())]]
    assert kinds(0, right) == [INDICES, UNCHANGED]
    assert kinds(2, right) == [INDICES, UNCHANGED]
    assert kinds(0, [[right[0][0] ^ 1], right[1]]) == [WHOLE, UNCHANGED]  # w is not step 2's
    assert kinds(0, [None, right[1]]) == [WHOLE, UNCHANGED]  # unproven: no seq, no checksum
    assert kinds(0) == [WHOLE, WHOLE]
    assert kinds(2) == [INDICES, UNCHANGED]  # a seq the reader got from its own load: as before
    bad = Changes(lease=acq.lease, since=2, since_seq=2, fqns=["w"], boxes=[[[[60, 0], [8, 32]]]])
    assert error_code(peer.request(bad)) == "bad_value"


def test_a_map_made_but_not_yet_collected_is_kept_when_a_step_takes_its_memory(make_daemon):
    """keep=1 and memory for two versions: step 3 needs the segment of step 1, which the map of
    step 2 pinned. That map is already made, only not collected by the loop yet (collection held
    off here): the step takes the segment and the map is recorded, not thrown away."""
    big = {"w": torch.zeros(1 << 20)}  # 4 MiB
    d = make_daemon(keep=1, memory_limit=(8 << 20) + (1 << 16), change_maps="bfloat16")
    handlers, maps = d.daemon.handlers, d.daemon.handlers.changes
    collect = handlers.collect_changes
    handlers.collect_changes = lambda: None
    try:
        with StagingClient(d.endpoint, strict=True, backpressure_timeout=0) as c:
            for step in (1, 2):
                big["w"][step] = step
                c.stage(big, step=step).wait(10)
            wait_until(lambda: len(maps._done))  # made, not collected
            big["w"][3] = 3
            c.stage(big, step=3).wait(10)
    finally:
        handlers.collect_changes = collect
    status = d.status()
    assert status["counters"]["memory_refusals"] == 0 and status["counters"]["sealed"] == 3
    assert [step for step, _ in maps.records][:1] == [2]
    assert status["changes"]["skipped"] == 0


def test_an_evicted_version_goes_to_the_pool_at_once_while_its_map_is_still_being_made(make_daemon):
    """keep=2: a map has from its version's seal to the next one (both versions are kept anyway).
    When retention drops the older version and its map is still being made (held here), the map
    is dropped and the segment pooled at once, as without maps: the next step reuses it."""
    big = {"w": torch.zeros(1 << 20)}  # 4 MiB
    d = make_daemon(keep=2, memory_limit=64 << 20, change_maps="bfloat16")
    release, entered = hold_maps(d)
    try:
        with StagingClient(d.endpoint, strict=True) as c:
            for step in (1, 2):
                big["w"][step] = step
                c.stage(big, step=step).wait(10)
            assert entered.wait(10)  # the map of step 2 reads steps 1 and 2
            big["w"][3] = 3
            c.stage(big, step=3).wait(10)  # retention drops step 1
            status = d.status()
    finally:
        release.set()
    assert [v["step"] for v in status["versions"]] == [2, 3]
    assert status["memory"]["pooled"] >= 4 << 20  # step 1's segment, free for step 4
    assert status["changes"]["skipped"] == 1


def test_a_map_that_cannot_be_made_before_the_next_step_is_not_begun(make_daemon):
    """Steps come faster than maps are made (the estimate of a map's time set high here): the map
    is not begun, it is counted as skipped, and its pins end; a reader of that step reads in full."""
    d = make_daemon(change_maps="bfloat16")
    maps = d.daemon.handlers.changes
    sds = chain(3)
    with StagingClient(d.endpoint, strict=True) as c:
        for step in (1, 2):
            c.stage(sds[step - 1], step=step).wait(10)
        wait_until(lambda: changed(d, 2))
        maps._took = 1e9
        c.stage(sds[2], step=3).wait(10)
        wait_until(lambda: d.status()["changes"]["skipped"] == 1 and not maps.working)
    assert changed(d, 2) is not None and changed(d, 3) is None
    assert [step for step, _ in maps.records] == [2]
    assert all(not v.leases for v in d.daemon.state.sealed.values())  # no pin left


def test_a_box_this_node_does_not_hold_is_partial_not_unchanged():
    """A node holding rows 0-3 of an (8, 4) tensor, asked for rows 2-7 or 4-7: it cannot say what
    changed there (PARTIAL, as a Read of them is), rather than answering "unchanged" for rows it lacks."""
    from types import SimpleNamespace

    from stager.daemon.change_replies import _asked
    from stager.protocol import Box

    t = SimpleNamespace(fqn="w", shape=(8, 4), blocks=[SimpleNamespace(box=Box((0, 0), (4, 4)))])
    assert _asked(t, [[[0, 0], [4, 4]], [[1, 1], [2, 2]]]) == [((0, 0), (4, 4)), ((1, 1), (2, 2))]
    for box in ([[2, 0], [6, 4]], [[4, 0], [4, 4]]):
        with pytest.raises(StagerError) as err:
            _asked(t, [box])
        assert err.value.code == ErrorCode.PARTIAL and "holds only part" in err.value.message


class HandStaged:
    """A one-rank trainer driven message by message (a raw peer), so that a test decides when a
    step is in flight: begun and not yet committed. Two tensors of two dtypes: two compared regions."""

    PLAN = wire_plan(["w", "f32", [4096], [0], [4096]], ["h", "bf16", [512], [0], [512]])

    def __init__(self, peer):
        self.peer = peer
        peer.hello()

    def begin(self, step):
        reply = self.peer.request(Begin(step=step, digest=plan_digest(self.PLAN), plan=self.PLAN, full_world=True))
        assert isinstance(reply, BeginReply), reply

    def commit(self, step):
        w = torch.full((4096,), float(step))
        w[:step] = -1.0  # a few elements change per step (indices), the rest too (whole: the map is made either way)
        h = torch.full((512,), float(step), dtype=torch.bfloat16)
        frames = [w.numpy().tobytes(), h.view(torch.int16).numpy().tobytes()]
        assert isinstance(self.peer.request(Put(step=step, regions=[0, 1], frames=frames)), Ok)
        assert isinstance(self.peer.request(Commit(step=step)), Sealed)

    def stage(self, step):
        self.begin(step)
        self.commit(step)


def maps_waiting_or_made(d, step):
    """Status once the map of ``step`` waits for a step in flight (or, were it not to wait, was made)."""
    status = d.status()
    return status if status["changes"].get("yielding") or changed(d, step) is not None else None


def maps_settled(d):
    """The change maps' status once none is queued, being made or uncollected."""
    status = d.status()["changes"]
    return status if not status["pending"] else None


def sealed_while_the_next_is_in_flight(d, raw_peer):
    """Step 1 staged, then step 3 begun before step 2 seals: the map of step 2 (the daemon's first,
    never judged late) is due while a step is in flight. Returns the trainer and the daemon's status
    once the map waits (or, were it not to wait, was made)."""
    trainer = HandStaged(raw_peer(d.endpoint))
    trainer.stage(1)
    trainer.begin(2)
    trainer.begin(3)  # in flight from here
    trainer.commit(2)
    return trainer, wait_until(lambda: maps_waiting_or_made(d, 2))


@pytest.fixture
def long_hold(monkeypatch):
    """Steps in flight hold map work back however long they are (the tests' steps wait for the test)."""
    monkeypatch.setattr(change_gate, "MAX_HOLD_S", 600.0)


@pytest.mark.parametrize("end", ["seal", "failure"])
def test_a_map_waits_while_a_step_is_in_flight_and_is_made_once_it_ends(make_daemon, raw_peer, end, long_hold):
    """Map work yields to staging: step 2 seals while step 3 is in flight (begun, not committed), so
    its map waits, with no region compared, until step 3 seals or fails; then it is made (keep=3:
    step 1, its base, is still kept after step 3 seals)."""
    d = make_daemon(keep=3, change_maps="bfloat16")
    trainer, status = sealed_while_the_next_is_in_flight(d, raw_peer)
    assert changed(d, 2) is None, "a change map was made while a step was in flight"
    assert status["changes"]["regions"] == 0 and status["changes"]["pending"]
    assert status["changes"]["yields"] == 1 and status["changes"]["yielding"]
    if end == "seal":
        trainer.commit(3)
    else:
        assert isinstance(trainer.peer.request(Abort(step=3, reason="test: a step that fails")), Ok)
    assert wait_until(lambda: changed(d, 2))["bf16"]["since"] == 1
    status = wait_until(lambda: maps_settled(d))
    # the two regions of step 2's map (and those of step 3's, unless it was judged late: not begun)
    assert status["regions"] >= 2 and not status["yielding"]


def test_steps_in_flight_without_a_break_hold_map_work_back_only_so_long(make_daemon, raw_peer, monkeypatch):
    """A trainer that always has a step in flight (step 3 begun before step 2 sealed, and kept in flight)
    still gets its maps: past MAX_HOLD_S of steps in flight without a break, map work goes on beside them."""
    monkeypatch.setattr(change_gate, "MAX_HOLD_S", 0.5)
    d = make_daemon(keep=3, change_maps="bfloat16")
    trainer = HandStaged(raw_peer(d.endpoint))
    trainer.stage(1)
    trainer.begin(2)
    trainer.begin(3)  # in flight from here until the end of the test
    trainer.commit(2)
    assert wait_until(lambda: changed(d, 2))["bf16"]["since"] == 1  # made while step 3 is in flight
    status = d.status()["changes"]
    assert status["overridden"] == 1 and status["regions"] >= 2
    trainer.commit(3)  # sealed: step 3 was in flight all along


def test_a_map_being_made_stops_when_a_step_begins_and_goes_on_after_it(make_daemon, raw_peer, long_hold):
    """The map of step 2 has begun (held at its start here) when step 3 begins: it stops at its next
    region (status: yielding, no region compared yet) and goes on once step 3 sealed."""
    d = make_daemon(keep=3, change_maps="bfloat16")
    release, entered = hold_maps(d)
    trainer = HandStaged(raw_peer(d.endpoint))
    try:
        trainer.stage(1)
        trainer.stage(2)
        assert entered.wait(10)  # the map of step 2 has begun
        trainer.begin(3)
    finally:
        release.set()
    status = wait_until(lambda: maps_waiting_or_made(d, 2))
    assert changed(d, 2) is None, "a change map went on while a step was in flight"
    assert status["changes"]["regions"] == 0 and status["changes"]["yields"] == 1
    trainer.commit(3)
    assert wait_until(lambda: changed(d, 2))["bf16"]["since"] == 1
    assert d.status()["changes"]["regions"] >= 2


def tracked_from(root) -> int:
    """GC-tracked objects reachable from ``root`` through tracked objects (itself included): what a
    full collection walks for it. Types, modules and functions are shared by everything: not followed."""
    leaves = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    seen, todo = {id(root)}, [root]
    while todo:
        for ref in gc.get_referents(todo.pop()):
            if gc.is_tracked(ref) and not isinstance(ref, leaves) and id(ref) not in seen:
                seen.add(id(ref))
                todo.append(ref)
    return len(seen)


def test_a_kept_map_holds_as_few_gc_tracked_objects_for_5000_tensors_as_for_10(make_daemon):
    """Up to 64 maps are kept, long-lived: per-tensor Python objects in them grew the heap by ~1200
    objects per map of 1000 tensors, set off full collections and made each one walk them (~100 ms
    holding the GIL: the loop answered no Begin meanwhile). A kept map holds the same handful of
    tracked objects whatever its tensor count, with unchanged, indexed and whole tensors in it."""
    held = []
    for n in (10, 5000):
        d = make_daemon(change_maps="bfloat16")
        g = torch.Generator().manual_seed(n)
        first = {f"layers.{i}.w": torch.randn(64, generator=g) for i in range(n)}
        second = {k: v.clone() for k, v in first.items()}
        for i, t in enumerate(second.values()):
            if i % 3 == 0:
                t[i % 64] += 0.5  # one element of 64: indices
            elif i % 3 == 1:
                t.copy_(torch.randn(64, generator=g))  # whole
        stage_all(d, [first, second], settle=True)
        records = list(d.daemon.handlers.changes.records.values())
        assert len(records) == 1 and changed(d, 2)["bf16"]["tensors"] == [n - n // 3, n]
        gc.collect()  # what a collection untracks (tuples and dicts of atomics) is not held against it
        held.append(tracked_from(records[0]))
    assert held[0] == held[1] <= 8, f"tracked objects of a kept map of 10 tensors, of 5000: {held}"
