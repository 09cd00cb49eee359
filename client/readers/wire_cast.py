"""When a remote reader may ask the daemon for its dtype: the cast made before the wire, not after.

A reader that turns fp32 into bf16 itself receives twice the bytes it keeps. Asking the daemon
for bf16 instead (``ReadItem.dtype``) gives the same bytes, bit for bit, when the cast is the
only arithmetic between the staged tensor and the reader's: a plain floating tensor (float8 data
is dequantized at full precision first, so it is read as staged) narrowed to a plain floating
dtype, through a view that only renames, slices, permutes or concatenates. The built-in adapters
(:mod:`stager.client.adapters`) are such views; plug-in adapters may compute, and are read as
staged. Same-host readers map the segment and cast as before (the sources decide: a mapped box
costs no wire).
"""

from __future__ import annotations

from typing import Any

import torch

from stager.protocol.dtypes import DTYPES

from ..adapters import BUILT_IN
from ..adapters.base import Prefixed

PLAIN = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})


def narrows(have: str, to: torch.dtype | None) -> bool:
    """Whether a tensor of wire dtype ``have`` read as ``to`` may be cast by its daemon: both plain
    floating, ``to`` narrower (what saves bytes; the daemon refuses the rest)."""
    src = DTYPES.get(have)
    return to is not None and src in PLAIN and to in PLAIN and to.itemsize < src.itemsize


def index_only(adapter: Any) -> bool:
    """Whether ``adapter`` (None: the native view) only moves elements, so a cast commutes with it."""
    while isinstance(adapter, Prefixed):
        adapter = adapter.adapter
    return adapter is None or type(adapter) in BUILT_IN.values()
