"""torchtitan DeepSeek-V3 <-> HF ``DeepseekV3ForCausalLM`` (the hub checkpoint layout), tensor by tensor.

torchtitan keeps each MoE layer's routed experts as three grouped 3-D tensors
(``moe.experts.w1/w2/w3``, ``[n_routed_experts, out, in]``); HF checkpoints hold one
``mlp.experts.{e}.{gate,down,up}_proj.weight`` per expert (transformers fuses them again on load).
``to_hf_items`` splits a grouped tensor into its experts (views, no copy); ``from_hf`` stacks
them back, so ``from_hf(to_hf(sd))`` is exact.

>>> cfg = {"hidden_size": 8, "num_attention_heads": 2, "n_routed_experts": 2, "moe_intermediate_size": 4,
...        "q_lora_rank": 0, "kv_lora_rank": 4, "qk_nope_head_dim": 2, "qk_rope_head_dim": 2,
...        "v_head_dim": 2, "first_k_dense_replace": 1}
>>> [k for k, _ in DeepSeekV3Adapter(cfg).to_hf_items("layers.1.moe.experts.w1", torch.zeros(2, 4, 8))]
['model.layers.1.mlp.experts.0.gate_proj.weight', 'model.layers.1.mlp.experts.1.gate_proj.weight']
"""

from __future__ import annotations

import re
from typing import Any

import torch

from stager.adapters import _error, permute_for_hf_rotary, unpermute_from_hf_rotary


class DeepSeekV3Adapter:
    """torchtitan DeepSeek-V3 <-> HF ``DeepseekV3ForCausalLM``.

    ``hf_config`` needs hidden_size, num_attention_heads, n_routed_experts, moe_intermediate_size,
    kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim and first_k_dense_replace;
    q_lora_rank (0/None: a plain ``wq``) and rope_interleave (default True) are read when present.

    Rotary: torchtitan rotates interleaved pairs (complex multiply) and so does transformers when
    ``rope_interleave`` is true (its default), so weights pass unchanged; with ``rope_interleave:
    false`` the rope rows of wq/wq_b (per head) and wkv_a are permuted to rotate_half order.

    Grouped experts: torchtitan's GroupedExperts are ``[E, out, in]`` (nn.Linear order, computed as
    ``x @ w[e].T``); early versions were ``[E, in, out]`` (``x @ w[e]``). ``expert_layout`` is
    ``"out_in"``, ``"in_out"`` or None: tell from the shapes (square experts: ``out_in``); the layout
    seen is the one ``from_hf`` writes back.

    Dropped by ``to_hf``: ``moe.tokens_per_expert`` (torchtitan's load-balancing counts, not a
    weight; a non-persistent buffer in current torchtitan, persisted by older versions).
    """

    NAME = "deepseek_v3"
    NEEDS = ("hidden_size", "num_attention_heads", "n_routed_experts", "moe_intermediate_size", "kv_lora_rank",
             "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "first_k_dense_replace")
    LAYER_KEYS = {
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wq_a.weight": "self_attn.q_a_proj.weight",
        "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
        "attention.wq_b.weight": "self_attn.q_b_proj.weight",
        "attention.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
        "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
        "attention.wkv_b.weight": "self_attn.kv_b_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "moe.router.gate.weight": "mlp.gate.weight",
        "moe.expert_bias": "mlp.gate.e_score_correction_bias",
        "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
        "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
        "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    }
    TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
    EXPERTS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    DROPPED = ("moe.tokens_per_expert",)
    _LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
    _HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    _HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|down_proj|up_proj)\.weight$")

    def __init__(self, hf_config: dict, *, expert_layout: str | None = None):
        missing = [k for k in self.NEEDS if not isinstance((hf_config or {}).get(k), int)]
        if missing:
            raise _error(f"the deepseek_v3 adapter needs hf_config with {', '.join(missing)} (integers)")
        if expert_layout not in (None, "out_in", "in_out"):
            raise ValueError("expert_layout must be None (from the shapes), 'out_in' or 'in_out'")
        c = hf_config
        self.dim, self.heads, self.n_experts = c["hidden_size"], c["num_attention_heads"], c["n_routed_experts"]
        self.moe_dim, self.kv_rank = c["moe_intermediate_size"], c["kv_lora_rank"]
        self.first_moe = c["first_k_dense_replace"]  # layers before it are dense (feed_forward), the rest MoE
        self.nope, self.rope, self.v_dim = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        self.q_rank = int(c.get("q_lora_rank") or 0)
        self.permute_rope = not c.get("rope_interleave", True)
        self.expert_layout = expert_layout
        q_rows, h = self.heads * (self.nope + self.rope), self.dim
        # expected shapes: a contradiction fails here, naming the key, not later inside transformers
        self.shapes = {"attention.wkv_a.weight": (self.kv_rank + self.rope, h),
                       "attention.kv_norm.weight": (self.kv_rank,),
                       "attention.wkv_b.weight": (self.heads * (self.nope + self.v_dim), self.kv_rank),
                       "attention.wo.weight": (h, self.heads * self.v_dim), "attention_norm.weight": (h,),
                       "ffn_norm.weight": (h,), "moe.router.gate.weight": (self.n_experts, h),
                       "moe.expert_bias": (self.n_experts,)}
        if self.q_rank:
            self.shapes.update({"attention.wq_a.weight": (self.q_rank, h), "attention.q_norm.weight": (self.q_rank,),
                                "attention.wq_b.weight": (q_rows, self.q_rank)})
        else:
            self.shapes["attention.wq.weight"] = (q_rows, h)
        self._from_hf_layer = {hf: native for native, hf in self.LAYER_KEYS.items()}
        self._from_hf_top = {hf: native for native, hf in self.TOP_KEYS.items()}

    def _lookup(self, table: dict, key: str, name: str) -> str:
        try:
            return table[key]
        except KeyError:
            raise _error(f"{name}: the {self.NAME} adapter does not know this key") from None

    def _contradicts(self, name: str, shape, why: str) -> Exception:
        return _error(f"{name}: shape {list(shape)} contradicts the config ({why})")

    def _check(self, name: str, layer: int, suffix: str, tensor: torch.Tensor) -> None:
        moe = suffix.startswith("moe.")
        if moe != (layer >= self.first_moe) and (moe or suffix.startswith("feed_forward.")):
            raise _error(f"{name}: layer {layer} is {'dense' if moe else 'MoE'} by the config "
                         f"(first_k_dense_replace={self.first_moe}): this key contradicts the config")
        if suffix.startswith("attention.wq") or suffix == "attention.q_norm.weight":
            if suffix not in self.shapes:  # wq with a q LoRA, or wq_a/wq_b without: HF has no such weight
                raise self._contradicts(name, tensor.shape, f"q_lora_rank={self.q_rank}")
        want = self.shapes.get(suffix)
        if want is not None and tuple(tensor.shape) != want:
            raise self._contradicts(name, tensor.shape, f"expected {list(want)}")

    def _rope_rows(self, suffix: str, w: torch.Tensor, inverse: bool) -> torch.Tensor:
        """Interleaved-pair rope rows <-> rotate_half order, for HF configs with rope_interleave false."""
        if not self.permute_rope or suffix not in ("attention.wq.weight", "attention.wq_b.weight",
                                                   "attention.wkv_a.weight"):
            return w
        heads, lead = (1, self.kv_rank) if suffix == "attention.wkv_a.weight" else (self.heads, self.nope)
        per_head = w.reshape(heads, lead + self.rope, -1)  # rows per head: nope (or kv latent) rows, then rope rows
        permute = unpermute_from_hf_rotary if inverse else permute_for_hf_rotary
        rope = permute(per_head[:, lead:].reshape(heads * self.rope, -1), heads).view(heads, self.rope, -1)
        return torch.cat([per_head[:, :lead], rope], 1).reshape(w.shape)

    def _expert_layout_of(self, name: str, w: torch.Tensor, proj: str) -> str:
        out_in = (self.n_experts, self.dim, self.moe_dim) if proj == "w2" else (self.n_experts, self.moe_dim, self.dim)
        fits = [lay for lay, shape in (("out_in", out_in), ("in_out", (out_in[0], out_in[2], out_in[1])))
                if tuple(w.shape) == shape]
        if not fits:
            raise self._contradicts(name, w.shape, f"expected {list(out_in)} from n_routed_experts, "
                                                   "moe_intermediate_size and hidden_size (or its transpose)")
        if self.expert_layout in fits:
            return self.expert_layout
        if self.expert_layout is None:  # square experts fit both: torchtitan's current layout
            if len(fits) == 1:
                self.expert_layout = fits[0]  # what from_hf writes back
            return fits[0]
        raise self._contradicts(name, w.shape, f"{fits[0]} expert layout, but this adapter uses {self.expert_layout}")

    def to_hf_items(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        match = self._LAYER.match(name)
        if not match:
            return [(self._lookup(self.TOP_KEYS, name, name), tensor)]
        layer, suffix = match.groups()
        if suffix in self.DROPPED:
            return []
        self._check(name, int(layer), suffix, tensor)
        if suffix.startswith("moe.experts."):
            proj = self._lookup({f"moe.experts.{w}": w for w in self.EXPERTS}, suffix, name)
            if self._expert_layout_of(name, tensor, proj) == "in_out":
                tensor = tensor.transpose(1, 2)  # HF experts are nn.Linear weights: [out, in]
            return [(f"model.layers.{layer}.mlp.experts.{e}.{self.EXPERTS[proj]}.weight", w)
                    for e, w in enumerate(tensor.unbind(0))]
        hf = self._lookup(self.LAYER_KEYS, suffix, name)
        return [(f"model.layers.{layer}.{hf}", self._rope_rows(suffix, tensor, inverse=False))]

    def to_hf(self, state_dict: dict) -> dict:
        return dict(item for name, t in state_dict.items() for item in self.to_hf_items(name, t))

    def from_hf(self, hf_state_dict: dict) -> dict:
        out: dict[str, Any] = {}
        experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        for name, tensor in hf_state_dict.items():
            match = self._HF_EXPERT.match(name)
            if match:
                layer, e, proj = match.groups()
                if int(e) >= self.n_experts:
                    raise _error(f"{name}: expert {e} contradicts the config (n_routed_experts={self.n_experts})")
                experts.setdefault((layer, proj), {})[int(e)] = tensor
                continue
            match = self._HF_LAYER.match(name)
            if not match:
                out[self._lookup(self._from_hf_top, name, name)] = tensor
                continue
            layer, suffix = match.groups()
            if suffix.endswith("rotary_emb.inv_freq"):
                continue
            native = self._lookup(self._from_hf_layer, suffix, name)
            self._check(name, int(layer), native, tensor)
            out[f"layers.{layer}.{native}"] = self._rope_rows(native, tensor, inverse=True)
        native_of = {hf: w for w, hf in self.EXPERTS.items()}
        for (layer, proj), per_expert in experts.items():
            absent = [e for e in range(self.n_experts) if e not in per_expert]
            if absent:
                raise _error(f"model.layers.{layer}.mlp.experts.{absent[0]}.{proj}.weight is missing: "
                             f"from_hf needs all {self.n_experts} experts to rebuild the grouped tensor")
            want = (self.dim, self.moe_dim) if proj == "down_proj" else (self.moe_dim, self.dim)
            for e, w in per_expert.items():
                name = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                self._check(name, int(layer), "moe.experts", w)
                if tuple(w.shape) != want:
                    raise self._contradicts(name, w.shape, f"expected {list(want)}")
            grouped = torch.stack([per_expert[e] for e in range(self.n_experts)])
            if self.expert_layout == "in_out":  # back to the layout to_hf saw (or was told)
                grouped = grouped.transpose(1, 2).contiguous()
            out[f"layers.{layer}.moe.experts.{native_of[proj]}"] = grouped
        return out
