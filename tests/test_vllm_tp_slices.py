"""A tensor-parallel vLLM worker reads only its rank's slices, learned from its loaders (.tp_slices).

No vLLM here: the loaders are written as vLLM 0.32's are (a column-parallel linear narrows dim 0 by
its rank, a row-parallel one dim 1, a norm copies the whole tensor), and run as its layerwise reload
runs them: once on a meta parameter under a copy-counting dispatch mode, then again on the real one.
The real engine, tensor parallel size 2 over frames: examples/vllm_tp.py (not in CI).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stager.client import StagingClient, Subscriber
from stager.integrations.vllm import tp_slices
from stager.integrations.vllm.tp_slices import Probe, Slices, Watch, box_of, verdict

N = ("narrow",)


@pytest.mark.fast
@pytest.mark.parametrize(
    "events, shape, expected",
    [
        ([N + (0, 4, 4)], (8, 4), (0, 4, 4)),
        ([N + (0, 4, 4), N + (0, 4, 4)], (8, 4), (0, 4, 4)),  # vLLM's layerwise reload replays the loader
        ([N + (0, 4, 4), N + (0, 0, 4)], (8, 4), None),  # two different narrows
        ([N + (1, 2, 2), ("use", "copy_")], (8, 4), None),
        ([("use", "clone")], (8, 4), None),
        ([], (8, 4), None),  # never loaded (skipped, tied, another pipeline stage): nothing known
        ([N + (0, 0, 8)], (8, 4), None),  # the whole of it: nothing to save
        ([N + (0, 0, 4), ("use", "kept after the update")], (8, 4), None),
    ],
)
def test_verdicts(events, shape, expected):
    assert verdict(events, shape) == expected


def narrowed_then_used(t):
    part = t.narrow(0, 4, 4)
    return (part.t().contiguous() + 1).sum()  # what is done with the narrowed tensor is the loader's own


def metadata_then_narrow(t):
    assert len(t.shape) == 2 and t.ndim == 2 and t.dim() == 2 and t.dtype == torch.float32
    assert t.size(0) == 8 and t.numel() == 32 and t.device.type == "cpu" and not t.is_meta
    t.shard_id = "q"  # vLLM's WeightsMapper tags stacked shards so
    assert getattr(t, "shard_id", None) == "q"
    return t.narrow(0, 4, 4)


OPS = [
    ("column parallel", lambda t: t.narrow(0, 4, 4), (0, 4, 4)),
    ("row parallel", lambda t: t.narrow(1, 2, 2), (1, 2, 2)),
    ("torch.narrow, keywords, negative dim", lambda t: torch.narrow(t, dim=-1, start=2, length=2), (1, 2, 2)),
    ("negative start", lambda t: t.narrow(0, -4, 4), (0, 4, 4)),
    ("replayed", lambda t: (t.narrow(0, 4, 4), t.narrow(0, 4, 4))[1], (0, 4, 4)),
    ("metadata, then a narrow", metadata_then_narrow, (0, 4, 4)),
    ("the narrowed part used", narrowed_then_used, (0, 4, 4)),
    ("slice of rows", lambda t: t[4:8], (0, 4, 4)),
    ("slice of columns", lambda t: t[:, 2:4], (1, 2, 2)),
    ("ellipsis", lambda t: t[..., 2:4], (1, 2, 2)),
    ("two narrows", lambda t: (t.narrow(0, 0, 4), t.narrow(0, 4, 4))[1], None),
    ("a narrow of all of it", lambda t: t.narrow(0, 0, 8), None),
    ("slice along two dims", lambda t: t[4:8, 2:4], None),
    ("integer index", lambda t: t[0], None),
    ("strided slice", lambda t: t[::2], None),
    ("tensor index", lambda t: t[torch.tensor([1, 2])], None),
    ("copy_ from it", lambda t: torch.zeros(8, 4).copy_(t), None),
    ("clone", lambda t: t.clone(), None),
    ("to", lambda t: t.to(torch.float64), None),
    ("view", lambda t: t.view(4, 8), None),
    ("t", lambda t: t.t(), None),
    ("arithmetic", lambda t: t * 2, None),
    ("metadata only", lambda t: torch.tensor([t.shape[0], t.ndim, t.numel(), t.dtype.itemsize]), None),
    ("a narrow, then the whole copied", lambda t: (t.narrow(0, 4, 4), torch.zeros(8, 4).copy_(t))[1], None),
    ("parameter", lambda t: torch.nn.Parameter(t, requires_grad=False), None),
]


@pytest.mark.fast
@pytest.mark.parametrize("what, op, expected", OPS, ids=[o[0] for o in OPS])
def test_what_a_loader_does_with_a_probe_decides_its_slice(what, op, expected):
    real = torch.arange(32.0).reshape(8, 4)
    watch = Watch()
    got = op(Probe.wrap(real, watch))
    assert verdict(watch.events, (8, 4)) == expected
    want = op(real.clone())  # the data flow is today's: the probe is the tensor
    assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))


@pytest.mark.fast
def test_box_of_a_narrow():
    assert box_of((8, 4, 2), (1, 2, 2)) == ((0, 2, 0), (8, 2, 2))
    assert box_of((6,), (0, 3, 3)) == ((3,), (3,))


class CopyCounter(TorchDispatchMode):
    """What vLLM 0.32's layerwise reload counts a loader's work with (model_loader/reload/meta.py)."""

    def __init__(self):
        super().__init__()
        self.copied = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            self.copied += args[0].numel()
        return func(*args, **(kwargs or {}))


def column_loader(rank):
    def load(param, loaded):  # ColumnParallelLinear.weight_loader
        shard = param.data.shape[0]
        loaded = loaded.narrow(0, rank * shard, shard)
        assert param.data.shape == loaded.shape
        param.data.copy_(loaded)

    return load


def row_loader(rank):
    def load(param, loaded):  # RowParallelLinear.weight_loader
        shard = param.data.shape[1]
        loaded = loaded.narrow(1, rank * shard, shard)
        assert param.data.shape == loaded.shape
        param.data.copy_(loaded)

    return load


def whole_loader(param, loaded):  # default_weight_loader (norms)
    assert param.size() == loaded.size()
    param.data.copy_(loaded)


def layerwise(loader, param, loaded) -> int:
    """As vLLM's layerwise reload: the loader once on a meta parameter under the copy counter (the
    numel it loads), then, the layer complete, again on the real parameter with the same arguments."""
    with CopyCounter() as counter:
        loader(torch.empty_like(param, device="meta"), loaded)
    loader(param, loaded)
    return counter.copied


def weights(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "col.weight": torch.randn(8, 6, generator=g),
        "row.weight": torch.randn(6, 8, generator=g),
        "norm.weight": torch.randn(6, generator=g),
    }


class Worker:
    """One tensor-parallel rank of 2: its parameters, loaders and learned slices."""

    def __init__(self, rank: int):
        self.rank = rank
        self.slices = Slices(rank, 2)
        self.params = {"col.weight": torch.zeros(4, 6), "row.weight": torch.zeros(6, 4), "norm.weight": torch.zeros(6)}
        self.loaders = {"col.weight": column_loader(rank), "row.weight": row_loader(rank), "norm.weight": whole_loader}

    def update(self, snap, loaders=None) -> tuple[int, int]:
        """Load ``snap`` as the engine does; returns (bytes read, numel the copy counter saw)."""
        loaders = {**self.loaders, **(loaders or {})}
        read = counted = 0
        for name, tensor, nbytes in self.slices.items(snap, list(snap)):
            read += nbytes
            counted += layerwise(loaders[name], self.params[name], tensor)
            del tensor
        self.slices.end(ok=True)
        return read, counted

    def expected(self, w: dict) -> dict:
        r = self.rank
        return {"col.weight": w["col.weight"][4 * r : 4 * r + 4], "row.weight": w["row.weight"][:, 4 * r : 4 * r + 4]}


def stage(endpoint: str, steps) -> None:
    with StagingClient(endpoint, strict=True) as client:
        for step in steps:
            client.stage(weights(step), step=step, model_info={"adapter": "identity"}).wait(30)


def read_bytes(daemon) -> int:
    return daemon.status()["counters"]["read_bytes"]


def test_a_remote_rank_learns_its_slices_then_reads_only_them(make_daemon):
    d = make_daemon(keep=4)
    stage(d.endpoint, [1, 2, 3])
    whole = sum(t.nbytes for t in weights(1).values())
    with Subscriber(d.endpoint, view="hf", remote=True) as sub:
        for rank in (0, 1):
            worker = Worker(rank)
            with sub.at(1) as snap:
                before = read_bytes(d)
                read, counted = worker.update(snap)
                assert read == whole and read_bytes(d) - before == whole  # learning reads whole tensors
            assert counted == sum(p.numel() for p in worker.params.values())
            assert worker.slices.learned() == {
                "col.weight": (0, 4 * rank, 4),
                "row.weight": (1, 4 * rank, 4),
                "norm.weight": None,  # copied whole: each rank needs all of it
            }
            for step in (2, 3):
                with sub.at(step) as snap:
                    before = read_bytes(d)
                    read, counted = worker.update(snap)
                    sliced = (4 * 6 + 6 * 4) * 4 + 6 * 4
                    assert read == sliced and read_bytes(d) - before == sliced
                assert counted == sum(p.numel() for p in worker.params.values())  # the reload's accounting holds
                w = weights(step)
                for name, want in worker.expected(w).items():
                    assert torch.equal(worker.params[name], want), (rank, step, name)
                assert torch.equal(worker.params["norm.weight"], w["norm.weight"])


def test_a_loader_that_does_more_than_the_learned_narrow_gets_the_whole_tensor(make_daemon):
    d = make_daemon(keep=4)
    stage(d.endpoint, [1, 2, 3])
    with Subscriber(d.endpoint, view="hf", remote=True) as sub:
        worker = Worker(1)
        with sub.at(1) as snap:
            worker.update(snap)
        seen = {}

        def other(param, loaded):  # reads the whole tensor (and a narrow the rank never learned)
            seen["whole"] = loaded.clone()
            column_loader(0)(param, loaded)

        with sub.at(2) as snap:
            _, counted = worker.update(snap, {"col.weight": other})
        assert torch.equal(seen["whole"], weights(2)["col.weight"])  # filled from the version first
        assert torch.equal(worker.params["col.weight"], weights(2)["col.weight"][:4])
        assert counted == sum(p.numel() for p in worker.params.values())  # the fill is not the loader's copy
        assert worker.slices.learned()["col.weight"] is None  # whole from now on
        assert worker.slices.learned()["row.weight"] == (1, 4, 4)


def test_a_tensor_the_loader_keeps_is_read_whole(make_daemon):
    d = make_daemon(keep=4)
    stage(d.endpoint, [1])
    kept = []

    def keeping(param, loaded):  # holds the tensor beyond the update (a cache, a lazy loader)
        kept.append(loaded)
        column_loader(0)(param, loaded)

    with Subscriber(d.endpoint, view="hf", remote=True) as sub, sub.at(1) as snap:
        worker = Worker(0)
        worker.update(snap, {"col.weight": keeping})
    assert worker.slices.learned()["col.weight"] is None
    assert worker.slices.learned()["row.weight"] == (1, 0, 4)


def test_a_failed_update_learns_nothing_and_forget_drops_what_was_learned(make_daemon):
    d = make_daemon(keep=4)
    stage(d.endpoint, [1, 2])
    with Subscriber(d.endpoint, view="hf", remote=True) as sub:
        worker = Worker(0)
        with sub.at(1) as snap:
            for name, tensor, _ in worker.slices.items(snap, list(snap)):
                layerwise(worker.loaders[name], worker.params[name], tensor)
            worker.slices.end(ok=False)
        assert worker.slices.learned() == {}
        with sub.at(1) as snap:
            worker.update(snap)
        assert worker.slices.learned()["col.weight"] == (0, 0, 4)
        worker.slices.forget()
        assert worker.slices.learned() == {}
        with sub.at(2) as snap:
            read, _ = worker.update(snap)
        assert read == sum(t.nbytes for t in weights(2).values())  # whole again: learning


def test_on_the_daemon_s_host_tensors_stay_views_and_nothing_is_learned(make_daemon):
    d = make_daemon(keep=4)
    stage(d.endpoint, [1])
    with Subscriber(d.endpoint, view="hf") as sub, sub.at(1) as snap:
        worker = Worker(0)
        got = list(worker.slices.items(snap, list(snap)))
        assert all(type(t) is torch.Tensor and snap.is_zero_copy(t) for _, t, _ in got)
        assert worker.slices.end(ok=True) == 0
    assert worker.slices.learned() == {}


@pytest.mark.fast
def test_one_worker_never_probes():
    class Snap:
        def items(self, names):
            return iter([(n, torch.ones(2)) for n in names])

    got = list(Slices(0, 1).items(Snap(), ["a"]))
    assert [(n, type(t), b) for n, t, b in got] == [("a", torch.Tensor, 8)]
    assert tp_slices.Slices(0, 1).end(ok=True) == 0
