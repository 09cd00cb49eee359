"""The streaming safetensors writer alone: what it writes, and how it fails (no daemon)."""

import zlib

import pytest
import torch
from safetensors.torch import load_file

from stager.formats import safetensors_io
from stager.formats.safetensors_io import tensor_bytes, write_safetensors

pytestmark = pytest.mark.fast  # the fast tier: no daemon process, no torch.distributed job


def tensors():
    return [
        ("a", torch.arange(12, dtype=torch.float32).reshape(3, 4)),
        ("b", torch.ones(0, 5, dtype=torch.bfloat16)),
        ("c", torch.arange(300_000, dtype=torch.int64)),
        ("d", torch.full((7,), -1.5, dtype=torch.float16)),
    ]


def specs(items):
    return [(n, tuple(t.shape), t.dtype) for n, t in items]


def test_round_trip_with_checksums_of_the_bytes_written(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_io, "WRITEBACK_BYTES", 1 << 20)  # writeback starts mid-file too
    items, sums = tensors(), {}
    path = str(tmp_path / "m.safetensors")
    size = write_safetensors(path, specs(items), lambda: iter(items), {"format": "pt"}, checksums=sums)
    assert size == (tmp_path / "m.safetensors").stat().st_size
    loaded = load_file(path)
    for name, t in items:
        assert torch.equal(loaded[name], t) and loaded[name].dtype == t.dtype
        assert sums[name] == f"{zlib.crc32(bytes(tensor_bytes(t))) & 0xFFFFFFFF:08x}"


def _raising():
    yield "a", torch.zeros(3, 4)
    raise RuntimeError("the reader lost its daemon")


@pytest.mark.parametrize(
    "produce, error, match",
    [
        (lambda: iter([("a", torch.zeros(3, 4)), ("x", torch.zeros(2))]), ValueError, "produced .* planned b"),
        (lambda: iter([("a", torch.zeros(3, 5))]), ValueError, r"a: produced \(3, 5\)"),
        (lambda: iter([("a", torch.zeros(3, 4, dtype=torch.float64))]), ValueError, "torch.float64"),
        (lambda: iter([("a", torch.zeros(3, 4))]), ValueError, "fewer tensors produced than planned"),
        (_raising, RuntimeError, "lost its daemon"),
    ],
)
def test_a_bad_producer_fails_the_write_with_its_error(tmp_path, produce, error, match):
    planned = [("a", (3, 4), torch.float32), ("b", (2,), torch.float32)]
    with pytest.raises(error, match=match):
        write_safetensors(str(tmp_path / "m.safetensors"), planned, produce)


def test_a_failing_disk_write_raises_in_the_caller(tmp_path, monkeypatch):
    def full_disk(self, data, _keepalive):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io._FileWriter, "write", full_disk)
    items = tensors()
    with pytest.raises(OSError, match="No space left"):
        write_safetensors(str(tmp_path / "m.safetensors"), specs(items), lambda: iter(items))
