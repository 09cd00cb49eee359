"""The HF config fields each built-in adapter (and load-hf) reads, checked in one place before any tensor is read.

A staged ``hf_config`` is data from the trainer and a config.json is anyone's file: a wrong value
must be a typed error naming the field (:class:`~stager.protocol.HFConfigError`) when the adapter
is bound to the config, never a TypeError deep inside a conversion, in an exporter that then dies.
A :class:`Schema` says, per field, the type and range it accepts and, across fields, the rules the
conversions rely on (heads divisible, rotary dimensions even); :func:`check_config` checks a config
against it and gives the values the adapter uses, null or absent fields as their defaults.

>>> check_config("the llama3 adapter", LLAMA3, {"hidden_size": 8, "num_attention_heads": 2})["tie_word_embeddings"]
False
>>> try:
...     check_config("the llama3 adapter", LLAMA3, {"hidden_size": 8, "num_attention_heads": [2]})
... except HFConfigError as exc:
...     print(exc.field)
num_attention_heads
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from stager.protocol import HFConfigError
from stager.protocol.errors import short_repr
from stager.protocol.fp8_block import DEFAULT_BLOCK

__all__ = [
    "DEEPSEEK_V3",
    "FIX",
    "FP8_QUANTIZATION",
    "Field",
    "LLAMA3",
    "LOAD_HF",
    "MAX_INT",
    "Rule",
    "Schema",
    "check_config",
]

# far above any real model's sizes (hidden 16384, experts 384, layers 128), and low enough that no
# loop over a size (experts in from_hf) or product of sizes (a tensor's numel) can run away
MAX_INT = 1 << 24
FIX = (
    "fix the HF config where it comes from: the trainer's model_info['hf_config'], or pass the model's "
    "config.json on the consumer side (--hf-config PATH, or hf_config=... to Subscriber / export_hf; load-hf "
    "reads the checkpoint's own)"
)


@dataclasses.dataclass(frozen=True)
class Field:
    """What one field accepts: ``kind`` int (``low``..MAX_INT, never a bool or a float), bool, dict
    (a JSON object, whose own fields have dotted names) or list (a non-empty list of ints from 1).
    Null counts as absent; absent gives ``default``, unless ``required``."""

    kind: type
    required: bool = False
    low: int = 1
    default: Any = None
    absent: str = ""  # what null or absent means, for the error message

    def accepts(self, value: Any) -> bool:
        if self.kind is int:
            return type(value) is int and self.low <= value <= MAX_INT
        if self.kind is list:
            return type(value) is list and bool(value) and all(type(v) is int and 1 <= v <= MAX_INT for v in value)
        return type(value) is self.kind

    def expected(self) -> str:
        text = {
            int: f"an integer from {self.low} to {MAX_INT}",
            bool: "true or false",
            dict: "a JSON object",
            list: f"a non-empty list of integers from 1 to {MAX_INT}",
        }[self.kind]
        return text if self.required else f"{text}, or null/absent ({self.absent or 'the default'})"


@dataclasses.dataclass(frozen=True)
class Rule:
    """A relation between fields that the conversions rely on, checked once every field has its
    type: ``holds(values)``; else ``field`` is named, with ``expected(values)`` as what it should be."""

    field: str
    holds: Callable[[dict], bool]
    expected: Callable[[dict], str]


@dataclasses.dataclass(frozen=True)
class Schema:
    fields: dict[str, Field]  # a nested field's parent comes before it
    rules: tuple[Rule, ...] = ()


def _lookup(config: dict, field: str) -> Any:
    value: Any = config
    for part in field.split("."):
        if not isinstance(value, dict):  # a parent that is not an object: checked (and named) as the parent
            return None
        value = value.get(part)
    return value


def _error(owner: str, field: str, value: Any, expected: str, fix: str) -> HFConfigError:
    shown = "absent" if value is None else f"{short_repr(value)} ({type(value).__name__})"
    return HFConfigError(field, f"hf_config.{field} = {shown}: {owner} expects {expected}; {fix}")


def check_config(owner: str, schema: Schema, config: Any, fix: str = FIX) -> dict[str, Any]:
    """The values of ``schema``'s fields in ``config`` (a dict; None: empty), checked: HFConfigError
    naming the first wrong field (all missing required ones at once), what it holds, what ``owner``
    (e.g. "the llama3 adapter") expects, and ``fix`` (how to give a right one). Pure: no I/O."""
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise HFConfigError(
            "", f"{owner} reads hf_config as a JSON object, not {type(config).__name__} ({short_repr(config)}); {fix}"
        )
    missing = [name for name, f in schema.fields.items() if f.required and _lookup(config, name) is None]
    if missing:
        kinds = sorted({"integers" if schema.fields[m].kind is int else schema.fields[m].expected() for m in missing})
        raise HFConfigError(
            missing[0], f"{owner} needs hf_config with {', '.join(missing)} ({', '.join(kinds)}); {fix}"
        )
    values: dict[str, Any] = {}
    for name, f in schema.fields.items():
        value = _lookup(config, name)
        if value is None:
            values[name] = f.default
        elif f.accepts(value):
            values[name] = value
        else:
            raise _error(owner, name, value, f.expected(), fix)
    for rule in schema.rules:
        if not rule.holds(values):
            raise _error(owner, rule.field, values[rule.field], rule.expected(values), fix)
    return values


def _head_dim(v: dict) -> int:
    return v["head_dim"] or v["hidden_size"] // v["num_attention_heads"]


LLAMA3 = Schema(  # Llama 3 and Qwen3 (client/adapters/llama.py)
    fields={
        "hidden_size": Field(int, required=True),
        "num_attention_heads": Field(int, required=True),
        "num_key_value_heads": Field(int, absent="num_attention_heads"),
        "head_dim": Field(int, absent="hidden_size / num_attention_heads"),
        "tie_word_embeddings": Field(bool, default=False, absent="false"),
    },
    rules=(
        Rule(
            "num_key_value_heads",
            lambda v: not v["num_key_value_heads"] or v["num_attention_heads"] % v["num_key_value_heads"] == 0,
            lambda v: (
                f"a divisor of num_attention_heads ({v['num_attention_heads']}): each key/value head serves "
                "as many query heads as the others"
            ),
        ),
        Rule(
            "hidden_size",
            lambda v: bool(v["head_dim"]) or v["hidden_size"] % v["num_attention_heads"] == 0,
            lambda v: (
                f"a multiple of num_attention_heads ({v['num_attention_heads']}) when head_dim is not given "
                "(or give head_dim)"
            ),
        ),
        Rule(
            "head_dim",
            lambda v: _head_dim(v) % 2 == 0,
            lambda v: (
                "an even head dimension (rotary embeddings turn pairs of dimensions)"
                + (
                    ""
                    if v["head_dim"]
                    else f"; without head_dim it is hidden_size / num_attention_heads = {_head_dim(v)}"
                )
            ),
        ),
    ),
)

DEEPSEEK_V3 = Schema(  # client/adapters/deepseek.py
    fields={
        "hidden_size": Field(int, required=True),
        "num_attention_heads": Field(int, required=True),
        "n_routed_experts": Field(int, required=True),
        "moe_intermediate_size": Field(int, required=True),
        "kv_lora_rank": Field(int, required=True),
        "qk_nope_head_dim": Field(int, required=True, low=0),
        "qk_rope_head_dim": Field(int, required=True),
        "v_head_dim": Field(int, required=True),
        "first_k_dense_replace": Field(int, required=True, low=0),
        "q_lora_rank": Field(int, low=0, default=0, absent="0: a plain wq, no query LoRA"),
        "num_hidden_layers": Field(int, absent="no MTP layers can be mapped"),
        "rope_interleave": Field(bool, default=True, absent="true"),
        "tie_word_embeddings": Field(bool, default=False, absent="false"),
    },
    rules=(
        Rule(
            "qk_rope_head_dim",
            lambda v: v["qk_rope_head_dim"] % 2 == 0,
            lambda v: "an even number (rotary embeddings turn pairs of dimensions)",
        ),
    ),
)

# an FP8 quantization_config's block size: what load-hf reads of a checkpoint's config.json besides its adapter's
# fields, and what FP8 readers and export-hf read of a staged one (client/adapters/fp8_scope.py). One schema
FP8_QUANTIZATION = Schema(
    fields={
        "quantization_config": Field(dict, absent="not quantized"),
        "quantization_config.weight_block_size": Field(
            list, absent=f"load-hf tells it from the scales' shapes; a new FP8 quantization uses {list(DEFAULT_BLOCK)}"
        ),
    },
)
LOAD_HF = FP8_QUANTIZATION
