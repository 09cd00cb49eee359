"""Rank functions that train torchtitan 0.3.0's own models under FSDP2 with the README's staging and
restore calls (spawned; must be importable). torchtitan is imported inside them: importing this module
needs only torch, so test collection works without torchtitan."""

import hashlib

import torch
import torch.distributed as dist

STEPS = 4  # training steps of the uninterrupted job
STAGED_UNTIL = 2  # it stages steps 1..STAGED_UNTIL (the newest version: STAGED_UNTIL), then trains on
SEQ = 128  # a full 128-token block (torchtitan's flex attention is unstable on partial ones; see the shared facts)
LAYERS = {"llama3": 2, "deepseek_v3": 2}  # deepseek_v3's debugmodel: layer 0 dense, layer 1 MoE


def titan_config(name: str):
    """torchtitan's debugmodel flavor of ``name`` from its own model registry, on fewer layers, with
    its ScaledDotProductAttention (the flavors' flex attention needs torch.compile: slow on CPU)."""
    from torchtitan.models import deepseek_v3, llama3
    from torchtitan.models.common.attention import ScaledDotProductAttention

    cfg = {"llama3": llama3, "deepseek_v3": deepseek_v3}[name].model_registry("debugmodel").model
    cfg.layers = cfg.layers[: LAYERS[name]]
    for layer in cfg.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return cfg


def hf_config(name: str, cfg) -> dict:
    """What the built-in adapter needs of the HF config, read off torchtitan's config (no transformers
    in the ranks)."""
    attn = cfg.layers[0].attention
    if name == "llama3":
        qkv = attn.qkv_linear
        return {
            "hidden_size": cfg.dim,
            "num_attention_heads": qkv.n_heads,
            "num_key_value_heads": qkv.n_kv_heads,
            "num_hidden_layers": len(cfg.layers),
            "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.enable_weight_tying,
        }
    moe = next(layer.moe for layer in cfg.layers if layer.moe is not None)
    return {
        "hidden_size": cfg.dim,
        "num_attention_heads": attn.n_heads,
        "n_routed_experts": moe.num_experts,
        "moe_intermediate_size": moe.routed_experts.inner_experts.hidden_dim,
        "kv_lora_rank": attn.kv_lora_rank,
        "qk_nope_head_dim": attn.qk_nope_head_dim,
        "qk_rope_head_dim": attn.qk_rope_head_dim,
        "v_head_dim": attn.v_head_dim,
        "num_hidden_layers": len(cfg.layers),
        "first_k_dense_replace": sum(layer.moe is None for layer in cfg.layers),
        "tie_word_embeddings": cfg.enable_weight_tying,
    }


def _fsdp2(cfg, seed: int, world: int):
    """The model as torchtitan shards it (each block, then the root), with AdamW over its parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = cfg.build()
    model.init_states()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _full(v):
    from torch.distributed.tensor import DTensor

    return v.full_tensor() if isinstance(v, DTensor) else v  # full_tensor: a collective, every rank calls it


def _digest(state: dict) -> dict:
    """Per entry of the nested state dict: a hash of the full tensor's dtype, shape and bytes (or the
    value's repr). Small enough to return from a rank; equal only if every bit is."""
    out = {}
    for group, part in state.items():
        for k, v in part.items():
            if isinstance(v, torch.Tensor):
                t = _full(v).detach().contiguous()
                raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
                out[f"{group}.{k}"] = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode() + raw).hexdigest()
            else:  # non-tensor values travel as msgpack: a tuple (AdamW's betas) comes back a list
                out[f"{group}.{k}"] = repr(list(v) if isinstance(v, tuple) else v)
    return out


def _loss(model, cfg, step: int, rank: int, world: int) -> torch.Tensor:
    """Step ``step``'s global batch (one sequence per rank), this rank's row; next-token loss."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, cfg.vocab_size, (world, SEQ + 1), generator=g)[rank : rank + 1]
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def _hf_view_mismatches(name: str, cfg, model, step: int) -> list[str]:
    """The newest version read by HF names (the staged model_info's adapter) against torchtitan's own
    StateDictAdapter.to_hf of the model's full state dict; rank 0 reads, every rank gathers."""
    from torchtitan.models import deepseek_v3, llama3

    from stager.client import Subscriber

    full = {k: _full(v) for k, v in model.state_dict().items()}
    if dist.get_rank() != 0:
        return []
    titan_adapter = {"llama3": llama3.Llama3StateDictAdapter, "deepseek_v3": deepseek_v3.DeepSeekV3StateDictAdapter}[
        name
    ](cfg, None)
    want = titan_adapter.to_hf(dict(full))
    with Subscriber(view="hf") as sub, sub.latest() as snap:
        assert snap.step == step
        got = dict(snap.items())
        bad = sorted(set(got) ^ set(want))
        return bad + [k for k in want if k in got and not torch.equal(got[k], want[k])]


def train(rank: int, world: int, name: str, phase: str) -> dict:
    """torchtitan's ``name`` under FSDP2, trained to step STEPS. ``phase`` "fresh": seed 0, staging steps
    1..STAGED_UNTIL as the README's loop does; "resume": another seed, then the README's restore of the
    newest version (only the restore makes it equal), and training from the step after it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torchtitan.components.optimizer.utils import init_optim_state

    from stager.client import StagingClient

    torch.set_num_threads(1)  # one core per rank
    cfg = titan_config(name)
    model, optimizer = _fsdp2(cfg, 0 if phase == "fresh" else 1, world)
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    info = {"adapter": name, "hf_config": hf_config(name, cfg), "prefix": "model."}
    out: dict = {"losses": {}}
    client = StagingClient(strict=True)
    start = 1
    if phase == "resume":
        init_optim_state(optimizer)  # torchtitan's: the optimizer state exists before it is filled (as for DCP)
        # -- the README's restore --
        sd = {
            "model": model.state_dict(),
            "optim": get_optimizer_state_dict(model, optimizer, options=flat),
            "train": {"step": 0},
        }
        step = client.restore(sd)
        model.load_state_dict(sd["model"])
        set_optimizer_state_dict(model, optimizer, sd["optim"], options=flat)
        start = sd["train"]["step"] + 1
        # --
        out["restored_step"] = step
        out["restored"] = _digest(
            {
                "model": model.state_dict(),  # read back from the live model and optimizer
                "optim": get_optimizer_state_dict(model, optimizer, options=flat),
            }
        )
    handle = None
    for step in range(start, STEPS + 1):
        loss = _loss(model, cfg, step, rank, world)
        loss.backward()
        # -- the README's training loop --
        if handle:
            handle.wait_copied()
        optimizer.step()
        optimizer.zero_grad()
        if phase == "fresh" and step <= STAGED_UNTIL:
            handle = client.stage(
                {
                    "model": model.state_dict(),
                    "optim": get_optimizer_state_dict(model, optimizer, options=flat),
                    "train": {"step": step},
                },
                step=step,
                model_info=info,
            )
        # --
        total = loss.detach().clone()
        dist.all_reduce(total)
        out["losses"][step] = (total / world).item()
        if phase == "fresh" and step == STAGED_UNTIL:
            handle.wait(120)  # sealed: what a restore of the newest version must give back
            out["staged"] = _digest(
                {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer, options=flat)}
            )
            out["hf_mismatches"] = _hf_view_mismatches(name, cfg, model, step)
            out["names"] = sorted(model.state_dict())
    out["final"] = _digest(
        {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer, options=flat)}
    )
    client.close()
    return out
