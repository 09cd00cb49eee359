"""The closed dtype table: the only tensor dtypes that may cross the wire, in one place.

A dtype travels as its short wire name (``"bf16"``); anything outside this table is refused on
both sides with :class:`~stager.protocol.errors.ProtocolError`, so no peer can make the other
construct an arbitrary object from a name. The same table gives each dtype's safetensors code
and its torch name (``"bfloat16"``, what command lines take), so no other module keeps a table.

>>> dtype_from_name("bf16"), safetensors_code(torch.bfloat16), parse_dtype("bfloat16")
(torch.bfloat16, 'BF16', torch.bfloat16)
"""

from __future__ import annotations

import torch

from .errors import ErrorCode, ProtocolError, short_repr

# (wire name, torch dtype, safetensors code or None). Append only: wire names are part of protocol version 1.
_TABLE: tuple[tuple[str, torch.dtype, str | None], ...] = (
    ("f64", torch.float64, "F64"),
    ("f32", torch.float32, "F32"),
    ("f16", torch.float16, "F16"),
    ("bf16", torch.bfloat16, "BF16"),
    ("f8e4m3", torch.float8_e4m3fn, "F8_E4M3"),
    ("f8e5m2", torch.float8_e5m2, "F8_E5M2"),
    ("f8e4m3fnuz", torch.float8_e4m3fnuz, None),
    ("f8e5m2fnuz", torch.float8_e5m2fnuz, None),
    ("f8e8m0", torch.float8_e8m0fnu, "F8_E8M0"),
    ("i64", torch.int64, "I64"),
    ("i32", torch.int32, "I32"),
    ("i16", torch.int16, "I16"),
    ("i8", torch.int8, "I8"),
    ("u64", torch.uint64, "U64"),
    ("u32", torch.uint32, "U32"),
    ("u16", torch.uint16, "U16"),
    ("u8", torch.uint8, "U8"),
    ("bool", torch.bool, "BOOL"),
    ("c64", torch.complex64, None),
    ("c128", torch.complex128, None),
)
DTYPES: dict[str, torch.dtype] = {name: dt for name, dt, _ in _TABLE}
FLOAT8 = ("f8e4m3", "f8e5m2", "f8e4m3fnuz", "f8e5m2fnuz")  # float8 data that a scale dequantizes
FLOAT8_DTYPES = frozenset(DTYPES[n] for n in FLOAT8)
_NAMES: dict[torch.dtype, str] = {dt: name for name, dt, _ in _TABLE}
_ST_CODES: dict[torch.dtype, str] = {dt: code for _, dt, code in _TABLE if code}
_BY_TORCH_NAME: dict[str, torch.dtype] = {str(dt).removeprefix("torch."): dt for _, dt, _ in _TABLE}


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
            ErrorCode.BAD_DTYPE, f"unknown dtype {short_repr(name)} on the wire; known: {sorted(DTYPES)}"
        ) from None


def itemsize(name: str) -> int:
    """Bytes per element of the dtype with wire name ``name``."""
    return dtype_from_name(name).itemsize


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """A dtype given by a user: a torch dtype, its torch name (``"bfloat16"``) or its wire name (``"bf16"``)."""
    if isinstance(value, torch.dtype):
        dtype_name(value)
        return value
    dtype = _BY_TORCH_NAME.get(value) or DTYPES.get(value)  # type: ignore[arg-type]
    if dtype is None:
        raise ValueError(f"dtype {value!r} is not one of {sorted(_BY_TORCH_NAME)}")
    return dtype


def torch_names(*, floating: bool = False) -> list[str]:
    """Torch names of the table's dtypes (only floating, non-float8 ones with ``floating``): for --help."""
    return [
        n
        for n, dt in _BY_TORCH_NAME.items()
        if not floating or (dt.is_floating_point and dt not in FLOAT8_DTYPES and dt.itemsize > 1)
    ]


def safetensors_code(dtype: torch.dtype) -> str:
    """The safetensors header code of ``dtype`` (``"BF16"``); ValueError when safetensors has none."""
    try:
        return _ST_CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors code; cast it (e.g. --dtype bfloat16)") from None
