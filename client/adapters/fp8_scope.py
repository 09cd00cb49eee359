"""Which HF weights an FP8 block-quantized checkpoint of an architecture holds in e4m3 (adapter knowledge).

An FP8 checkpoint (DeepSeek-V3's, Qwen3-FP8's: ``quantization_config = {"quant_method": "fp8",
"weight_block_size": [128, 128]}``) quantizes the linear layers' weights of the decoder layers and leaves the
rest in high precision: embeddings, norms, the MoE router (``mlp.gate``) and its bias, ``lm_head``, and what
``quantization_config.modules_to_not_convert`` names. One pure function per architecture says which HF names
are quantized (table-tested in tests/test_fp8_block.py); :func:`fp8_scope` picks it for an adapter and its HF
config, with the block size and the skip list. Readers (``Subscriber(quantize="fp8-block")``) and the exporter
(``export-hf --quantize fp8-block``) both plan from it.

>>> scope = fp8_scope(None, {"model_type": "llama"})
>>> scope.quantizes("model.layers.0.self_attn.q_proj.weight"), scope.quantizes("model.embed_tokens.weight")
(True, False)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from stager.protocol import HFConfigError
from stager.protocol.errors import short_repr

from .base import Prefixed, adapter_error
from .config import Field, Schema, check_config

FP8_BLOCK = "fp8-block"  # the quantization a reader or exporter may ask for
QUANTIZE_CHOICES = (FP8_BLOCK,)

_LLAMA = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
# DeepSeek-V3's hub checkpoint (deepseek-ai/DeepSeek-V3, model.safetensors.index.json): the MLA projections
# (kv_a_proj_with_mqa is [576, 7168]: a partial edge block), dense MLPs, shared and routed experts are e4m3;
# q_a/kv_a layernorms, the router mlp.gate and its e_score_correction_bias, the MTP layer's enorm/hnorm/eh_proj
# and shared_head, embeddings and lm_head are bf16
_DEEPSEEK_V3 = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|"
                          r"o_proj)|mlp\.((shared_experts|experts\.\d+)\.)?(gate|up|down)_proj)\.weight$")


def llama_fp8_weight(name: str) -> bool:
    """Llama 3 / Qwen3 (and Qwen2, Mistral: the same names): attention and MLP projections."""
    return _LLAMA.match(name) is not None


def deepseek_v3_fp8_weight(name: str) -> bool:
    """DeepSeek-V3: MLA projections, dense MLPs, shared and routed experts (see ``_DEEPSEEK_V3``)."""
    return _DEEPSEEK_V3.match(name) is not None


# built-in adapter name -> its HF architecture's rule; an identity or plug-in adapter is told by the HF
# config's model_type (the names are already HF's)
ARCHITECTURES: dict[str, Callable[[str], bool]] = {
    "llama3": llama_fp8_weight, "qwen3": llama_fp8_weight, "deepseek_v3": deepseek_v3_fp8_weight}
MODEL_TYPES = {"llama": "llama3", "mistral": "llama3", "qwen2": "qwen3", "qwen3": "qwen3", "deepseek_v3": "deepseek_v3"}

FP8_CONFIG = Schema(fields={  # what is read of an HF config's existing quantization_config (quant_method fp8)
    "quantization_config": Field(dict, absent="not quantized: 128 x 128 blocks, nothing skipped"),
    "quantization_config.weight_block_size": Field(list, absent="[128, 128]"),
})
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"  # transformers' should_convert_module: a pattern ends at a module boundary
MAX_PATTERN = 256


@dataclasses.dataclass(frozen=True)
class Fp8Scope:
    """The FP8 plan of one architecture: ``architecture`` (a built-in adapter name), ``block`` (rows, cols
    one scale covers) and ``skip`` (modules_to_not_convert: transformers' patterns, kept in high precision)."""

    architecture: str
    block: tuple[int, int] = (128, 128)
    skip: tuple[str, ...] = ()

    def quantizes(self, name: str) -> bool:
        """Whether HF weight ``name`` is stored as e4m3 + ``weight_scale_inv``."""
        if not ARCHITECTURES[self.architecture](name):
            return False
        module = name.removesuffix(".weight")
        # as transformers matches them: a regex from the start, up to a module boundary, or a suffix
        return not any(re.match(rf"(?:{key}){_BOUNDARY}", module) or module.endswith(key) for key in self.skip)

    def quantization_config(self) -> dict:
        """The ``quantization_config`` of config.json: what transformers' FineGrainedFP8Config and vLLM read."""
        config: dict[str, Any] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": list(self.block)}
        if self.skip:
            # an explicit list replaces transformers' default skips (lm_head): keep lm_head out of FP8Linear
            config["modules_to_not_convert"] = list(self.skip) + ([] if "lm_head" in self.skip else ["lm_head"])
        return config


def scale_name(name: str) -> str:
    """The HF name of a quantized weight's scales: ``<module>.weight`` -> ``<module>.weight_scale_inv``."""
    return name + "_scale_inv"


def _architecture(adapter: Any, config: dict) -> str:
    inner = adapter.adapter if isinstance(adapter, Prefixed) else adapter
    name = getattr(inner, "NAME", None)
    if name in ARCHITECTURES:
        return name
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise adapter_error(f"FP8 block quantization needs to know which weights the architecture's FP8 checkpoints "
                        f"quantize: the adapter is {name or type(inner).__name__} and the HF config's model_type is "
                        f"{short_repr(model_type)}; use a built-in adapter ({', '.join(sorted(ARCHITECTURES))}) or "
                        f"an HF config whose model_type is one of {', '.join(sorted(MODEL_TYPES))}")


def _skip_patterns(quant: dict) -> tuple[str, ...]:
    field = "quantization_config.modules_to_not_convert"
    value = quant.get("modules_to_not_convert")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) and 0 < len(p) <= MAX_PATTERN for p in value):
        raise HFConfigError(field, f"hf_config.{field} = {short_repr(value)}: FP8 quantization expects a list of "
                                   f"module names or patterns (strings of 1 to {MAX_PATTERN} characters), or null")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise HFConfigError(field, f"hf_config.{field} holds {pattern!r}, not a valid pattern ({exc}); "
                                       "escape regex characters, or name the module") from None
    return tuple(dict.fromkeys(value))


def fp8_scope(adapter: Any, hf_config: dict | None) -> Fp8Scope:
    """The FP8 plan for a version read or exported through ``adapter`` with ``hf_config``: the architecture's
    rule, and, when the config already says ``quant_method: fp8`` (a checkpoint loaded with load-hf), its
    ``weight_block_size`` and ``modules_to_not_convert``; else 128 x 128 blocks and nothing skipped beyond the
    rule. A wrong field is an :class:`~stager.protocol.HFConfigError` naming it, before any tensor is read."""
    config = hf_config if isinstance(hf_config, dict) else {}
    architecture = _architecture(adapter, config)
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        return Fp8Scope(architecture)  # another method's fields mean something else: FP8 replaces it
    values = check_config("FP8 block quantization", FP8_CONFIG, config)
    block = values["quantization_config.weight_block_size"] or [128, 128]
    if len(block) != 2:
        raise HFConfigError("quantization_config.weight_block_size",
                            f"hf_config.quantization_config.weight_block_size = {short_repr(block)}: FP8 block "
                            "quantization expects two integers (rows, columns), e.g. [128, 128]")
    return Fp8Scope(architecture, (block[0], block[1]), _skip_patterns(quant))
