"""Float8 training state (torchao) is staged as plain high-precision tensors."""

import pytest
import torch

pytest.importorskip("torchao.float8")

from stager.launch import DaemonProcess, run_ranks  # noqa: E402


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


def test_fp8_data_with_scale_is_refused_by_name_until_dequantization_lands():
    """Real fp8 data + scale needs typed quantization metadata on the wire (the persist issue);
    until then it is refused with a message naming the type and its inner tensors, never pickled."""
    from torchao.float8.float8_training_tensor import hp_tensor_and_scale_to_float8

    from stager.client.flatten import unwrap
    from stager.protocol import ErrorCode, StagerError

    fp8 = hp_tensor_and_scale_to_float8(torch.randn(4, 4), torch.tensor(2.0), torch.float8_e4m3fn)
    with pytest.raises(StagerError) as info:
        unwrap("layers.0.w", fp8)
    assert info.value.code == ErrorCode.BAD_VALUE
    assert "Float8TrainingTensor" in info.value.message and "_scale" in info.value.message
