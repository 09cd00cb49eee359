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
import functools
import re
from collections.abc import Callable
from typing import Any

import torch

from stager.protocol import HFConfigError
from stager.protocol.errors import short_repr
from stager.protocol.fp8_block import DEFAULT_BLOCK

from .base import Prefixed, adapter_error
from .config import FP8_QUANTIZATION, check_config

FP8_BLOCK = "fp8-block"  # the quantization a reader or exporter may ask for
QUANTIZE_CHOICES = (FP8_BLOCK,)

_LLAMA = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
# DeepSeek-V3's hub checkpoint (deepseek-ai/DeepSeek-V3, model.safetensors.index.json): the MLA projections
# (kv_a_proj_with_mqa is [576, 7168]: a partial edge block), dense MLPs, shared and routed experts are e4m3;
# q_a/kv_a layernorms, the router mlp.gate and its e_score_correction_bias, the MTP layer's enorm/hnorm/eh_proj
# and shared_head, embeddings and lm_head are bf16
_DEEPSEEK_V3 = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|"
    r"o_proj)|mlp\.((shared_experts|experts\.\d+)\.)?(gate|up|down)_proj)\.weight$"
)


def llama_fp8_weight(name: str) -> bool:
    """Llama 3 / Qwen3 (and Qwen2, Mistral: the same names): attention and MLP projections."""
    return _LLAMA.match(name) is not None


def deepseek_v3_fp8_weight(name: str) -> bool:
    """DeepSeek-V3: MLA projections, dense MLPs, shared and routed experts (see ``_DEEPSEEK_V3``)."""
    return _DEEPSEEK_V3.match(name) is not None


# built-in adapter name -> its HF architecture's rule; an identity or plug-in adapter is told by the HF
# config's model_type (the names are already HF's)
ARCHITECTURES: dict[str, Callable[[str], bool]] = {
    "llama3": llama_fp8_weight,
    "qwen3": llama_fp8_weight,
    "deepseek_v3": deepseek_v3_fp8_weight,
}
MODEL_TYPES = {"llama": "llama3", "mistral": "llama3", "qwen2": "qwen3", "qwen3": "qwen3", "deepseek_v3": "deepseek_v3"}

# modules_to_not_convert is peer-sent data (the staged hf_config): bounded, and matched as literal names, never
# compiled as regexes (a pattern such as "(.*.*)*x" backtracks for minutes on a module name)
MAX_SKIP = 4096  # entries: hub configs name a few modules, or whole layers by prefix
MAX_SKIP_CHARS = 256
# a dotted module path, whole components: for such a name, transformers' regex match (where '.' matches any
# character) and a literal match agree on real module names ("model.layers.2." would also skip layer 21 there)
_MODULE_NAME = re.compile(r"\w+(\.\w+)*", re.ASCII)


@dataclasses.dataclass(frozen=True)
class Fp8Scope:
    """The FP8 plan of one architecture: ``architecture`` (a built-in adapter name), ``block`` (rows, cols
    one scale covers) and ``skip`` (modules_to_not_convert: module names kept in high precision)."""

    architecture: str
    block: tuple[int, int] = DEFAULT_BLOCK
    skip: tuple[str, ...] = ()

    @functools.cached_property
    def _skip(self) -> frozenset[str]:
        return frozenset(self.skip)

    def skipped(self, module: str) -> bool:
        """Whether ``module`` is one ``skip`` keeps in high precision, as transformers' ``should_convert_module``
        (5.23) matches a plain name: a prefix ending at a module boundary ("model.layers.1" is
        "model.layers.1.mlp", not "model.layers.11.mlp"), or a suffix ("v_proj", and "proj" too). Set look-ups of
        the module's own prefixes and suffixes: linear in the name, whatever the list's size."""
        if not self._skip:
            return False
        prefixes = (module[:i] for i, c in enumerate(module) if c == ".")
        return any(p in self._skip for p in prefixes) or any(module[i:] in self._skip for i in range(len(module)))

    def quantizes(self, name: str) -> bool:
        """Whether HF weight ``name`` is stored as e4m3 + ``weight_scale_inv`` (the architecture's rule, less
        what ``skip`` names)."""
        return ARCHITECTURES[self.architecture](name) and not self.skipped(name.removesuffix(".weight"))

    def eligible(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Whether the tensor ``name`` of ``shape`` and ``dtype`` is quantized: a 2-D high-precision float weight
        that :meth:`quantizes` names. The one test readers and export-hf apply, so both give the same bytes."""
        return len(shape) == 2 and dtype.is_floating_point and dtype.itemsize > 1 and self.quantizes(name)

    def quantization_config(self) -> dict:
        """The ``quantization_config`` of config.json: what transformers' FineGrainedFP8Config and vLLM read."""
        config: dict[str, Any] = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": list(self.block),
        }
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
    raise adapter_error(
        f"FP8 block quantization needs to know which weights the architecture's FP8 checkpoints "
        f"quantize: the adapter is {name or type(inner).__name__} and the HF config's model_type is "
        f"{short_repr(model_type)}; use a built-in adapter ({', '.join(sorted(ARCHITECTURES))}) or "
        f"an HF config whose model_type is one of {', '.join(sorted(MODEL_TYPES))}"
    )


def _skip_modules(quant: dict) -> tuple[str, ...]:
    field = "quantization_config.modules_to_not_convert"
    value = quant.get("modules_to_not_convert")
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or len(value) > MAX_SKIP
        or not all(isinstance(p, str) and 0 < len(p) <= MAX_SKIP_CHARS for p in value)
    ):
        raise HFConfigError(
            field,
            f"hf_config.{field} = {short_repr(value)}: FP8 quantization expects a list of "
            f"module names (at most {MAX_SKIP}, strings of 1 to {MAX_SKIP_CHARS} "
            "characters), or null",
        )
    for entry in value:
        if not _MODULE_NAME.fullmatch(entry):
            raise HFConfigError(
                field,
                f"hf_config.{field} holds {short_repr(entry)}: stager matches these entries as "
                "literal module names (a prefix up to a '.', or a suffix), not as regexes; "
                "list the modules by their dotted names (letters, digits and '_' between "
                "single dots, no dot at either end), e.g. 'model.layers.0.mlp' or 'lm_head'",
            )
    return tuple(dict.fromkeys(value))


def fp8_scope(adapter: Any, hf_config: dict | None) -> Fp8Scope:
    """The FP8 plan for a version read or exported through ``adapter`` with ``hf_config``: the architecture's
    rule, and, when the config already says ``quant_method: fp8`` (a checkpoint loaded with load-hf), its
    ``weight_block_size`` and ``modules_to_not_convert``; else 128 x 128 blocks and nothing skipped beyond the
    rule (:data:`~stager.protocol.fp8_block.DEFAULT_BLOCK`). A wrong field is an
    :class:`~stager.protocol.HFConfigError` naming it, before any tensor is read."""
    config = hf_config if isinstance(hf_config, dict) else {}
    architecture = _architecture(adapter, config)
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        return Fp8Scope(architecture)  # another method's fields mean something else: FP8 replaces it
    values = check_config("FP8 block quantization", FP8_QUANTIZATION, config)
    block = values["quantization_config.weight_block_size"] or list(DEFAULT_BLOCK)
    if len(block) != 2:
        raise HFConfigError(
            "quantization_config.weight_block_size",
            f"hf_config.quantization_config.weight_block_size = {short_repr(block)}: FP8 block "
            f"quantization expects two integers (rows, columns), e.g. {list(DEFAULT_BLOCK)}",
        )
    return Fp8Scope(architecture, (block[0], block[1]), _skip_modules(quant))
