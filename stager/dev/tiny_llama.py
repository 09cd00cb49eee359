"""The demo's trainer model: a tiny torchtitan-style Llama 3 (torchtitan names, Meta's interleaved
rotary), so the ``llama3`` adapter has real work to do (renames, q/k row permutation).

The demo stages the README's form, ``{"model": ..., "optim": ..., "train": ...}``, so the native
names are ``model.<torchtitan name>`` and ``optim.state.<...>``: the version's model_info says
``"prefix": "model."``, and the HF view and export hold the model part only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Odd vocabulary on purpose: FSDP2 over 2 ranks shards the embedding and the output 66 + 65 rows.
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 131,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Meta-style rotary: pairs (2i, 2i+1) of each head rotate together. x: [b, s, h, d]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        dim = c["hidden_size"]
        self.h, self.kvh = c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = dim // self.h
        self.wq = nn.Linear(dim, self.h * self.hd, bias=False)
        self.wk = nn.Linear(dim, self.kvh * self.hd, bias=False)
        self.wv = nn.Linear(dim, self.kvh * self.hd, bias=False)
        self.wo = nn.Linear(self.h * self.hd, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = _rotary(self.wq(x).view(b, s, self.h, self.hd), cos, sin)
        k = _rotary(self.wk(x).view(b, s, self.kvh, self.hd), cos, sin)
        v = self.wv(x).view(b, s, self.kvh, self.hd)
        k, v = (t.repeat_interleave(self.h // self.kvh, dim=2) for t in (k, v))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.w1 = nn.Linear(c["hidden_size"], c["intermediate_size"], bias=False)
        self.w2 = nn.Linear(c["intermediate_size"], c["hidden_size"], bias=False)
        self.w3 = nn.Linear(c["hidden_size"], c["intermediate_size"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.attention = Attention(c)
        self.feed_forward = FeedForward(c)
        self.attention_norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.ffn_norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class TinyLlama(nn.Module):
    """torchtitan's Llama 3 names: ``tok_embeddings``, ``layers.N.attention.wq`` ..., ``norm``, ``output``."""

    def __init__(self, c: dict = HF_CONFIG):
        super().__init__()
        self.config = dict(c)
        self.tok_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.output = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hd = self.config["hidden_size"] // self.config["num_attention_heads"]
        inv = 1.0 / (self.config["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        angles = torch.outer(torch.arange(tokens.shape[1]).float(), inv)
        cos, sin = angles.cos(), angles.sin()
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))


def sharded_llama(world_size: int, lr: float = 1e-2) -> tuple[TinyLlama, torch.optim.Optimizer]:
    """TinyLlama under FSDP2 (each block, then the root) over a 1-D CPU mesh, with AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world_size,))
    model = TinyLlama()
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=lr)
