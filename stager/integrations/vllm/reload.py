"""vLLM's layerwise reload, plus what an update that fails part way needs: putting the model back.

``initialize_layerwise_reload`` moves every layer's tensors to the meta device and keeps the
serving ("kernel") tensors aside; a layer's new weights are buffered until the layer has all
of them, then processed (the CPU backend repacks linears) and copied into the kernel tensors.
vLLM leaves the model on meta if an update raises before ``finalize_layerwise_reload``. Here,
:func:`restore` puts the kernel tensors of every layer not yet processed back (for those layers:
the previous version's weights, untouched), and :func:`processed_layers` says whether any layer
already took new weights. Written against vLLM 0.32's ``model_loader.reload`` (it names private
helpers of that module: checked by the real-engine tests).
"""

from __future__ import annotations

import torch
from vllm.model_executor.model_loader import reload as _reload
from vllm.model_executor.model_loader.reload import layerwise as _layerwise


def start(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Begin a layerwise reload; returns the layers it prepared (to tell later which were processed)."""
    _reload.initialize_layerwise_reload(model)
    return [m for m in model.modules() if _layerwise.get_layerwise_info(m).can_load()]


def processed_layers(layers: list[torch.nn.Module]) -> int:
    """How many of ``layers`` (from :func:`start`) already took their new weights."""
    return sum(not _layerwise.get_layerwise_info(m).can_load() for m in layers)


def unloaded_layers(layers: list[torch.nn.Module]) -> list[str]:
    """Class names of the layers with parameters that received no weight in this reload: finishing
    would keep their previous weights beside the new ones (buffer-only layers, the rotary caches,
    are never loaded and do not count)."""
    out = []
    for m in layers:
        info = _layerwise.get_layerwise_info(m)
        if (
            info.can_load()
            and info.load_numel <= 0
            and (info.load_numel_total or 0) > 0
            and info.kernel_tensors is not None
            and info.kernel_tensors[0]
        ):
            out.append(type(m).__name__)
    return out


def restore(model: torch.nn.Module) -> None:
    """End a reload without finishing it: every layer not yet processed gets its serving tensors
    back, with the weights it had; buffered new weights are dropped."""
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
    for layer in model.modules():
        info = _layerwise.get_layerwise_info(layer)
        if not info.can_load():
            continue
        if info.kernel_tensors is not None:
            _layerwise._place_kernel_tensors(layer, info)
        info.reset()
    _layerwise.LOADING_LAYERS.clear()


def keep_unloaded(model: torch.nn.Module) -> int:
    """Before finishing a reload that was fed only the layers that changed (a delta update): every
    other layer with weights gets its serving tensors back as they were (finishing would warn of each
    as failed to load); attention layers are left to the finish, which processes them as always.
    Returns how many layers were put back."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer

    kept = 0
    for layer in model.modules():
        info = _layerwise.get_layerwise_info(layer)
        if (
            info.can_load()
            and info.load_numel <= 0
            and info.kernel_tensors is not None
            and not is_deferred_attention_layer(layer)
        ):
            _layerwise._place_kernel_tensors(layer, info)
            info.reset()
            kept += 1
    return kept


def finish(model: torch.nn.Module, model_config) -> None:
    _reload.finalize_layerwise_reload(model, model_config)
