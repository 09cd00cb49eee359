"""The checks of the stager backend's ``init_info`` (no vLLM here, so they are tested without it).

``init_info`` may come over HTTP (``/init_weight_transfer_engine`` of a vLLM server): only data, never a
module to import or a path to read, and a wrong field is a ValueError naming it, which the engine's
``parse_init_info`` turns into a typed ``bad_value`` error (a request never takes the worker down).
"""

from __future__ import annotations

import math
from typing import Any

from stager.client.adapters import BUILT_IN
from stager.protocol.errors import short_repr

# far above any model's tensor count (DeepSeek-V3: ~92k HF names with its FP8 scales), low enough to bound
# what one request makes the worker hold
MAX_NAMES = 1 << 20
MAX_NAME_CHARS = 1024


def check_init_info(info: Any) -> None:
    """ValueError naming the first wrong field of ``info`` (a ``StagerInitInfo``) and what it should be."""
    if info.adapter is not None and info.adapter not in BUILT_IN:
        raise ValueError(
            f"init_info adapter must be a built-in adapter ({', '.join(sorted(BUILT_IN))}), "
            f"not {info.adapter!r}; plug-in adapters are not loaded from a request"
        )
    if info.quantize is not None and info.quantize != "fp8-block":
        raise ValueError(
            f"init_info quantize must be 'fp8-block' (an engine serving an FP8 checkpoint with block "
            f"scales) or left out, not {short_repr(info.quantize)}"
        )
    for key, kind in (
        ("endpoint", str),
        ("auth_dir", str),
        ("prefix", str),
        ("hf_config", dict),
        ("names", list),
        ("remote", bool),
    ):
        value = getattr(info, key)
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"init_info {key} must be a {kind.__name__}, not {type(value).__name__}")
    if info.names is not None:
        if len(info.names) > MAX_NAMES:
            raise ValueError(
                f"init_info names holds {len(info.names)} names, more than {MAX_NAMES}: leave it "
                "out to update every tensor"
            )
        for i, name in enumerate(info.names):
            if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
                kind = f"{len(name)} characters" if isinstance(name, str) else type(name).__name__
                raise ValueError(
                    f"init_info names[{i}] = {short_repr(name)} ({kind}): names must be a list of HF "
                    f"tensor names (strings of 1 to {MAX_NAME_CHARS} characters)"
                )
    timeout = info.timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"init_info timeout must be a positive number of seconds, not {timeout!r}")
