"""Reading a Hugging Face safetensors checkpoint directory that may come from elsewhere.

Only bytes and JSON are read: the safetensors format is an 8-byte little-endian header length, a
JSON header ``{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {...}}``
and the tensors' bytes (offsets relative to the end of the header). Every header is checked
before any tensor is read: dtypes from the closed table, offsets inside the file, sizes that
match the shapes, and an index (``model.safetensors.index.json``) whose files exist and hold the
names it maps to them. Each problem is a :class:`CheckpointError` naming the file and the tensor.

Tensor bytes are read with ``os.preadv`` straight into the caller's buffer (e.g. a view of the
daemon's shared memory): no mmap, no intermediate copy, the GIL released while the kernel copies.

>>> ckpt = open_checkpoint("/models/Llama-3.2-1B")  # doctest: +SKIP
>>> ckpt.tensors["model.norm.weight"].shape  # doctest: +SKIP
(2048,)
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import struct

import torch

from stager.protocol import DTYPES, ErrorCode, StagerError
from stager.protocol.dtypes import safetensors_code

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
RECIPE = "recipe_state.safetensors"  # the training state beside the weights (export-hf --recipe-state): not the model
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
READ_CHUNK = 64 << 20  # bytes per preadv: a truncated file is noticed within one chunk


def _st_dtypes() -> dict[str, torch.dtype]:
    table = {}
    for dtype in DTYPES.values():
        try:
            table[safetensors_code(dtype)] = dtype
        except ValueError:
            pass
    return table


ST_DTYPES = _st_dtypes()


class CheckpointError(StagerError):
    """A checkpoint that cannot be loaded: ``path`` is the file at fault, ``tensor`` the tensor
    (None when the file as a whole is)."""

    def __init__(self, path: str, problem: str, tensor: str | None = None):
        self.path, self.tensor = path, tensor
        what = f"{path}: tensor {tensor!r}" if tensor is not None else path
        super().__init__(ErrorCode.BAD_VALUE, f"{what}: {problem}")


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: where its bytes are (absolute file offsets)."""

    name: str
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """A checked checkpoint directory: ``tensors`` by name (in file order), ``config`` (its
    config.json as a dict, None when there is none) and ``files`` (absolute paths)."""

    directory: str
    tensors: dict[str, StoredTensor]
    config: dict | None
    files: list[str]


def read_header(path: str) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, checked against the file's size."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(path, f"is {size} bytes: too short for a safetensors header (truncated?)")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise CheckpointError(
                    path,
                    f"claims a {length}-byte header but the file holds {size} bytes: "
                    "it is truncated or not a safetensors file",
                )
            header = f.read(length)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        meta = json.loads(header)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            path, f"has a header that is not JSON ({exc}): not a safetensors file, or damaged"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(path, "has a header that is not a JSON object: not a safetensors file")
    base = 8 + length
    out: dict[str, StoredTensor] = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        out[name] = _stored(path, name, info, base, size)
    return dict(sorted(out.items(), key=lambda kv: kv[1].start))


def _stored(path: str, name: str, info, base: int, size: int) -> StoredTensor:
    if not isinstance(info, dict):
        raise CheckpointError(path, "has no dtype/shape/data_offsets entry in the header", name)
    code = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    dtype = ST_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise CheckpointError(
            path, f"has dtype {code!r}, not one stager can hold ({', '.join(sorted(ST_DTYPES))})", name
        )
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape) or len(shape) > 64:
        raise CheckpointError(path, f"has a malformed shape {str(shape)[:80]}", name)
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(path, f"has malformed data_offsets {str(offsets)[:80]}", name)
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(
            path,
            f"holds {offsets[1] - offsets[0]} bytes but shape {shape} of {code} needs {nbytes}: the header is damaged",
            name,
        )
    start, end = base + offsets[0], base + offsets[1]
    if end > size:
        raise CheckpointError(path, f"ends at byte {end} but the file holds {size}: the file is truncated", name)
    return StoredTensor(name, path, dtype, tuple(shape), start, end)


def read_json(path: str) -> object:
    """A JSON file of a checkpoint; unreadable, a :class:`CheckpointError` naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"cannot be read as JSON ({exc})") from None


def open_checkpoint(directory: str) -> HFCheckpoint:
    """Check ``directory`` (sharded safetensors + ``model.safetensors.index.json``, or one
    ``model.safetensors``, or any ``*.safetensors`` files) and read its headers and config.json."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(directory, "is not a directory")
    index = os.path.join(directory, INDEX)
    mapped: dict[str, str] | None = None
    if os.path.exists(index):
        raw = read_json(index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(index, "has no weight_map of tensor name -> file name")
        for name, rel in weight_map.items():
            if rel != os.path.basename(rel) or rel in (".", ".."):
                raise CheckpointError(index, f"maps it to {rel!r}, outside the checkpoint directory", name)
            if not os.path.isfile(os.path.join(directory, rel)):
                raise CheckpointError(os.path.join(directory, rel), f"is missing ({INDEX} maps tensors to it)", name)
        mapped = weight_map
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(directory, SINGLE)):
        files = [SINGLE]
    else:
        files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors") and n != RECIPE)
        if not files:
            raise CheckpointError(directory, f"holds no {INDEX}, no {SINGLE} and no *.safetensors file")
    tensors: dict[str, StoredTensor] = {}
    for rel in files:
        path = os.path.join(directory, rel)
        for name, t in read_header(path).items():
            if mapped is not None and mapped.get(name) != rel:
                raise CheckpointError(
                    path,
                    f"is not mapped to this file by {INDEX}"
                    + (f" (it names {mapped[name]})" if name in mapped else ""),
                    name,
                )
            if name in tensors:
                raise CheckpointError(path, f"is also in {tensors[name].path}", name)
            tensors[name] = t
    if mapped is not None:
        absent = [n for n in mapped if n not in tensors]
        if absent:
            raise CheckpointError(
                os.path.join(directory, mapped[absent[0]]),
                f"is not in this file, although {INDEX} maps it here",
                absent[0],
            )
    config_path = os.path.join(directory, "config.json")
    config = read_json(config_path) if os.path.exists(config_path) else None
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(config_path, "is not a JSON object")
    return HFCheckpoint(directory, tensors, config, [os.path.join(directory, rel) for rel in files])


def read_into(t: StoredTensor, dst: torch.Tensor, fd: int) -> None:
    """Read ``t``'s bytes from the open file ``fd`` straight into ``dst`` (contiguous, same dtype
    and size): no intermediate buffer. A short read is a :class:`CheckpointError`."""
    nbytes = t.nbytes
    if dst.dtype != t.dtype or dst.numel() * dst.element_size() != nbytes or not dst.is_contiguous():
        raise CheckpointError(t.path, f"cannot be read into a {dst.dtype} tensor of shape {list(dst.shape)}", t.name)
    if not nbytes:
        return
    base = dst.data_ptr()
    done = 0
    while done < nbytes:
        n = min(READ_CHUNK, nbytes - done)
        view = memoryview((ctypes.c_char * n).from_address(base + done)).cast("B")
        try:
            got = os.preadv(fd, [view], t.start + done)
        except OSError as exc:
            raise CheckpointError(t.path, f"cannot be read ({exc.strerror or exc})", t.name) from None
        if got <= 0:
            raise CheckpointError(
                t.path,
                f"ends {nbytes - done} bytes short of the tensor's end: the file was truncated while loading",
                t.name,
            )
        done += got


def read_tensor(t: StoredTensor, fd: int) -> torch.Tensor:
    """``t`` as a new tensor of this process."""
    out = torch.empty(t.shape, dtype=t.dtype)
    read_into(t, out, fd)
    return out
