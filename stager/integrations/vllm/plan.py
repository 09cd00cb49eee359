"""What an engine update reads, and the checks made before any weight of the engine changes (no vLLM here).

An update is checked against what the engine expects before its model is touched: the names
and shapes of the checkpoint it was started from (its safetensors headers, no tensor read) or
of the version it last loaded. A name the model does not have, a shape that differs, or a
name the version lacks (vLLM would keep that layer's old weights: a mix of two versions) is
refused with the engine still at its previous version. The tensors are then fed in decoder
layer order, one layer at a time, which is what vLLM's layerwise reload consumes with one
layer's weights buffered.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping

from stager.protocol import ErrorCode

from .errors import UpdateRefused

log = logging.getLogger("stager.integrations.vllm")

# Checkpoint tensors that models compute instead of loading: their absence from a version is no gap.
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER = re.compile(r"\.(\d+)\.")


def checkpoint_shapes(model_path: str | None) -> dict[str, tuple[int, ...]] | None:
    """``{name: shape}`` of the safetensors checkpoint an engine was started from (headers only),
    or None when ``model_path`` is no local directory of safetensors (a hub name, a dummy load)."""
    if not model_path or not os.path.isdir(model_path):
        return None
    from stager.formats.hf_checkpoint import open_checkpoint
    from stager.protocol import StagerError

    try:
        ckpt = open_checkpoint(model_path)
    except StagerError as exc:  # no safetensors there: nothing to check the first update against
        log.info("no checkpoint names to check updates against in %s: %s", model_path, exc.message)
        return None
    return {name: tuple(t.shape) for name, t in ckpt.tensors.items() if not IGNORED.search(name)}


def check_names(
    step: int,
    specs: Iterable[tuple[str, object, tuple[int, ...]]],
    expected: Mapping[str, tuple[int, ...]] | None,
    previous: int | None,
    only: set[str] | None = None,
) -> None:
    """Refuse (:class:`UpdateRefused`) a version whose HF names or shapes differ from ``expected``
    (None: nothing known yet, nothing checked). ``only``: the update covers just these names."""
    if expected is None:
        return
    got = {name: tuple(shape) for name, _, shape in specs}
    want = {n: s for n, s in expected.items() if only is None or n in only}
    unknown = sorted(set(got) - set(want))
    if unknown:
        raise UpdateRefused(
            ErrorCode.BAD_VALUE,
            step,
            previous,
            f"the model has no tensor {unknown[0]!r}"
            + _more(unknown)
            + "; check the adapter and prefix (init_info adapter=..., prefix=...) or the model",
        )
    for name in sorted(got):
        if got[name] != want[name]:
            raise UpdateRefused(
                ErrorCode.BAD_VALUE,
                step,
                previous,
                f"{name}: the version holds shape {list(got[name])}, the model expects "
                f"{list(want[name])}; the trainer's model and the engine's differ (hf_config?)",
            )
    missing = sorted(set(want) - set(got))
    if missing:
        raise UpdateRefused(
            ErrorCode.BAD_VALUE,
            step,
            previous,
            f"the version lacks {missing[0]!r}" + _more(missing) + ", which the model loads: "
            "updating the rest would leave old weights beside new ones; stage the whole model, or "
            "name the tensors to update with init_info names=[...]",
        )


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def layer_groups(names: Iterable[str]) -> list[list[str]]:
    """``names`` grouped per decoder layer (the first number in the name), layers in ascending order;
    of the names without a number, the embeddings come first and the rest (the final norm, lm_head)
    last. vLLM's layerwise reload then holds one layer's weights at a time.

    >>> layer_groups(["lm_head.weight", "model.layers.1.a", "model.embed_tokens.weight", "model.layers.0.a"])
    [['model.embed_tokens.weight'], ['model.layers.0.a'], ['model.layers.1.a'], ['lm_head.weight']]
    """
    pre: list[str] = []
    post: list[str] = []
    layers: dict[int, list[str]] = {}
    for name in names:
        m = _LAYER.search(name)
        if m is not None:
            layers.setdefault(int(m.group(1)), []).append(name)
        elif "embed" in name:
            pre.append(name)
        else:
            post.append(name)
    return [g for g in [pre, *(layers[i] for i in sorted(layers)), post] if g]
