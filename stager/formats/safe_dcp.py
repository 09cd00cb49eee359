"""Reading a DCP checkpoint directory that may come from elsewhere, without running its code.

torch's ``FileSystemReader.read_metadata`` unpickles ``.metadata`` with plain ``pickle.load``, and
DCP's loaders ``torch.load(weights_only=False)`` every non-tensor item: a checkpoint directory
copied from another machine could run anything. Here ``.metadata`` goes through an unpickler
that admits only the classes DCP's metadata is made of (``_ALLOWED``), the files it names must be
plain files of the directory, large enough for the byte ranges it claims, and only tensors are
read (``torch.load(weights_only=True)`` inside DCP); non-tensor items are never unpickled.

>>> tensors = read_dcp_tensors("/ckpt/dcp/step-00001000")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle  # only through _MetadataUnpickler, which admits DCP's metadata classes and nothing else
import warnings
from typing import Any

import torch
from torch.futures import Future

from stager.protocol import ErrorCode, StagerError

METADATA = ".metadata"
_MAX_METADATA_BYTES = 1 << 30

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, frozenset[str]] = {
    _DCP_METADATA: frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # looks a torch.layout up by name
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),  # checkpoint_id
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "slice"}),
}


def quiet_single_process_dcp() -> None:
    """torch warns on every single-process DCP save/load, even with ``no_dist=True``; stager's writer
    and verifier are one process on purpose. Filter exactly that message (process-wide, idempotent)."""
    warnings.filterwarnings(
        "ignore",
        category=UserWarning,
        message=r"torch\.distributed is (disabled, )?unavailable or uninitialized, assuming the "
        r"intent is to (save|load) in a single process",
    )


class UnsafeCheckpoint(StagerError):
    """A checkpoint's ``.metadata`` names a global outside DCP's metadata classes: it is refused
    before anything of it runs."""

    def __init__(self, path: str, global_name: str):
        self.path, self.global_name = path, global_name
        super().__init__(
            ErrorCode.BAD_VALUE,
            f"{path} refers to {global_name}, which is not part of DCP checkpoint metadata: refusing to "
            "unpickle it (it could run code). Only read checkpoints you trust, and re-export this one "
            "with `stager write-dcp` or torch.distributed.checkpoint.save",
        )


class DamagedCheckpoint(StagerError):
    """A DCP checkpoint that cannot be read: ``path`` is the file at fault."""

    def __init__(self, path: str, problem: str):
        self.path = path
        super().__init__(
            ErrorCode.BAD_VALUE,
            f"{path}: {problem}; the checkpoint is damaged or incomplete: copy it again or re-export the step",
        )


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and "." not in name:  # dtypes, layouts, memory formats and torch.Size
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)) or value is torch.Size:
                return value
        raise UnsafeCheckpoint(self._path, f"{module}.{name}")


def load_metadata(directory: str):
    """The ``Metadata`` of the DCP checkpoint in ``directory``, unpickled with only DCP's metadata
    classes allowed and checked against the files present. Raises :class:`UnsafeCheckpoint` or
    :class:`DamagedCheckpoint`."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    path = os.path.join(directory, METADATA)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_METADATA_BYTES + 1)
    except OSError as exc:
        raise DamagedCheckpoint(path, f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > _MAX_METADATA_BYTES:
        raise DamagedCheckpoint(path, f"is larger than {_MAX_METADATA_BYTES >> 20} MiB")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data), path).load()
    except UnsafeCheckpoint:
        raise
    except RecursionError:
        raise DamagedCheckpoint(path, "is nested too deeply to be DCP metadata") from None
    except Exception as exc:  # truncated or garbage: EOFError, UnpicklingError, ValueError, ...
        raise DamagedCheckpoint(path, f"is not readable DCP metadata ({exc.__class__.__name__}: {exc})"[:400]) from None
    if (
        not isinstance(metadata, Metadata)
        or not isinstance(metadata.state_dict_metadata, dict)
        or not isinstance(metadata.storage_data, dict)
    ):
        raise DamagedCheckpoint(path, f"holds a {type(metadata).__name__}, not DCP Metadata")
    for name, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata) and not (
            isinstance(md.size, torch.Size) and isinstance(getattr(md.properties, "dtype", None), torch.dtype)
        ):
            raise DamagedCheckpoint(path, f"describes tensor {name!r} without a valid shape and dtype")
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if (
            not isinstance(info, _StorageInfo)
            or not isinstance(rel, str)
            or not rel
            or rel != os.path.basename(rel)
            or rel in (".", "..")
            or not isinstance(info.offset, int)
            or not isinstance(info.length, int)
            or info.offset < 0
            or info.length < 0
        ):
            raise DamagedCheckpoint(
                path,
                f"names data outside the checkpoint directory or a bad byte range "
                f"({getattr(info, 'relative_path', info)!r})"[:300],
            )
        needed[rel] = max(needed.get(rel, 0), info.offset + info.length)
    for rel, end in sorted(needed.items()):
        file = os.path.join(directory, rel)
        if not os.path.isfile(file):
            raise DamagedCheckpoint(file, f"is missing ({METADATA} lists it)")
        size = os.path.getsize(file)
        if size < end:
            raise DamagedCheckpoint(file, f"is truncated: {METADATA} needs {end} bytes, the file holds {size}")
    return metadata


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        """A ``FileSystemReader`` whose metadata comes from :func:`load_metadata` (read once, here),
        and which names the file at fault when reading its data fails."""

        def __init__(self, path: str):
            super().__init__(path)
            self.directory = str(path)
            self.metadata = load_metadata(self.directory)
            self.failure: DamagedCheckpoint | None = None

        def read_metadata(self, *args: Any, **kwargs: Any):
            if kwargs.get("rank") is not None:  # per-rank metadata files are never unpickled
                raise FileNotFoundError(f"{self.directory} has one global {METADATA}")
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(self.metadata, "storage_meta", None) is None:
                self.metadata.storage_meta = StorageMeta()
            self.metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
            return self.metadata

        def read_data(self, plan, planner):
            per_file: dict[str, list] = {}
            for item in plan.items:
                per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
            for rel, items in per_file.items():
                try:
                    super().read_data(dataclasses.replace(plan, items=items), planner).wait()
                except Exception as exc:
                    self.failure = DamagedCheckpoint(
                        os.path.join(self.directory, rel),
                        f"cannot be read ({exc.__class__.__name__}: {_last_line(exc)})"[:400],
                    )
                    raise self.failure from None
            done: Future = Future()
            done.set_result(None)
            return done

    return SafeFileSystemReader


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else exc.__class__.__name__


def read_dcp_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of the DCP checkpoint in ``directory``, by flat FQN (non-tensor items are
    skipped, never unpickled). Raises :class:`UnsafeCheckpoint` or :class:`DamagedCheckpoint`."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = safe_reader(directory)
    try:
        state = {
            name: torch.empty(md.size, dtype=md.properties.dtype)
            for name, md in reader.metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }
    except (RuntimeError, ValueError, TypeError) as exc:  # e.g. a size too large to allocate
        raise DamagedCheckpoint(
            os.path.join(directory, METADATA), f"describes tensors that cannot be made ({exc})"[:400]
        ) from None
    if not state:
        return {}
    load_into(reader, state)
    return state


def safe_reader(directory: str):
    """A DCP storage reader for ``directory`` whose metadata was read safely (:func:`load_metadata`);
    its ``metadata`` lists the checkpoint's items."""
    return _reader_class()(directory)


def load_into(reader, state: dict[str, torch.Tensor]) -> None:
    """``dcp.load`` of ``state`` (tensors only, filled in place) through a :func:`safe_reader`; a
    failure is a :class:`DamagedCheckpoint` naming the file at fault."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, storage_reader=reader, no_dist=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # DCP wraps failures in CheckpointException, a BaseException
        if reader.failure is not None:
            raise reader.failure from None
        raise DamagedCheckpoint(
            reader.directory, f"DCP could not load it ({exc.__class__.__name__}: {_last_line(exc)})"[:400]
        ) from None
