"""The closed dtype table: the only tensor dtypes that may cross the wire.

A dtype travels as its short name (``"bf16"``); anything outside this table is refused
on both sides with :class:`~stager.protocol.errors.ProtocolError`, so no peer can make the
other construct an arbitrary object from a name.
"""

from __future__ import annotations

import torch

from .errors import ErrorCode, ProtocolError

# name on the wire -> torch dtype. Append only: names are part of protocol version 1.
DTYPES: dict[str, torch.dtype] = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f8e4m3": torch.float8_e4m3fn,
    "f8e5m2": torch.float8_e5m2,
    "f8e4m3fnuz": torch.float8_e4m3fnuz,
    "f8e5m2fnuz": torch.float8_e5m2fnuz,
    "f8e8m0": torch.float8_e8m0fnu,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u64": torch.uint64,
    "u32": torch.uint32,
    "u16": torch.uint16,
    "u8": torch.uint8,
    "bool": torch.bool,
    "c64": torch.complex64,
    "c128": torch.complex128,
}
_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of ``dtype``; raises ``ProtocolError(BAD_DTYPE)`` for dtypes outside the table."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ProtocolError(
            ErrorCode.BAD_DTYPE,
            f"dtype {dtype} cannot be staged; supported: {sorted(str(d) for d in _NAMES)}. "
            "Cast the tensor to one of these before staging.",
        ) from None


def dtype_from_name(name: object) -> torch.dtype:
    """The torch dtype for a wire name; raises ``ProtocolError(BAD_DTYPE)`` for unknown names."""
    try:
        return DTYPES[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ProtocolError(
            ErrorCode.BAD_DTYPE, f"unknown dtype {name!r} on the wire; known: {sorted(DTYPES)}"
        ) from None


def itemsize(name: str) -> int:
    """Bytes per element of the dtype with wire name ``name``."""
    return dtype_from_name(name).itemsize
