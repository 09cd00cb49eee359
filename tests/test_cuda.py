"""The CUDA path: non-blocking D2H copies on a side stream into the registered segment.

Skipped without CUDA (as in CI); run on a GPU machine to exercise it.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_tensors_stage_bit_exact_and_train_stream_orders_after_copy(make_daemon):
    from stager.client import StagingClient, Subscriber

    d = make_daemon(memory_limit=1 << 30)
    torch.cuda.init()
    sd = {
        "w": torch.randn(4096, 1024, device="cuda"),
        "b": torch.randn(1024, device="cuda").bfloat16(),
        "cpu": torch.arange(7),
    }
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
        for step in range(1, 4):
            expected = {k: v.cpu().clone() for k, v in sd.items()}
            handle = client.stage(sd, step=step)
            assert handle.wait_copied()
            sd["w"].add_(1.0)  # ordered after the copy on the current stream: must not leak into step
            handle.wait(30)
            with Subscriber(d.endpoint) as sub, sub.latest() as snap:
                assert snap.step == step
                for k, v in expected.items():
                    assert torch.equal(snap[k], v), k
        pinned = client.pinned_segments
        assert pinned, "segments must be page-locked once with cudaHostRegister"
        assert pinned <= 3  # keep=2 + 1 in flight, registered once each


def test_restore_fills_device_tensors_through_the_pinned_path(make_daemon, monkeypatch):
    from stager.client import StagingClient
    from stager.client.hook import restore as restore_mod

    d = make_daemon(memory_limit=1 << 30)
    staged = {"w": torch.randn(3000, 1024), "b": torch.randn(1024).bfloat16(), "odd": torch.randn(5, 7).t()}
    copies = []
    real = restore_mod.PinnedUpload.copy
    monkeypatch.setattr(
        restore_mod.PinnedUpload, "copy", lambda self, dst, src: copies.append(dst.shape) or real(self, dst, src)
    )
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, strict=True) as client:
        client.stage(staged, step=1).wait(30)
        sd = {k: torch.zeros(v.shape, dtype=v.dtype, device="cuda") for k, v in staged.items()}
        sd["odd"] = torch.zeros(5, 7, device="cuda").t()  # a non-contiguous destination: the plain copy
        monkeypatch.setattr(restore_mod, "PINNED_CHUNK", 1 << 20)  # many chunks: the two buffers alternate
        assert client.restore(sd) == 1
    assert all(torch.equal(sd[k].cpu(), v) for k, v in staged.items())
    assert len(copies) == 3  # every device tensor went through the pinned path
