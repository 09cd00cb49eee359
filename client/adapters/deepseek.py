"""torchtitan DeepSeek-V3 <-> HF ``DeepseekV3ForCausalLM`` (the hub checkpoint layout), tensor by tensor.

torchtitan keeps each MoE layer's routed experts as three grouped 3-D tensors
(torchtitan 0.3.0: ``moe.routed_experts.inner_experts.w1_EFD / w2_EDF / w3_EFD``, ``[E, out, in]``;
earlier: ``moe.experts.w1/w2/w3``); HF checkpoints hold one
``mlp.experts.{e}.{gate,down,up}_proj.weight`` per expert (transformers fuses them again on load).
``to_hf_items`` splits a grouped tensor into its experts (views, no copy); ``from_hf`` stacks
them back, so ``from_hf(to_hf(sd))`` is exact.

>>> cfg = {"hidden_size": 8, "num_attention_heads": 2, "n_routed_experts": 2, "moe_intermediate_size": 4,
...        "q_lora_rank": 0, "kv_lora_rank": 4, "qk_nope_head_dim": 2, "qk_rope_head_dim": 2,
...        "v_head_dim": 2, "first_k_dense_replace": 1}
>>> w1 = torch.zeros(2, 4, 8)
>>> [k for k, _ in DeepSeekV3Adapter(cfg).to_hf_items("layers.1.moe.routed_experts.inner_experts.w1_EFD", w1)]
['model.layers.1.mlp.experts.0.gate_proj.weight', 'model.layers.1.mlp.experts.1.gate_proj.weight']
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .base import adapter_error, permute_for_hf_rotary, unpermute_from_hf_rotary
from .config import DEEPSEEK_V3, check_config

CURRENT, LEGACY = "current", "legacy"  # expert naming: torchtitan 0.3.0's, or the earlier moe.experts.w*


class DeepSeekV3Adapter:
    """torchtitan DeepSeek-V3 <-> HF ``DeepseekV3ForCausalLM``.

    ``hf_config`` needs hidden_size, num_attention_heads, n_routed_experts, moe_intermediate_size,
    kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim and first_k_dense_replace;
    q_lora_rank (0/None: a plain ``wq``), rope_interleave (default True), tie_word_embeddings and
    num_hidden_layers (needed only for MTP layers) are read when present. All are checked (types,
    ranges, an even qk_rope_head_dim) when the adapter is made: :data:`~.config.DEEPSEEK_V3`.

    Native names: torchtitan 0.3.0's (``lm_head``, ``moe.expert_bias_E``,
    ``moe.routed_experts.inner_experts.w1_EFD/w2_EDF/w3_EFD``, ``mtp_layers.N.*``) and the earlier
    ones (``output``, ``moe.expert_bias``, ``moe.experts.w1/w2/w3``). ``from_hf`` writes the names
    ``to_hf`` saw, per HF name; torchtitan 0.3.0's for names it has not seen.

    MTP: torchtitan's ``mtp_layers.N`` are the hub checkpoint's ``model.layers.{num_hidden_layers + N}``
    (``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``), as torchtitan's own adapter maps them.

    Rotary: torchtitan rotates interleaved pairs (complex multiply) and so does transformers when
    ``rope_interleave`` is true (its default), so weights pass unchanged; with ``rope_interleave:
    false`` the rope rows of wq/wq_b (per head) and wkv_a are permuted to rotate_half order.

    Grouped experts are ``[E, out, in]`` (nn.Linear order, computed as ``x @ w[e].T``): torchtitan
    0.3.0 says so in the names (``w1_EFD``: experts, ffn dim, model dim). The earlier
    ``moe.experts.w*`` were ``[E, out, in]`` too, and ``[E, in, out]`` (``x @ w[e]``) in early
    versions: for those names ``expert_layout`` is ``"out_in"``, ``"in_out"`` or None (tell from the
    shapes; square experts: ``out_in``), and the layout seen is the one ``from_hf`` writes back.

    Dropped by ``to_hf``: ``moe.tokens_per_expert_E`` / ``moe.tokens_per_expert`` (load-balancing
    counts, not a weight; non-persistent in current torchtitan, persisted by older versions).
    """

    NAME = "deepseek_v3"
    CONFIG = DEEPSEEK_V3  # the hf_config fields read, and what they accept
    # native suffix -> HF suffix; where several natives share an HF name, the first is torchtitan 0.3.0's
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
        "moe.expert_bias_E": "mlp.gate.e_score_correction_bias",
        "moe.expert_bias": "mlp.gate.e_score_correction_bias",
        "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
        "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
        "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
        # MTP layers only
        "enorm.weight": "enorm.weight",
        "hnorm.weight": "hnorm.weight",
        "eh_proj.weight": "eh_proj.weight",
        "mtp_norm.weight": "shared_head.norm.weight",
    }
    MTP_ONLY = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "mtp_norm.weight")
    TOP_KEYS = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
        "output.weight": "lm_head.weight",
    }
    # native grouped-expert suffix -> (projection, naming)
    EXPERTS = {
        "moe.routed_experts.inner_experts.w1_EFD": ("w1", CURRENT),
        "moe.routed_experts.inner_experts.w2_EDF": ("w2", CURRENT),
        "moe.routed_experts.inner_experts.w3_EFD": ("w3", CURRENT),
        "moe.experts.w1": ("w1", LEGACY),
        "moe.experts.w2": ("w2", LEGACY),
        "moe.experts.w3": ("w3", LEGACY),
    }
    HF_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    DROPPED = ("moe.tokens_per_expert_E", "moe.tokens_per_expert")
    _LAYER = re.compile(r"^(layers|mtp_layers)\.(\d+)\.(.+)$")
    _HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    _HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|down_proj|up_proj)\.weight$")

    def __init__(self, hf_config: dict, *, expert_layout: str | None = None):
        if expert_layout not in (None, "out_in", "in_out"):
            raise ValueError("expert_layout must be None (from the shapes), 'out_in' or 'in_out'")
        c = check_config(f"the {self.NAME} adapter", self.CONFIG, hf_config)  # before any tensor is read
        self.dim = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.n_experts = c["n_routed_experts"]
        self.moe_dim, self.kv_rank = c["moe_intermediate_size"], c["kv_lora_rank"]
        self.first_moe = c["first_k_dense_replace"]  # layers before it are dense (feed_forward), the rest MoE
        self.nope = c["qk_nope_head_dim"]
        self.rope = c["qk_rope_head_dim"]
        self.v_dim = c["v_head_dim"]
        self.q_rank = c["q_lora_rank"]
        self.n_layers = c["num_hidden_layers"]
        self.permute_rope = not c["rope_interleave"]
        self.tied = c["tie_word_embeddings"]
        self.expert_layout = expert_layout
        q_rows, h = self.heads * (self.nope + self.rope), self.dim
        # expected shapes: a contradiction fails here, naming the key, not later inside transformers
        self.shapes = {
            "attention.wkv_a.weight": (self.kv_rank + self.rope, h),
            "attention.kv_norm.weight": (self.kv_rank,),
            "attention.wkv_b.weight": (self.heads * (self.nope + self.v_dim), self.kv_rank),
            "attention.wo.weight": (h, self.heads * self.v_dim),
            "attention_norm.weight": (h,),
            "ffn_norm.weight": (h,),
            "moe.router.gate.weight": (self.n_experts, h),
            "moe.expert_bias_E": (self.n_experts,),
            "moe.expert_bias": (self.n_experts,),
            "enorm.weight": (h,),
            "hnorm.weight": (h,),
            "mtp_norm.weight": (h,),
            "eh_proj.weight": (h, 2 * h),
        }
        if self.q_rank:
            self.shapes.update(
                {
                    "attention.wq_a.weight": (self.q_rank, h),
                    "attention.q_norm.weight": (self.q_rank,),
                    "attention.wq_b.weight": (q_rows, self.q_rank),
                }
            )
        else:
            self.shapes["attention.wq.weight"] = (q_rows, h)
        self._from_hf_layer: dict[str, str] = {}
        for native, hf in self.LAYER_KEYS.items():
            self._from_hf_layer.setdefault(hf, native)
        self._from_hf_top: dict[str, str] = {}
        for native, hf in self.TOP_KEYS.items():
            self._from_hf_top.setdefault(hf, native)
        # what to_hf saw, so that from_hf writes the same names back: HF name -> native name
        self._seen_layer: dict[str, str] = {}
        self._seen_top: dict[str, str] = {}
        self._seen_experts: str | None = None  # CURRENT or LEGACY

    def _lookup(self, table: dict, key: str, name: str) -> str:
        try:
            return table[key]
        except KeyError:
            raise adapter_error(f"{name}: the {self.NAME} adapter does not know this key") from None

    def _contradicts(self, name: str, shape, why: str) -> Exception:
        return adapter_error(f"{name}: shape {list(shape)} contradicts the config ({why})")

    def _hf_layer(self, name: str, kind: str, index: int) -> int:
        if kind == "layers":
            if self.n_layers is not None and index >= self.n_layers:
                raise adapter_error(
                    f"{name}: layer {index} contradicts the config (num_hidden_layers={self.n_layers}; "
                    "MTP layers are mtp_layers.N)"
                )
            return index
        if self.n_layers is None:
            raise adapter_error(
                f"{name}: an MTP layer is exported as model.layers.{{num_hidden_layers + N}}: "
                "pass hf_config with num_hidden_layers"
            )
        return self.n_layers + index

    def _native_layer(self, layer: int) -> str:
        if self.n_layers is not None and layer >= self.n_layers:
            return f"mtp_layers.{layer - self.n_layers}"
        return f"layers.{layer}"

    def _check(self, name: str, layer: int, suffix: str, tensor: torch.Tensor) -> None:
        moe = suffix.startswith("moe.")
        if moe != (layer >= self.first_moe) and (moe or suffix.startswith("feed_forward.")):
            raise adapter_error(
                f"{name}: layer {layer} is {'dense' if moe else 'MoE'} by the config "
                f"(first_k_dense_replace={self.first_moe}): this key contradicts the config"
            )
        if suffix in self.MTP_ONLY and (self.n_layers is None or layer < self.n_layers):
            raise adapter_error(
                f"{name}: {suffix} belongs to an MTP layer (model.layers.{{num_hidden_layers + N}}, "
                f"num_hidden_layers={self.n_layers}): this key contradicts the config"
            )
        if suffix.startswith("attention.wq") or suffix == "attention.q_norm.weight":
            if suffix not in self.shapes:  # wq with a q LoRA, or wq_a/wq_b without: HF has no such weight
                raise self._contradicts(name, tensor.shape, f"q_lora_rank={self.q_rank}")
        want = self.shapes.get(suffix)
        if want is not None and tuple(tensor.shape) != want:
            raise self._contradicts(name, tensor.shape, f"expected {list(want)}")

    def _rope_rows(self, suffix: str, w: torch.Tensor, inverse: bool) -> torch.Tensor:
        """Interleaved-pair rope rows <-> rotate_half order, for HF configs with rope_interleave false."""
        if not self.permute_rope or suffix not in (
            "attention.wq.weight",
            "attention.wq_b.weight",
            "attention.wkv_a.weight",
        ):
            return w
        heads, lead = (1, self.kv_rank) if suffix == "attention.wkv_a.weight" else (self.heads, self.nope)
        per_head = w.reshape(heads, lead + self.rope, -1)  # rows per head: nope (or kv latent) rows, then rope rows
        permute = unpermute_from_hf_rotary if inverse else permute_for_hf_rotary
        rope = permute(per_head[:, lead:].reshape(heads * self.rope, -1), heads).view(heads, self.rope, -1)
        return torch.cat([per_head[:, :lead], rope], 1).reshape(w.shape)

    def _out_in_shape(self, proj: str) -> tuple[int, int, int]:
        return (self.n_experts, self.dim, self.moe_dim) if proj == "w2" else (self.n_experts, self.moe_dim, self.dim)

    def _expert_layout_of(self, name: str, w: torch.Tensor, proj: str, naming: str) -> str:
        out_in = self._out_in_shape(proj)
        if naming == CURRENT:  # the name says [E, out, in]
            if tuple(w.shape) != out_in:
                raise self._contradicts(
                    name,
                    w.shape,
                    f"expected {list(out_in)} from n_routed_experts, moe_intermediate_size and hidden_size",
                )
            return "out_in"
        fits = [
            lay
            for lay, shape in (("out_in", out_in), ("in_out", (out_in[0], out_in[2], out_in[1])))
            if tuple(w.shape) == shape
        ]
        if not fits:
            raise self._contradicts(
                name,
                w.shape,
                f"expected {list(out_in)} from n_routed_experts, "
                "moe_intermediate_size and hidden_size (or its transpose)",
            )
        if self.expert_layout in fits:
            return self.expert_layout
        if self.expert_layout is None:  # square experts fit both: torchtitan's layout
            if len(fits) == 1:
                self.expert_layout = fits[0]  # what from_hf writes back
            return fits[0]
        raise self._contradicts(name, w.shape, f"{fits[0]} expert layout, but this adapter uses {self.expert_layout}")

    def to_hf_items(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        match = self._LAYER.match(name)
        if not match:
            hf = self._lookup(self.TOP_KEYS, name, name)
            self._seen_top[hf] = name
            if hf == "lm_head.weight" and self.tied:
                return []  # tied: transformers takes lm_head from the embedding
            return [(hf, tensor)]
        kind, index, suffix = match.groups()
        if suffix in self.DROPPED:
            return []
        if suffix not in self.EXPERTS:
            hf = self._lookup(self.LAYER_KEYS, suffix, name)  # an unknown key is named before any config check
        layer = self._hf_layer(name, kind, int(index))
        self._check(name, layer, suffix, tensor)
        if suffix in self.EXPERTS:
            proj, naming = self.EXPERTS[suffix]
            if self._expert_layout_of(name, tensor, proj, naming) == "in_out":
                tensor = tensor.transpose(1, 2)  # HF experts are nn.Linear weights: [out, in]
            self._seen_experts = naming
            return [
                (f"model.layers.{layer}.mlp.experts.{e}.{self.HF_PROJ[proj]}.weight", w)
                for e, w in enumerate(tensor.unbind(0))
            ]
        self._seen_layer[hf] = suffix
        return [(f"model.layers.{layer}.{hf}", self._rope_rows(suffix, tensor, inverse=False))]

    def to_hf(self, state_dict: dict) -> dict:
        return dict(item for name, t in state_dict.items() for item in self.to_hf_items(name, t))

    def _expert_name(self, proj: str) -> str:
        naming = self._seen_experts or (LEGACY if self.expert_layout == "in_out" else CURRENT)
        return next(suffix for suffix, (p, n) in self.EXPERTS.items() if p == proj and n == naming)

    def from_hf(self, hf_state_dict: dict) -> dict:
        out: dict[str, Any] = {}
        experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        for name, tensor in hf_state_dict.items():
            match = self._HF_EXPERT.match(name)
            if match:
                layer, e, proj = match.groups()
                if int(e) >= self.n_experts:
                    raise adapter_error(
                        f"{name}: expert {e} contradicts the config (n_routed_experts={self.n_experts})"
                    )
                experts.setdefault((layer, proj), {})[int(e)] = tensor
                continue
            match = self._HF_LAYER.match(name)
            if not match:
                native = self._seen_top.get(name) or self._lookup(self._from_hf_top, name, name)
                out[native] = tensor
                continue
            layer, suffix = match.groups()
            if suffix.endswith("rotary_emb.inv_freq"):
                continue
            native = self._seen_layer.get(suffix) or self._lookup(self._from_hf_layer, suffix, name)
            self._check(name, int(layer), native, tensor)
            out[f"{self._native_layer(int(layer))}.{native}"] = self._rope_rows(native, tensor, inverse=True)
        if self.tied and "lm_head.weight" not in hf_state_dict and "tok_embeddings.weight" in out:
            output = self._seen_top.get("lm_head.weight") or self._from_hf_top["lm_head.weight"]
            out[output] = out["tok_embeddings.weight"]
        native_of = {hf: w for w, hf in self.HF_PROJ.items()}
        for (layer, proj), per_expert in experts.items():
            absent = [e for e in range(self.n_experts) if e not in per_expert]
            if absent:
                raise adapter_error(
                    f"model.layers.{layer}.mlp.experts.{absent[0]}.{proj}.weight is missing: "
                    f"from_hf needs all {self.n_experts} experts to rebuild the grouped tensor"
                )
            want = (self.dim, self.moe_dim) if proj == "down_proj" else (self.moe_dim, self.dim)
            for e, w in per_expert.items():
                name = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                self._check(name, int(layer), "moe.experts", w)
                if tuple(w.shape) != want:
                    raise self._contradicts(name, w.shape, f"expected {list(want)}")
            grouped = torch.stack([per_expert[e] for e in range(self.n_experts)])
            suffix = self._expert_name(native_of[proj])
            if self.EXPERTS[suffix][1] == LEGACY and self.expert_layout == "in_out":  # back to the layout to_hf saw
                grouped = grouped.transpose(1, 2).contiguous()
            out[f"{self._native_layer(int(layer))}.{suffix}"] = grouped
        return out
