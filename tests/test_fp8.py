"""Float8 state: training wrappers staged in high precision; fp8 data + scale dequantized or kept."""

import pytest
import torch

from helpers import lazy_importorskip

lazy_importorskip("torchao.float8")

from stager.client import StagingClient, Subscriber  # noqa: E402
from stager.dev.launch import DaemonProcess, run_ranks  # noqa: E402
from stager.protocol import ErrorCode, StagerError  # noqa: E402
from stager.protocol.quant import QuantSpec, check_quant, dequantize, scale_blocks  # noqa: E402


def float8_fsdp_job(rank, world, endpoint):
    import warnings

    warnings.filterwarnings("ignore")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    from stager.client import StagingClient, Subscriber

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 16))  # 48 rows: 24 + 24; 16: 8 + 8
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    convert_to_float8_training(model, config=Float8LinearConfig(enable_fsdp_float8_all_gather=True))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    state = model.state_dict()
    assert isinstance(state["0.weight"]._local_tensor, WeightWithDynamicFloat8CastTensor)
    client = StagingClient(endpoint, strict=True)
    client.stage(state, step=1).wait(60)
    with torch.no_grad():  # an "optimizer step" on the high-precision weights inside the wrappers
        for layer in model:
            layer.weight._local_tensor._tensor.add_(1.0)
    client.stage(model.state_dict(), step=2).wait(60)
    client.close()
    torch.distributed.barrier()
    if rank == 0:
        with Subscriber(endpoint) as sub, sub.latest() as snap:
            assert snap.step == 2
            for k, v in reference.items():
                expected = v + 1.0 if k.endswith("weight") else v
                assert type(snap[k]) is torch.Tensor and snap[k].dtype == torch.float32
                assert torch.equal(snap[k], expected), k
    return True


def test_fsdp2_float8_training_weights_are_staged_in_high_precision():
    with DaemonProcess(args=("--memory-limit", "64MiB")) as daemon:
        assert run_ranks(float8_fsdp_job, 2, daemon.endpoint) == [True, True]


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize(
    "data_shape,scale_shape,mode",
    [
        ((4, 6), (), "div"),  # torchao: one scale, hp = data / scale
        ((4, 6), (1,), "mul"),
        ((4, 6), (4, 1), "mul"),  # per row
        ((300, 200), (3, 2), "mul"),  # 128 x 128 blocks (DeepSeek-V3), ragged last block
        ((5,), (5,), "div"),
    ],
)
def test_dequantize_matches_a_reference_loop(data_shape, scale_shape, mode):
    data = torch.randn(data_shape).to(FP8)
    scale = torch.rand(scale_shape) + 0.5
    spec = QuantSpec("s", mode, "f32")
    expected = data.float().clone()
    blocks = scale_blocks("w", data_shape, tuple(scale.shape))
    for index in torch.cartesian_prod(*[torch.arange(n) for n in data_shape]).view(-1, len(data_shape)).tolist():
        s = scale.reshape(()) if blocks is None else scale[tuple(i // b for i, b in zip(index, blocks))]
        value = data[tuple(index)].float()
        expected[tuple(index)] = value * s if mode == "mul" else value / s
    assert torch.equal(dequantize(data, scale, spec), expected)
    assert dequantize(data, scale, spec, torch.bfloat16).dtype == torch.bfloat16


GOOD = {"w": ("f8e4m3", (4, 6)), "s": ("f32", (4, 1)), "b": ("bf16", (4,))}


@pytest.mark.parametrize(
    "raw,text",
    [
        ({"w": {"scale": "s", "mode": "mul"}}, "exactly 'scale', 'mode' and 'dtype'"),
        ({"w": {"scale": "s", "mode": "pow", "dtype": "f32"}}, "mode must be one of"),
        ({"w": {"scale": "s", "mode": "mul", "dtype": "f8e4m3"}}, "high-precision dtype"),
        ({"w": {"scale": "gone", "mode": "mul", "dtype": "f32"}}, "not in the staged state dict"),
        ({"b": {"scale": "s", "mode": "mul", "dtype": "f32"}}, "only float8 data"),
        ({"w": {"scale": "w", "mode": "mul", "dtype": "f32"}}, "must name another tensor"),
        ({"w": {"scale": "b", "mode": "mul", "dtype": "f32"}}, "does not fit data shape"),
    ],
)
def test_bad_quantization_metadata_names_the_tensor(raw, text):
    with pytest.raises(StagerError) as info:
        check_quant(raw, GOOD)
    assert text in info.value.message and info.value.code == ErrorCode.BAD_VALUE


def test_torchao_float8_tensors_dequantize_or_stay_fp8_on_request(make_daemon):
    from torchao.float8.float8_training_tensor import hp_tensor_and_scale_to_float8

    d = make_daemon()
    hp = torch.randn(64, 32, dtype=torch.bfloat16)
    fp8 = hp_tensor_and_scale_to_float8(hp, torch.tensor(3.0), FP8)
    block_data = torch.randn(300, 200).to(FP8)  # an HF fp8 checkpoint tensor with 128x128 block scales
    block_scale = torch.rand(3, 2) + 0.5
    sd = {"w": fp8, "plain": torch.arange(4.0), "e.weight": block_data, "e.weight_scale_inv": block_scale}
    with StagingClient(d.endpoint, strict=True) as c:
        c.stage(sd, step=1).wait(10)
    with Subscriber(d.endpoint) as sub, sub.latest() as snap:
        assert sorted(snap) == ["e.weight", "plain", "w"]  # scales are consumed by dequantization
        assert snap.quant["w"] == QuantSpec("w:scale", "div", "bf16")
        assert torch.equal(snap["w"], fp8.to_original_precision())
        assert snap["w"].dtype == torch.bfloat16
        expected = dequantize(block_data, block_scale, QuantSpec("s", "mul", "bf16"))
        assert torch.equal(snap["e.weight"], expected) and torch.equal(dict(snap.items())["e.weight"], expected)
        assert torch.equal(snap["plain"], sd["plain"])
    with Subscriber(d.endpoint, keep_fp8=True) as sub, sub.latest() as snap:
        assert sorted(snap) == ["e.weight", "e.weight_scale_inv", "plain", "w", "w:scale"]
        assert snap["w"].dtype == FP8 and torch.equal(snap["w"].view(torch.uint8), fp8._data.view(torch.uint8))
        assert torch.equal(snap["w:scale"], fp8._scale)
    with Subscriber(d.endpoint, dtype="float32", remote=True) as sub, sub.latest() as snap:
        assert snap["w"].dtype == torch.float32
        assert torch.equal(snap["w"], fp8._data.float() / 3.0)


def test_unknown_tensor_subclasses_are_refused_by_name():
    from torch.testing._internal.two_tensor import TwoTensor

    from stager.client.hook.flatten import unwrap

    with pytest.raises(StagerError) as info:
        unwrap("layers.0.w", TwoTensor(torch.zeros(2), torch.zeros(2)))
    assert info.value.code == ErrorCode.BAD_VALUE
    assert "TwoTensor" in info.value.message and "layers.0.w" in info.value.message
