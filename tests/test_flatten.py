import pytest
import torch

from stager.client.hook.flatten import LayoutCache, flatten_state_dict
from stager.protocol import ErrorCode, StagerError

pytestmark = pytest.mark.fast  # the fast tier: no daemon process, no torch.distributed job


def test_nested_and_flat_keys():
    sd = {
        "model": {"a.w": torch.ones(2), "b": {"w": torch.zeros(1)}},
        "step": 5,
        "lrs": [0.1, 0.2],
        "extra": {"name": "x", "blob": b"\x00", "none": None, "ok": True},
        "empty": {},
    }
    tensors, objects = flatten_state_dict(sd)
    assert sorted(tensors) == ["model.a.w", "model.b.w"]
    assert objects == {
        "step": 5,
        "lrs": [0.1, 0.2],
        "extra.name": "x",
        "extra.blob": b"\x00",
        "extra.none": None,
        "extra.ok": True,
        "empty": {},
    }


def test_optimizer_int_keys():
    tensors, _ = flatten_state_dict({"state": {0: {"exp_avg": torch.ones(1)}}})
    assert list(tensors) == ["state.0.exp_avg"]


@pytest.mark.parametrize(
    "sd,text",
    [
        ({"a": {"b": torch.ones(1)}, "a.b": torch.ones(1)}, "same dotted name"),
        ({"x": [torch.ones(1)]}, "tensors inside lists"),
        ({"x": object()}, "type object cannot be staged"),
        ({"x": 1 << 70}, "does not fit 64 bits"),
        ({("t",): torch.ones(1)}, "keys must be str"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_bad_leaves_name_the_key(sd, text):
    with pytest.raises(StagerError) as info:
        flatten_state_dict(sd)
    assert info.value.code == ErrorCode.BAD_VALUE and text in info.value.message


def test_plain_tensor_plan_and_unsupported_subclass():
    plan, locals_ = LayoutCache().describe({"w": torch.ones(2, 3, dtype=torch.bfloat16)})
    assert [e.to_wire() for e in plan] == [["w", "bf16", [2, 3], [0, 0], [2, 3]]]

    class Sub(torch.Tensor):
        pass

    with pytest.raises(StagerError) as info:
        LayoutCache().describe({"w": torch.ones(2).as_subclass(Sub)})
    assert "Sub" in info.value.message and info.value.message.startswith("w:")


def test_host_copy_handles_every_kind_of_source():
    from stager.client.hook.copier import BULK_BYTES, host_copy

    big = torch.randn(BULK_BYTES // 4 + 3)
    cplx = torch.randn(BULK_BYTES // 8, dtype=torch.complex64)
    srcs = [big, cplx.conj(), torch.randn(64, 32).t(), torch.nn.Parameter(torch.randn(5)), -torch.ones(3)]
    dsts = [torch.empty(s.shape, dtype=s.dtype) for s in srcs]
    host_copy(dsts, srcs)
    for d, s in zip(dsts, srcs):
        assert torch.equal(d, s.detach().resolve_conj())
    assert not dsts[3].requires_grad


def test_write_spans_cover_exactly_the_rank_rows():
    from stager.client.hook.writer import write_spans
    from stager.protocol.layout import assignment_from_wire, plan_from_wire

    plan = plan_from_wire(
        [["w", "f32", [8, 4], [4, 0], [4, 4]], ["b", "f32", [8], [0], [8]], ["t", "f32", [4, 6], [0, 3], [4, 3]]]
    )
    assignment = assignment_from_wire([[0, [8, 4], [4, 0]], None, [8192, [4, 6], [0, 3]]])
    assert write_spans(plan, assignment) == [(64, 128), (8192 + 12, 8192 + 96)]


@pytest.mark.parametrize(
    "dst_off,src_off,n", [(0, 0, 1 << 20), (3, 5, (1 << 20) + 7), (61, 0, 300), (0, 1, 255), (7, 9, 0)]
)
def test_bulk_copy_any_alignment(dst_off, src_off, n):
    from stager.client.hook.copier import _bulk_copy

    src = torch.randint(0, 255, (n + 64,), dtype=torch.uint8)
    dst = torch.zeros(n + 64, dtype=torch.uint8)
    _bulk_copy(dst.data_ptr() + dst_off, src.data_ptr() + src_off, n)
    assert torch.equal(dst[dst_off : dst_off + n], src[src_off : src_off + n])
    assert not dst[:dst_off].any() and not dst[dst_off + n :].any()  # nothing written outside
