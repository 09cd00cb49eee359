"""Tiny torchtitan-style Llama and Qwen3 (Meta-style interleaved rotary): the trainer model of the RL
example and the native reference of the adapter tests."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rotary(x, freqs):  # x: [b, s, h, d]; pairs (2i, 2i+1) rotate together, as in Meta's code
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3).type_as(x)


class Block(nn.Module):
    def __init__(self, c: dict, qkv_linear: bool, qwen: bool):
        super().__init__()
        dim, hd = c["hidden_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        self.h, self.kvh, self.hd = c["num_attention_heads"], c["num_key_value_heads"], hd
        attn = nn.Module()
        holder = attn
        if qkv_linear:
            attn.qkv_linear = holder = nn.Module()
        holder.wq = nn.Linear(dim, self.h * hd, bias=False)
        holder.wk = nn.Linear(dim, self.kvh * hd, bias=False)
        holder.wv = nn.Linear(dim, self.kvh * hd, bias=False)
        attn.wo = nn.Linear(self.h * hd, dim, bias=False)
        self.qwen = qwen
        if qwen:  # per-head RMSNorm of q and k before rotary (Qwen3)
            attn.q_norm = RMSNorm(hd, c["rms_norm_eps"])
            attn.k_norm = RMSNorm(hd, c["rms_norm_eps"])
        self.attention = attn
        self.__dict__["qkv"] = holder  # a shortcut, not a second registration in the state dict
        self.attention_norm = RMSNorm(dim, c["rms_norm_eps"])
        self.ffn_norm = RMSNorm(dim, c["rms_norm_eps"])
        ffn = nn.Module()
        ffn.w1 = nn.Linear(dim, c["intermediate_size"], bias=False)
        ffn.w2 = nn.Linear(c["intermediate_size"], dim, bias=False)
        ffn.w3 = nn.Linear(dim, c["intermediate_size"], bias=False)
        if qwen:
            self.mlp = ffn  # torchtitan's Qwen3 names it mlp
        else:
            self.feed_forward = ffn
        self.__dict__["ffn"] = ffn

    def forward(self, x, freqs):
        b, s, _ = x.shape
        h = self.attention_norm(x)
        q = self.qkv.wq(h).view(b, s, self.h, self.hd)
        k = self.qkv.wk(h).view(b, s, self.kvh, self.hd)
        if self.qwen:
            q, k = self.attention.q_norm(q), self.attention.k_norm(k)
        q, k = rotary(q, freqs), rotary(k, freqs)
        v = self.qkv.wv(h).view(b, s, self.kvh, self.hd)
        k, v = (t.repeat_interleave(self.h // self.kvh, dim=2) for t in (k, v))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.attention.wo(o.transpose(1, 2).reshape(b, s, -1))
        h = self.ffn_norm(x)
        return x + self.ffn.w2(F.silu(self.ffn.w1(h)) * self.ffn.w3(h))


class NativeLlama(nn.Module):
    def __init__(self, c: dict, *, qkv_linear: bool = False, qwen: bool = False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c, qkv_linear, qwen) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        if qkv_linear:
            self.lm_head = head
        else:
            self.output = head
        hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        angles = torch.outer(torch.arange(c["max_position_embeddings"]).float(), inv)
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, self.freqs[: tokens.shape[1]])
        head = self.lm_head if hasattr(self, "lm_head") else self.output
        return head(self.norm(x))
