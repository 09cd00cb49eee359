"""LoRA adapters of a version in PEFT's format: ``adapter_model.safetensors`` + ``adapter_config.json``,
which ``peft.PeftModel.from_pretrained(base_model, dir)`` loads onto the base model.

A version holds LoRA weights the way torchtune names them: beside a linear layer's ``<module>.weight``,
``<module>.lora_a.weight`` ``[r, in]`` and ``<module>.lora_b.weight`` ``[out, r]``. Each pair goes
to PEFT's names through the version's adapter: the base weight's HF name gives the module
(``base_model.model.<hf module>.lora_A.weight`` / ``lora_B.weight``), and ``lora_b`` goes through
the same conversion as the base weight, so its rows follow the base weight's rows (the rotary
permutation of q/k projections included: ``P(W + s B A) = P W + s (P B) A``). A conversion that
does more than rename or permute rows (a fused or split weight) is refused, naming the tensor.

>>> lora_modules(["l.0.wq.weight", "l.0.wq.lora_a.weight", "l.0.wq.lora_b.weight"])
{'l.0.wq': ('l.0.wq.lora_a.weight', 'l.0.wq.lora_b.weight')}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from stager.client.adapters import hf_items
from stager.client.adapters.base import LORA_NAME as LORA
from stager.formats.integrity import spec_entry
from stager.formats.safetensors_io import write_safetensors
from stager.protocol import ErrorCode, StagerError

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def lora_modules(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``{module: (lora_a name, lora_b name)}`` of the LoRA pairs among ``names``; a half pair is an error."""
    halves: dict[str, dict[str, str]] = {}
    for name in names:
        m = LORA.match(name)
        if m:
            halves.setdefault(m["module"], {})[m["which"]] = name
    for pair in halves.values():
        if len(pair) != 2:
            raise StagerError(
                ErrorCode.BAD_VALUE,
                f"{next(iter(pair.values()))}: a LoRA weight without its "
                f"lora_{'b' if 'a' in pair else 'a'} partner; stage both",
            )
    return {module: (pair["a"], pair["b"]) for module, pair in sorted(halves.items())}


def _bad(name: str, why: str) -> StagerError:
    return StagerError(ErrorCode.BAD_VALUE, f"{name}: {why}")


def peft_tensors(snapshot: Any, adapter: Any, pairs: dict[str, tuple[str, str]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(PEFT name, tensor)`` of every pair, lora_A then lora_B per module."""
    for module, (a_name, b_name) in pairs.items():
        a, b = snapshot[a_name], snapshot[b_name]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise _bad(module, f"lora_a {list(a.shape)} and lora_b {list(b.shape)} are not [r, in] and [out, r]")
        try:
            items = hf_items(adapter, f"{module}.weight", b)
        except StagerError as exc:
            raise _bad(b_name, f"its base weight {module}.weight has no HF name ({exc.message})") from None
        if len(items) != 1 or tuple(items[0][1].shape) != tuple(b.shape) or not items[0][0].endswith(".weight"):
            raise _bad(
                b_name,
                "the adapter splits, fuses or reshapes its base weight; PEFT export takes LoRA on "
                "weights that are renamed or have their rows permuted",
            )
        hf_module = items[0][0][: -len(".weight")]
        yield f"base_model.model.{hf_module}.lora_A.weight", a.contiguous()
        yield f"base_model.model.{hf_module}.lora_B.weight", items[0][1].contiguous()


def peft_config(pairs: dict, ranks: set[int], alpha: float, modules: list[str], base: str | None) -> dict:
    """PEFT's ``adapter_config.json`` for LoRA on ``modules`` (the HF modules' last names)."""
    (r,) = ranks
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(set(modules)),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base,
        "modules_to_save": None,
    }


def write_peft(
    snapshot: Any,
    names: list[str],
    adapter: Any,
    tmp: str,
    *,
    alpha: float | None,
    base: str | None,
    manifest: dict | None = None,
) -> list[str]:
    """Write the version's LoRA pairs in PEFT format into ``tmp``; returns the PEFT tensor names.
    ``alpha``: LoRA's scaling numerator (default: the version's ``model_info["lora"]["alpha"]``);
    ``base``: what ``base_model_name_or_path`` names (the export itself, or the base checkpoint);
    ``manifest``: gets the checksum entries of the tensors written (``stager verify``)."""
    pairs = lora_modules(names)
    if not pairs:
        raise StagerError(
            ErrorCode.BAD_VALUE,
            f"step {snapshot.step} holds no LoRA weights (<module>.lora_a.weight "
            "and <module>.lora_b.weight); export it without --peft",
        )
    if alpha is None:
        lora = (getattr(snapshot, "model_info", None) or {}).get("lora")
        alpha = lora.get("alpha") if isinstance(lora, dict) else None
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise StagerError(
                ErrorCode.BAD_VALUE,
                "LoRA alpha unknown: pass --lora-alpha, or stage with model_info={'lora': {'alpha': 16}}",
            )
    tensors = dict(peft_tensors(snapshot, adapter, pairs))
    ranks = {t.shape[0] for n, t in tensors.items() if n.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise StagerError(
            ErrorCode.BAD_VALUE, f"LoRA ranks differ between modules ({sorted(ranks)}); PEFT's config holds one r"
        )
    specs = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    crcs: dict[str, str] = {}
    write_safetensors(
        os.path.join(tmp, ADAPTER_WEIGHTS), specs, lambda: iter(tensors.items()), {"format": "pt"}, checksums=crcs
    )
    if manifest is not None:
        manifest.update({n: spec_entry(dt, shape, crcs[n]) for n, shape, dt in specs})
    modules = [n.split(".")[-3] for n in tensors]
    with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
        json.dump(peft_config(pairs, ranks, alpha, modules, base), f, indent=2, sort_keys=True)
    return list(tensors)
