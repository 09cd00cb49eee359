"""torchtitan Llama 3 and Qwen3 (dense) <-> Hugging Face ``LlamaForCausalLM`` / ``Qwen3ForCausalLM``."""

from __future__ import annotations

import re
from typing import Any

import torch

from .base import adapter_error, permute_for_hf_rotary, rotary_rows, unpermute_from_hf_rotary
from .config import LLAMA3, check_config

_FORMS = ("legacy", "qkv_linear")
_ROPE_LAYOUTS = ("interleaved", "halves")


class Llama3Adapter:
    """torchtitan Llama 3 <-> HF ``LlamaForCausalLM``.

    Native names: torchtitan 0.3.0's ``layers.N.attention.qkv_linear.{wq,wk,wv}`` (what its fused
    QKV attention's state dict holds; the fused ``qkv_linear.wqkv`` itself, as ``named_parameters()``
    gives it, is split here too) or the earlier ``layers.N.attention.{wq,wk,wv}``; ``attention.wo``,
    ``attention_norm``, ``ffn_norm``, ``feed_forward.{w1,w2,w3}``, ``tok_embeddings``, ``norm`` and
    ``lm_head`` (earlier ``output``).

    ``native_form``: the names ``from_hf`` writes. None (default): the ones ``to_hf`` saw, per HF
    name, and torchtitan 0.3.0's (``qkv_linear``, ``lm_head``) for names it has not seen;
    ``"qkv_linear"``: always torchtitan 0.3.0's; ``"legacy"``: ``attention.wq`` ..., ``output``.

    ``rope_layout``: ``"interleaved"`` (Llama 3's default: torchtitan's ComplexRoPE rotates Meta's
    interleaved pairs, so q and k rows are permuted to HF's rotate_half order, n_heads for q,
    n_kv_heads for k) or ``"halves"`` (already HF's order: nothing is permuted).

    ``hf_config`` needs ``hidden_size`` and ``num_attention_heads``; ``num_key_value_heads``,
    ``head_dim`` and ``tie_word_embeddings`` are read when present. All are checked (types, ranges,
    heads divisible, an even head dim) when the adapter is made: :data:`~.config.LLAMA3`.
    """

    # native pattern (N = layer) -> HF pattern; where several natives share an HF name, the first is torchtitan 0.3.0's
    LAYER_KEYS = {
        "attention.qkv_linear.wq.weight": "self_attn.q_proj.weight",
        "attention.qkv_linear.wk.weight": "self_attn.k_proj.weight",
        "attention.qkv_linear.wv.weight": "self_attn.v_proj.weight",
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
    }
    FUSED_QKV = "attention.qkv_linear.wqkv.weight"  # torchtitan's FusedQKVLinear parameter: [n_kv, q/kv + 2, hd, in]
    TOP_KEYS = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
        "output.weight": "lm_head.weight",
    }
    NOT_WRITTEN: tuple[str, ...] = ()  # accepted by to_hf, written by from_hf only when to_hf saw them
    NAME = "llama3"
    CONFIG = LLAMA3  # the hf_config fields read, and what they accept
    ROPE_LAYOUT = "interleaved"
    _LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
    _HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

    def __init__(self, hf_config: dict, *, native_form: str | None = None, rope_layout: str | None = None):
        if native_form not in (None, *_FORMS):
            raise ValueError(
                "native_form must be None (the names to_hf saw), 'qkv_linear' (torchtitan 0.3.0: "
                "attention.qkv_linear.wq, lm_head) or 'legacy' (attention.wq, output)"
            )
        rope_layout = rope_layout or self.ROPE_LAYOUT
        if rope_layout not in _ROPE_LAYOUTS:
            raise ValueError("rope_layout must be 'interleaved' (Meta-style pairs, permuted for HF) or 'halves'")
        c = check_config(f"the {self.NAME} adapter", self.CONFIG, hf_config)  # before any tensor is read
        self.n_heads = c["num_attention_heads"]
        self.n_kv_heads = c["num_key_value_heads"] or self.n_heads
        self.head_dim = c["head_dim"] or c["hidden_size"] // self.n_heads
        self.tied = c["tie_word_embeddings"]
        self.native_form = native_form
        self.permute = rope_layout == "interleaved"
        legacy = native_form == "legacy"
        # from_hf writes one naming form: the other form's q/k/v keys are left out of the reverse map
        other = "attention.qkv_linear.{}.weight" if legacy else "attention.{}.weight"
        drop = {other.format(w) for w in ("wq", "wk", "wv")} | set(self.NOT_WRITTEN)
        self._from_hf_layer: dict[str, str] = {}
        for native, hf in self.LAYER_KEYS.items():
            if native not in drop:
                self._from_hf_layer.setdefault(hf, native)
        self._from_hf_top = {
            "model.embed_tokens.weight": "tok_embeddings.weight",
            "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight" if legacy else "lm_head.weight",
        }
        # what to_hf saw (native_form None): HF name -> native name, so from_hf writes the same names back
        self._seen_layer: dict[str, str] = {}
        self._seen_top: dict[str, str] = {}

    def _lookup(self, table: dict, key: str, name: str) -> str:
        try:
            return table[key]
        except KeyError:
            raise adapter_error(f"{name}: the {self.NAME} adapter does not know this key") from None

    def _rotary_heads(self, native_suffix: str) -> int | None:
        if native_suffix.endswith("wq.weight"):
            return self.n_heads
        if native_suffix.endswith("wk.weight"):
            return self.n_kv_heads
        return None

    def _check_rows(self, name: str, tensor: torch.Tensor, heads: int) -> None:
        if tensor.dim() != 2 or tensor.shape[0] != heads * self.head_dim:
            raise adapter_error(
                f"{name}: shape {list(tensor.shape)} contradicts the config ({heads} heads x head_dim "
                f"{self.head_dim} = {heads * self.head_dim} rows); check hf_config"
            )

    def _split_fused_qkv(self, name: str, w: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """torchtitan's FusedQKVLinear ``wqkv`` ([n_kv, q heads per kv + 2, head_dim, in] rows) -> wq, wk, wv,
        as its state-dict hook splits it."""
        if self.n_heads % self.n_kv_heads:
            raise adapter_error(
                f"{name}: a fused wqkv needs num_attention_heads ({self.n_heads}) divisible by "
                f"num_key_value_heads ({self.n_kv_heads})"
            )
        per_kv = self.n_heads // self.n_kv_heads
        self._check_rows(name, w, self.n_kv_heads * (per_kv + 2))
        grouped = w.view(self.n_kv_heads, per_kv + 2, self.head_dim, w.shape[1])
        parts = {"wq": grouped[:, :per_kv], "wk": grouped[:, per_kv], "wv": grouped[:, per_kv + 1]}
        return [(f"attention.qkv_linear.{k}.weight", p.reshape(-1, w.shape[1])) for k, p in parts.items()]

    def _layer_item(
        self, layer: str, suffix: str, tensor: torch.Tensor, name: str
    ) -> tuple[str, torch.Tensor, int | None]:
        hf = self._lookup(self.LAYER_KEYS, suffix, name)
        heads = self._rotary_heads(suffix)
        if heads is not None:
            self._check_rows(name, tensor, heads)
        self._seen_layer[hf] = suffix
        return f"model.layers.{layer}.{hf}", tensor, heads if self.permute else None

    def _items(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor, int | None]]:
        """``[(hf name, tensor, heads)]``: the HF tensor is ``tensor`` with its rotary rows still to
        be permuted over ``heads`` heads (None: as is)."""
        match = self._LAYER.match(name)
        if match:
            layer, suffix = match.groups()
            if suffix == self.FUSED_QKV:
                return [self._layer_item(layer, part, t, name) for part, t in self._split_fused_qkv(name, tensor)]
            return [self._layer_item(layer, suffix, tensor, name)]
        hf = self._lookup(self.TOP_KEYS, name, name)
        self._seen_top[hf] = name
        if hf == "lm_head.weight" and self.tied:
            return []  # tied: transformers takes lm_head from the embedding
        return [(hf, tensor, None)]

    def to_hf_items(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [
            (hf, t if heads is None else permute_for_hf_rotary(t, heads)) for hf, t, heads in self._items(name, tensor)
        ]

    def hf_row_orders(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """:func:`~stager.client.adapters.base.hf_row_orders`: q and k (not split out of a fused wqkv),
        when their rotary rows are permuted; the row order is :func:`rotary_rows`, the permutation's own."""
        return {
            hf: rotary_rows(t.shape[0], heads)
            for hf, t, heads in self._items(name, tensor)
            if heads is not None and t is tensor
        }

    def to_hf_into(self, name: str, tensor: torch.Tensor, out: dict[str, torch.Tensor]) -> list[str]:
        """:func:`~stager.client.adapters.fill_hf` for this adapter: permuted rows are written
        straight into ``out``'s tensors (an engine's own parameters), with no intermediate."""
        written = []
        for hf, t, heads in self._items(name, tensor):
            dst = out.get(hf)
            if dst is None:
                continue
            if heads is None:
                dst.copy_(t)
            else:
                permute_for_hf_rotary(t, heads, out=dst)
            written.append(hf)
        return written

    def to_hf(self, state_dict: dict) -> dict:
        return dict(item for name, t in state_dict.items() for item in self.to_hf_items(name, t))

    def _native(self, seen: dict, table: dict, hf: str, name: str) -> str:
        if self.native_form is None and hf in seen:
            return seen[hf]
        return self._lookup(table, hf, name)

    def from_hf(self, hf_state_dict: dict) -> dict:
        out: dict[str, Any] = {}
        for name, tensor in hf_state_dict.items():
            match = self._HF_LAYER.match(name)
            if match:
                layer, suffix = match.groups()
                if suffix.endswith("rotary_emb.inv_freq"):
                    continue
                native = self._native(self._seen_layer, self._from_hf_layer, suffix, name)
                heads = self._rotary_heads(native)
                if heads is not None:
                    self._check_rows(name, tensor, heads)
                    if self.permute:
                        tensor = unpermute_from_hf_rotary(tensor, heads)
                out[f"layers.{layer}.{native}"] = tensor
                continue
            out[self._native(self._seen_top, self._from_hf_top, name, name)] = tensor
        output = self._native(self._seen_top, self._from_hf_top, "lm_head.weight", "lm_head.weight")
        if self.tied and output not in out and "tok_embeddings.weight" in out:
            out[output] = out["tok_embeddings.weight"]
        return out


class Qwen3Adapter(Llama3Adapter):
    """torchtitan Qwen3 (dense) <-> HF ``Qwen3ForCausalLM``: Llama 3's names plus per-head q/k RMSNorms
    (``attention.q_norm`` / ``attention.k_norm``).

    torchtitan's Qwen3 rotates halves (its CosSinRoPE, HF's rotate_half order), so no weight is
    permuted (``rope_layout="halves"``, the default here); ``rope_layout="interleaved"`` is for Qwen3
    ports with Meta-style interleaved rotary: q/k rows and the q/k norm weights are then permuted
    (pairs -> halves). The MLP is ``feed_forward.w1/w2/w3`` (``mlp.w1/w2/w3`` is accepted too);
    ``head_dim`` comes from the config (Qwen3 sets it)."""

    NAME = "qwen3"
    ROPE_LAYOUT = "halves"
    LAYER_KEYS = {
        **Llama3Adapter.LAYER_KEYS,
        "attention.q_norm.weight": "self_attn.q_norm.weight",
        "attention.k_norm.weight": "self_attn.k_norm.weight",
        "mlp.w1.weight": "mlp.gate_proj.weight",
        "mlp.w2.weight": "mlp.down_proj.weight",
        "mlp.w3.weight": "mlp.up_proj.weight",
    }
    NOT_WRITTEN = ("mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight")
    _NORMS = ("attention.q_norm.weight", "attention.k_norm.weight")

    def _items(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor, int | None]]:
        if name.endswith(self._NORMS):
            self._check_norm(name, tensor)
            if self.permute:
                tensor = tensor.view(-1, 2).t().reshape(-1)  # (head_dim/2, 2) pairs -> (2, head_dim/2) halves
        return super()._items(name, tensor)

    def from_hf(self, hf_state_dict: dict) -> dict:
        out = super().from_hf(hf_state_dict)
        for name in [n for n in out if n.endswith(self._NORMS)]:
            self._check_norm(name, out[name])
            if self.permute:
                out[name] = out[name].view(2, -1).t().reshape(-1)
        return out

    def _check_norm(self, name: str, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != (self.head_dim,):
            raise adapter_error(f"{name}: shape {list(tensor.shape)} contradicts the config (head_dim {self.head_dim})")
