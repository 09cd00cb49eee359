"""Hugging Face state-dict adapters: native (training) names and layouts <-> HF names and layouts.

An adapter satisfies :class:`Adapter` (``to_hf(state_dict)``, ``from_hf(hf_state_dict)``:
torchtitan's StateDictAdapter shape, so theirs plug in as ``adapter="pkg.module:Adapter"`` or as
objects); built-in ones are :class:`PerTensorAdapter` s that also convert one tensor at a time.
Readers and exporters pick the adapter with :func:`resolve_adapter` and apply it with
:func:`hf_names` / :func:`hf_items` / :func:`to_hf_items` (see :mod:`.base`). May import
:mod:`stager.protocol` and torch only: readers, loaders and writers import adapters, never the reverse.

>>> a = load_adapter("llama3", {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1})
>>> [k for k, _ in hf_items(a, "layers.0.feed_forward.w1.weight", torch.zeros(16, 8))]
['model.layers.0.mlp.gate_proj.weight']
>>> resolve_adapter(None, None, {"adapter": "identity"}).origin
'staged'
"""

from __future__ import annotations

import importlib
import inspect
import json
from typing import Any, Literal, NamedTuple

import torch  # noqa: F401  (the doctest above)

from .base import (
    Adapter,
    HFTensor,
    IdentityAdapter,
    PerTensorAdapter,
    adapter_error,
    check_adapter,
    fill_hf,
    hf_flat_indices,
    hf_items,
    hf_names,
    hf_row_orders,
    is_lora,
    is_per_tensor,
    permute_for_hf_rotary,
    rotary_rows,
    to_hf_items,
    unpermute_from_hf_rotary,
    with_prefix,
)
from .deepseek import DeepSeekV3Adapter
from .llama import Llama3Adapter, Qwen3Adapter

BUILT_IN = {
    "identity": IdentityAdapter,
    "llama3": Llama3Adapter,
    "qwen3": Qwen3Adapter,
    "deepseek_v3": DeepSeekV3Adapter,
}

Origin = Literal["consumer", "staged"]
CONSUMER: Origin = "consumer"  # given by the reader/exporter itself (argument, command line)
STAGED: Origin = "staged"  # read from the staged version's model_info (written by the trainer)

__all__ = [
    "Adapter",
    "BUILT_IN",
    "CONSUMER",
    "DeepSeekV3Adapter",
    "HFTensor",
    "IdentityAdapter",
    "Llama3Adapter",
    "PerTensorAdapter",
    "Qwen3Adapter",
    "Resolved",
    "STAGED",
    "check_adapter",
    "fill_hf",
    "hf_flat_indices",
    "hf_items",
    "hf_names",
    "hf_row_orders",
    "is_lora",
    "is_per_tensor",
    "load_adapter",
    "permute_for_hf_rotary",
    "resolve_adapter",
    "rotary_rows",
    "to_hf_items",
    "unpermute_from_hf_rotary",
    "with_prefix",
]


class Resolved(NamedTuple):
    """What :func:`resolve_adapter` chose: the adapter, the HF config (None: none anywhere) and
    where the adapter's spec came from (``"consumer"`` or ``"staged"``)."""

    adapter: Any
    hf_config: dict | None
    origin: Origin


def load_adapter(spec: str, hf_config: dict | None = None, *, origin: Origin = CONSUMER) -> Any:
    """A built-in adapter by name (``llama3``, ``qwen3``, ``deepseek_v3``, ``identity``) or
    ``module:attr`` naming a class or factory called with the HF config (torchtitan's adapters
    take model args: wrap them), or an adapter object itself.

    ``origin`` says where ``spec`` came from: ``"staged"`` (a version's model_info) accepts only
    built-in names, since importing a module named by staged data would run the trainer's (or
    anyone's) code in the consumer; name plug-ins on the consumer side instead.

    >>> type(load_adapter("identity")).__name__
    'IdentityAdapter'
    """
    if not isinstance(spec, str):
        raise adapter_error(
            f"adapter spec must be a name, not {type(spec).__name__}; built in: "
            f"{', '.join(sorted(BUILT_IN))}, or 'package.module:attr'"
        )
    if spec in BUILT_IN:
        return BUILT_IN[spec](hf_config or {})
    if ":" not in spec:
        raise adapter_error(
            f"unknown adapter {spec!r}; built in: {', '.join(sorted(BUILT_IN))}, or 'package.module:attr'"
        )
    if origin != CONSUMER:
        raise adapter_error(
            f"the staged model_info names adapter {spec!r}: plug-in adapters (module:attr) are "
            "loaded only when the consumer names them; pass --adapter module:attr (or adapter=... "
            f"to Subscriber / export_hf), or stage a built-in name ({', '.join(sorted(BUILT_IN))})"
        )
    module_name, attr = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise adapter_error(f"cannot load adapter {spec!r}: {exc}") from None
    adapter = factory(hf_config or {}) if isinstance(factory, type) or inspect.isfunction(factory) else factory
    return check_adapter(adapter, spec)


def resolve_adapter(
    spec: str | Any | None,
    hf_config: dict | str | None,
    model_info: dict | None,
    *,
    default: str = "identity",
    require_config: bool = False,
    prefix: str | None = None,
) -> Resolved:
    """The adapter a consumer (a Subscriber's HF view, an HF exporter) uses for one version.

    ``spec`` and ``hf_config`` are the consumer's own (arguments, command line): they win.
    ``spec`` is a built-in name, ``module:attr`` or an adapter object; ``hf_config`` a dict or a
    config.json path (read here). Otherwise both come from the staged ``model_info``
    (``{"adapter": ..., "hf_config": {...}}``), which is data from the trainer: only built-in
    adapter names and a dict config are accepted from it (never a module to import or a file to
    read); ``default`` when it names no adapter. ``require_config``: BAD_VALUE when neither gives
    an HF config (an exporter writes it as config.json). ``prefix`` (else the staged
    ``model_info["prefix"]``): only the names under it are the model (``"model."`` for a state
    dict staged as ``{"model": ..., "optim": ...}``), see :func:`with_prefix`.

    >>> r = resolve_adapter("llama3", None, {"hf_config": {"hidden_size": 8, "num_attention_heads": 2}})
    >>> type(r.adapter).__name__, r.hf_config["hidden_size"], r.origin
    ('Llama3Adapter', 8, 'consumer')
    """
    info = model_info if isinstance(model_info, dict) else {}
    config = _consumer_config(hf_config) if hf_config is not None else _staged_config(info.get("hf_config"))
    if config is None and require_config:
        raise adapter_error(
            "no HF config: pass hf_config (a dict or a config.json path; --hf-config PATH), or "
            "stage with model_info={'hf_config': {...}}"
        )
    if prefix is None:
        prefix = info.get("prefix") if isinstance(info.get("prefix"), str) else None
    if spec is not None:
        adapter = (
            load_adapter(spec, config, origin=CONSUMER) if isinstance(spec, str) else check_adapter(spec, "adapter")
        )
        return Resolved(with_prefix(adapter, prefix), config, CONSUMER)
    staged = info.get("adapter")
    if staged is None:
        return Resolved(with_prefix(load_adapter(default, config), prefix), config, STAGED)
    return Resolved(with_prefix(load_adapter(staged, config, origin=STAGED), prefix), config, STAGED)


def _consumer_config(hf_config: dict | str) -> dict:
    if isinstance(hf_config, dict):
        return hf_config
    if not isinstance(hf_config, str):
        raise adapter_error(f"hf_config must be a dict or a config.json path, not {type(hf_config).__name__}")
    try:
        with open(hf_config) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise adapter_error(
            f"cannot read hf_config {hf_config!r}: {exc}; pass an HF config.json path or a dict"
        ) from None
    if not isinstance(config, dict):
        raise adapter_error(f"{hf_config}: an HF config.json holds a JSON object, not {type(config).__name__}")
    return config


def _staged_config(hf_config: Any) -> dict | None:
    if hf_config is None or isinstance(hf_config, dict):
        return hf_config
    raise adapter_error(
        f"the staged model_info gives hf_config as {type(hf_config).__name__} "
        f"({str(hf_config)[:80]!r}); only a dict is read from staged data (a path is never opened): "
        "stage model_info={'hf_config': {...}}, or pass --hf-config PATH (or hf_config=...) "
        "on the consumer side"
    )
