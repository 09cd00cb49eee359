"""Hugging Face state-dict adapters: native (training) names and layouts <-> HF names and layouts.

An adapter is any object with ``to_hf(state_dict)`` and ``from_hf(hf_state_dict)`` (torchtitan's
StateDictAdapter shape, so theirs plug in: ``load_adapter("pkg.module:Adapter", hf_config)``).
Built-in adapters also offer ``to_hf_items(name, tensor)``, which converts one tensor at a time:
an exporter never needs a second full copy of the model in memory.

>>> a = load_adapter("llama3", {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1})
>>> [k for k, _ in a.to_hf_items("layers.0.feed_forward.w1.weight", torch.zeros(16, 8))]
['model.layers.0.mlp.gate_proj.weight']
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Iterable, Protocol

import torch

from stager.protocol import ErrorCode, StagerError


class Adapter(Protocol):
    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]: ...

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]: ...


def _error(message: str) -> StagerError:
    return StagerError(ErrorCode.BAD_VALUE, message)


class IdentityAdapter:
    """The trained model already is a transformers model (common in RL frameworks): names pass through."""

    def __init__(self, hf_config: dict | None = None):
        self.hf_config = hf_config or {}

    def to_hf_items(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(name, tensor)]

    def to_hf(self, state_dict: dict) -> dict:
        return dict(state_dict)

    def from_hf(self, hf_state_dict: dict) -> dict:
        return dict(hf_state_dict)


def permute_for_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta-style (interleaved pairs) rotary rows -> HF's rotate_half order, per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_from_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_for_hf_rotary`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


class Llama3Adapter:
    """torchtitan Llama 3 <-> HF ``LlamaForCausalLM``.

    Native names: ``tok_embeddings``, ``layers.N.attention.{wq,wk,wv,wo}`` (or the newer
    ``layers.N.attention.qkv_linear.{wq,wk,wv}``), ``attention_norm``, ``ffn_norm``,
    ``feed_forward.{w1,w2,w3}``, ``norm``, ``output`` (or ``lm_head``). q and k rows are permuted
    from Meta's interleaved rotary layout to HF's (n_heads for q, n_kv_heads for k).
    ``hf_config`` needs ``hidden_size`` and ``num_attention_heads``; ``num_key_value_heads``,
    ``head_dim`` and ``tie_word_embeddings`` are read when present.
    """

    # native pattern (N = layer) -> HF pattern; None: not exported
    LAYER_KEYS = {
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.qkv_linear.wq.weight": "self_attn.q_proj.weight",
        "attention.qkv_linear.wk.weight": "self_attn.k_proj.weight",
        "attention.qkv_linear.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
    }
    TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight"}
    NAME = "llama3"
    _LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
    _HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

    def __init__(self, hf_config: dict, *, native_form: str = "legacy"):
        if native_form not in ("legacy", "qkv_linear"):
            raise ValueError("native_form must be 'legacy' (attention.wq, output) or 'qkv_linear'")
        try:
            hidden, self.n_heads = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
        except (KeyError, TypeError, ValueError):
            raise _error("the llama3 adapter needs hf_config with hidden_size and num_attention_heads") from None
        self.n_kv_heads = int(hf_config.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(hf_config.get("head_dim") or hidden // self.n_heads)
        self.tied = bool(hf_config.get("tie_word_embeddings", False))
        self.native_form = native_form
        legacy = native_form == "legacy"
        # from_hf produces one naming form: drop the other form's q/k/v keys from the reverse map
        other = "attention.qkv_linear.{}.weight" if legacy else "attention.{}.weight"
        drop = {other.format(w) for w in ("wq", "wk", "wv")}
        self._from_hf_layer = {hf: native for native, hf in self.LAYER_KEYS.items() if native not in drop}
        self._from_hf_top = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                             "lm_head.weight": "output.weight" if legacy else "lm_head.weight"}

    def _lookup(self, table: dict, key: str, name: str) -> str:
        try:
            return table[key]
        except KeyError:
            raise _error(f"{name}: the {self.NAME} adapter does not know this key") from None

    def _rotary_heads(self, native_suffix: str) -> int | None:
        if native_suffix.endswith("wq.weight"):
            return self.n_heads
        if native_suffix.endswith("wk.weight"):
            return self.n_kv_heads
        return None

    def _check_rows(self, name: str, tensor: torch.Tensor, heads: int) -> None:
        if tensor.dim() != 2 or tensor.shape[0] != heads * self.head_dim:
            raise _error(f"{name}: shape {list(tensor.shape)} contradicts the config ({heads} heads x head_dim "
                         f"{self.head_dim} = {heads * self.head_dim} rows); check hf_config")

    def to_hf_items(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        match = self._LAYER.match(name)
        if match:
            layer, suffix = match.groups()
            hf = self._lookup(self.LAYER_KEYS, suffix, name)
            heads = self._rotary_heads(suffix)
            if heads is not None:
                self._check_rows(name, tensor, heads)
                tensor = permute_for_hf_rotary(tensor, heads)
            return [(f"model.layers.{layer}.{hf}", tensor)]
        hf = self._lookup(self.TOP_KEYS, name, name)
        if hf == "lm_head.weight" and self.tied:
            return []  # tied: transformers takes lm_head from the embedding
        return [(hf, tensor)]

    def to_hf(self, state_dict: dict) -> dict:
        return dict(item for name, t in state_dict.items() for item in self.to_hf_items(name, t))

    def from_hf(self, hf_state_dict: dict) -> dict:
        out: dict[str, Any] = {}
        for name, tensor in hf_state_dict.items():
            match = self._HF_LAYER.match(name)
            if match:
                layer, suffix = match.groups()
                if suffix.endswith("rotary_emb.inv_freq"):
                    continue
                native = self._lookup(self._from_hf_layer, suffix, name)
                heads = self._rotary_heads(native)
                if heads is not None:
                    self._check_rows(name, tensor, heads)
                    tensor = unpermute_from_hf_rotary(tensor, heads)
                out[f"layers.{layer}.{native}"] = tensor
                continue
            out[self._lookup(self._from_hf_top, name, name)] = tensor
        output = self._from_hf_top["lm_head.weight"]
        if self.tied and output not in out and "tok_embeddings.weight" in out:
            out[output] = out["tok_embeddings.weight"]
        return out


class Qwen3Adapter(Llama3Adapter):
    """torchtitan Qwen3 (dense) <-> HF ``Qwen3ForCausalLM``: Llama 3 plus per-head q/k RMSNorms, whose
    weights follow the same rotary permutation (pairs -> halves), and MLP named ``mlp.w1/w2/w3``
    (``feed_forward.*`` is accepted too). ``head_dim`` comes from the config (Qwen3 sets it)."""

    NAME = "qwen3"
    LAYER_KEYS = {
        **Llama3Adapter.LAYER_KEYS,
        "attention.q_norm.weight": "self_attn.q_norm.weight",
        "attention.k_norm.weight": "self_attn.k_norm.weight",
        "mlp.w1.weight": "mlp.gate_proj.weight",
        "mlp.w2.weight": "mlp.down_proj.weight",
        "mlp.w3.weight": "mlp.up_proj.weight",
    }

    def __init__(self, hf_config: dict, *, native_form: str = "legacy"):
        super().__init__(hf_config, native_form=native_form)
        for native in ("feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight"):
            self._from_hf_layer.pop(self.LAYER_KEYS[native], None)
        self._from_hf_layer.update({hf: native for native, hf in self.LAYER_KEYS.items() if native.startswith("mlp.")})

    def to_hf_items(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
            self._check_norm(name, tensor)
            tensor = tensor.view(-1, 2).t().reshape(-1)  # (head_dim/2, 2) pairs -> (2, head_dim/2) halves
        return super().to_hf_items(name, tensor)

    def from_hf(self, hf_state_dict: dict) -> dict:
        out = super().from_hf(hf_state_dict)
        for name in [n for n in out if n.endswith(("attention.q_norm.weight", "attention.k_norm.weight"))]:
            self._check_norm(name, out[name])
            out[name] = out[name].view(2, -1).t().reshape(-1)
        return out

    def _check_norm(self, name: str, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != (self.head_dim,):
            raise _error(f"{name}: shape {list(tensor.shape)} contradicts the config (head_dim {self.head_dim})")


def _deepseek_v3(hf_config: dict) -> Any:
    from stager.adapter_deepseek import DeepSeekV3Adapter  # imported when used: that module imports this one

    return DeepSeekV3Adapter(hf_config)


BUILT_IN = {"identity": IdentityAdapter, "llama3": Llama3Adapter, "qwen3": Qwen3Adapter, "deepseek_v3": _deepseek_v3}


def load_adapter(spec: str, hf_config: dict | None = None) -> Any:
    """A built-in adapter by name (``llama3``, ``qwen3``, ``deepseek_v3``, ``identity``) or ``module:attr``
    naming a class or factory called with the HF config (torchtitan's adapters take model args: wrap them)."""
    if spec in BUILT_IN:
        return BUILT_IN[spec](hf_config or {})
    if ":" not in spec:
        raise _error(f"unknown adapter {spec!r}; built in: {sorted(BUILT_IN)}, or 'package.module:attr'")
    module_name, attr = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise _error(f"cannot load adapter {spec!r}: {exc}") from None
    adapter = factory(hf_config or {}) if callable(factory) and isinstance(factory, type) else factory
    if not (hasattr(adapter, "to_hf") and hasattr(adapter, "from_hf")):
        raise _error(f"{spec} has no to_hf/from_hf: an adapter must offer both (torchtitan's StateDictAdapter shape)")
    return adapter


def to_hf_items(adapter: Any, items: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    """Convert tensor by tensor with built-in adapters; plug-ins get the whole dict once (eager)."""
    if hasattr(adapter, "to_hf_items"):
        for name, tensor in items:
            yield from adapter.to_hf_items(name, tensor)
    else:
        yield from adapter.to_hf(dict(items)).items()
