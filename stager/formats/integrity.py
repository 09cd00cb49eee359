"""Per-tensor checksums, export verification and diffs (the checkpointing wish list's mismatch tools).

Every export carries ``stager-manifest.json``: per tensor its dtype, shape and crc32 of the bytes
as written, computed by the writer process (off the trainer's path). ``verify`` re-reads an HF or
DCP export and names every tensor whose bytes changed; ``diff`` compares two exports, or an
export and a sealed version, tensor by tensor.
"""

from __future__ import annotations

import glob
import json
import os
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from stager.formats.safe_dcp import (  # noqa: F401  (UnsafeCheckpoint: raised through read_tensors)
    METADATA,
    DamagedCheckpoint,
    UnsafeCheckpoint,
    quiet_single_process_dcp,
    read_dcp_tensors,
)
from stager.formats.safetensors_io import tensor_bytes
from stager.protocol import ErrorCode, StagerError

quiet_single_process_dcp()

MANIFEST = "stager-manifest.json"


def checksum(tensor: torch.Tensor) -> str:
    """crc32 (hex) of a tensor's bytes, row-major."""
    dense = tensor.detach().contiguous().cpu()  # held: tensor_bytes' view does not keep a copy alive
    return f"{zlib.crc32(tensor_bytes(dense)) & 0xFFFFFFFF:08x}"


def entry(tensor: torch.Tensor, crc32: str | None = None) -> dict:
    """The manifest entry of ``tensor``; ``crc32`` when the writer already computed it while writing."""
    return spec_entry(tensor.dtype, tensor.shape, crc32 if crc32 is not None else checksum(tensor))


def spec_entry(dtype: torch.dtype, shape, crc32: str) -> dict:
    """The manifest entry of a tensor written with this dtype and shape, whose bytes had ``crc32``."""
    return {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape), "crc32": crc32}


def matches(tensor: torch.Tensor, want: dict) -> bool:
    """Whether ``tensor`` is what its manifest entry says: the whole tensor's crc32, or, for a
    checkpoint written by one writer per node, each chunk's (``chunks``: offset, shape, crc32)."""
    if "chunks" not in want:
        return entry(tensor) == want
    if [str(tensor.dtype).removeprefix("torch."), list(tensor.shape)] != [want["dtype"], want["shape"]]:
        return False
    for chunk in want["chunks"]:
        part = tensor
        for dim, (o, n) in enumerate(zip(chunk["offset"], chunk["shape"])):
            part = part.narrow(dim, o, n)
        if checksum(part) != chunk["crc32"]:
            return False
    return True


def json_objects(objects: Mapping[str, Any]) -> dict[str, Any]:
    """The non-tensor train state values JSON can hold (a manifest's ``objects``: what ``load-dcp``
    restores without unpickling DCP's copies); bytes and the like are left to DCP's own items.

    >>> json_objects({"train.step": 7, "blob": b"x"})
    {'train.step': 7}
    """
    out = {}
    for name, value in objects.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[name] = value
    return out


def write_manifest(
    directory: str,
    step: int,
    kind: str,
    entries: Mapping[str, dict],
    objects: Mapping[str, Any] | None = None,
    model_info: Mapping[str, Any] | None = None,
) -> None:
    """``objects`` and ``model_info`` (the train state, the adapter and HF config) go along as far as
    JSON holds them: ``load-dcp`` brings them back without unpickling anything."""
    manifest = {"step": step, "format": kind, "tensors": dict(entries)}
    if objects:
        manifest["objects"] = json_objects(objects)
    if model_info:
        manifest["model_info"] = json_objects(model_info)
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def read_tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of an HF (safetensors) or DCP export directory, one tensor at a time for HF.

    A directory from elsewhere never runs code: DCP metadata is unpickled with only DCP's own
    classes allowed (:mod:`stager.formats.safe_dcp`, else :class:`UnsafeCheckpoint`) and only
    tensors are read. A damaged file raises :class:`DamagedCheckpoint` naming it."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        from safetensors import safe_open

        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        tensor = f.get_tensor(name)
                        yield name, tensor
            except Exception as exc:  # SafetensorError, OSError: a truncated or garbage file
                raise DamagedCheckpoint(file, f"cannot be read ({exc.__class__.__name__}: {exc})"[:400]) from None
        return
    if os.path.exists(os.path.join(path, METADATA)):
        yield from read_dcp_tensors(path).items()
        return
    raise StagerError(ErrorCode.BAD_VALUE, f"{path} holds neither safetensors files nor a DCP checkpoint")


def verify(path: str) -> dict:
    """Check an export against its manifest: ``{"ok", "checked", "mismatched", "missing", "unexpected"}``."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)["tensors"]
    except (OSError, ValueError, KeyError) as exc:
        raise StagerError(
            ErrorCode.BAD_VALUE, f"{path}: no readable {MANIFEST} ({exc}); export it with stager"
        ) from None
    seen = set()
    mismatched = []
    unexpected = []
    error = None
    try:
        for name, tensor in read_tensors(path):
            want = manifest.get(name)
            if want is None:
                unexpected.append(name)
                continue
            seen.add(name)
            if not matches(tensor, want):
                mismatched.append(name)
    except DamagedCheckpoint as exc:  # corrupt: reported, exit 1 (an UnsafeCheckpoint is refused: raised)
        error = exc.message[:300]
    except (StagerError, KeyboardInterrupt, SystemExit):
        raise
    except (
        BaseException
    ) as exc:  # a damaged file is corrupt, not a crash (DCP's CheckpointException is a BaseException)
        lines = [line for line in str(exc).splitlines() if line.strip()]
        error = (lines[-1] if lines else exc.__class__.__name__)[:300]  # DCP wraps the cause's traceback
    missing = sorted(set(manifest) - seen)
    report = {
        "ok": not (mismatched or missing or unexpected or error),
        "checked": len(seen),
        "mismatched": sorted(mismatched),
        "missing": missing,
        "unexpected": sorted(unexpected),
    }
    if error:
        report["error"] = error
    return report


def diff(a: Mapping[str, torch.Tensor] | Iterator, b: Mapping[str, torch.Tensor] | Iterator) -> dict:
    """Per-tensor comparison: names only in one side, shape/dtype mismatches, max abs difference."""
    a = dict(a.items() if hasattr(a, "items") else a)
    b = dict(b.items() if hasattr(b, "items") else b)
    report: dict[str, Any] = {
        "only_a": sorted(set(a) - set(b)),
        "only_b": sorted(set(b) - set(a)),
        "shape_mismatch": [],
        "different": {},
        "equal": 0,
    }
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            report["shape_mismatch"].append([name, list(x.shape), list(y.shape)])
        elif x.dtype == y.dtype and torch.equal(x, y):
            report["equal"] += 1
        else:
            delta = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            report["different"][name] = delta
    report["identical"] = not (report["only_a"] or report["only_b"] or report["shape_mismatch"] or report["different"])
    return report
