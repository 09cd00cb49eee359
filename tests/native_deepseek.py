"""Tiny torchtitan-style DeepSeek-V3: MLA (optional q LoRA, compressed kv, interleaved rotary on a
rope part), dense first layers, MoE layers with grouped 3-D experts, a sigmoid router with
expert_bias and group-limited top-k, and shared experts. Names and layouts are torchtitan's; the
math is transformers' DeepseekV3ForCausalLM (eps everywhere from the config, no YaRN): a native
reference for the deepseek_v3 adapter tests. ``c`` is a dict of HF config names."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from native_llama import RMSNorm, rotary


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):  # multi-head latent attention
    def __init__(self, c: dict):
        super().__init__()
        dim, eps, self.h = c["hidden_size"], c["rms_norm_eps"], c["num_attention_heads"]
        self.nope, self.rope, self.vd = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        self.kvr = c["kv_lora_rank"]
        self.qr = c.get("q_lora_rank") or 0
        qk = self.nope + self.rope
        if self.qr:
            self.wq_a = nn.Linear(dim, self.qr, bias=False)
            self.q_norm = RMSNorm(self.qr, eps)
            self.wq_b = nn.Linear(self.qr, self.h * qk, bias=False)
        else:
            self.wq = nn.Linear(dim, self.h * qk, bias=False)
        self.wkv_a = nn.Linear(dim, self.kvr + self.rope, bias=False)  # kv latent, then the shared rope key
        self.kv_norm = RMSNorm(self.kvr, eps)
        self.wkv_b = nn.Linear(self.kvr, self.h * (self.nope + self.vd), bias=False)
        self.wo = nn.Linear(self.h * self.vd, dim, bias=False)
        self.scale = qk**-0.5

    def forward(self, x, freqs):
        b, s, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.qr else self.wq(x)
        q_nope, q_pe = q.view(b, s, self.h, -1).split([self.nope, self.rope], -1)
        q = torch.cat([q_nope, rotary(q_pe.contiguous(), freqs)], -1)
        kv, k_pe = self.wkv_a(x).split([self.kvr, self.rope], -1)
        k_pe = rotary(k_pe.contiguous().unsqueeze(2), freqs)  # one rope key shared by all heads
        k_nope, v = self.wkv_b(self.kv_norm(kv)).view(b, s, self.h, -1).split([self.nope, self.vd], -1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.h, -1)], -1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           scale=self.scale)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


class GroupedExperts(nn.Module):  # torchtitan's layout: [num_experts, out, in], applied as x @ w[e].T
    def __init__(self, dim: int, hidden: int, n: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n, hidden, dim) * dim**-0.5)
        self.w2 = nn.Parameter(torch.randn(n, dim, hidden) * hidden**-0.5)
        self.w3 = nn.Parameter(torch.randn(n, hidden, dim) * dim**-0.5)

    def forward(self, x, e: int):
        return (F.silu(x @ self.w1[e].T) * (x @ self.w3[e].T)) @ self.w2[e].T


class MoE(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        dim, n = c["hidden_size"], c["n_routed_experts"]
        self.experts = GroupedExperts(dim, c["moe_intermediate_size"], n)
        self.router = nn.Module()
        self.router.gate = nn.Linear(dim, n, bias=False)
        self.shared_experts = FeedForward(dim, c["moe_intermediate_size"] * c["n_shared_experts"])
        self.top_k, self.groups, self.topk_groups = c["num_experts_per_tok"], c["n_group"], c["topk_group"]
        self.norm_topk, self.scale = c["norm_topk_prob"], c["routed_scaling_factor"]
        self.register_buffer("expert_bias", torch.zeros(n))  # load balancing: steers the choice, not the weights
        # as torchtitan: routing counts for the expert_bias update, not part of the state dict
        self.register_buffer("tokens_per_expert", torch.zeros(n), persistent=False)

    def forward(self, x):
        shape, n = x.shape, self.expert_bias.numel()
        x = x.reshape(-1, shape[-1])
        scores = torch.sigmoid(self.router.gate(x).float())
        choice = scores + self.expert_bias
        # group-limited routing: keep the topk_group groups with the best top-2 sums
        group_scores = choice.view(-1, self.groups, n // self.groups).topk(2, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_groups, dim=-1)[1], 1)
        choice = choice.masked_fill(~keep.repeat_interleave(n // self.groups, 1).bool(), float("-inf"))
        chosen = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, chosen)
        if self.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.scale
        self.tokens_per_expert += torch.bincount(chosen.flatten(), minlength=n)
        out = torch.zeros_like(x)
        for e in range(n):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, self.experts(x[token], e) * weights[token, slot, None])
        return (out + self.shared_experts(x)).view(shape)


class Block(nn.Module):
    def __init__(self, c: dict, layer_id: int):
        super().__init__()
        self.attention = Attention(c)
        self.attention_norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.ffn_norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        if layer_id < c["first_k_dense_replace"]:
            self.feed_forward = FeedForward(c["hidden_size"], c["intermediate_size"])
        else:
            self.moe = MoE(c)

    def forward(self, x, freqs):
        x = x + self.attention(self.attention_norm(x), freqs)
        ffn = self.moe if hasattr(self, "moe") else self.feed_forward
        return x + ffn(self.ffn_norm(x))


class NativeDeepSeekV3(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.tok_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleDict({str(i): Block(c, i) for i in range(c["num_hidden_layers"])})  # as torchtitan
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.output = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        d = c["qk_rope_head_dim"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
        angles = torch.outer(torch.arange(c["max_position_embeddings"]).float(), inv)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            x = layer(x, self.freqs_cis[: tokens.shape[1]])
        return self.output(self.norm(x))
