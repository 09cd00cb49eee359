"""Planning: one state dict in, one typed :class:`Plan` out.

The :class:`Planner` owns everything that turns what the train loop handed to ``stage()`` into
what the daemon is told: flattening nested dicts, splitting float8 tensors into data + scale,
describing each tensor as a :class:`~stager.protocol.layout.PlanEntry` (through the
:class:`~.flatten.LayoutCache`), and the digest that names the plan. It touches no socket and
no segment, so it can be tested on plain tensors alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from stager.protocol.layout import PlanEntry, plan_digest
from stager.protocol.quant import QuantSpec

from .flatten import LayoutCache, flatten_state_dict, split_float8


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What one step stages: ``entries[i]`` describes ``locals[i]`` (the tensor whose bytes are
    copied); ``objects`` are the non-tensor leaves, ``quant`` the float8 scale pairs, ``digest``
    names ``entries`` (equal digests: the daemon may reuse the assignment it gave before)."""

    entries: list[PlanEntry]
    locals: list[torch.Tensor]
    objects: dict[str, Any]
    quant: dict[str, QuantSpec]
    digest: str


class Planner:
    """Builds a :class:`Plan` per step; caches placement math and the digest across steps.

    A steady training loop stages the same layout every step: the digest (a blake2b of the
    msgpack'd plan, ~ms for 10k tensors) is only recomputed when the entries change.
    """

    def __init__(self) -> None:
        self.layouts = LayoutCache()
        self._last_entries: list[PlanEntry] | None = None
        self._digest = ""

    def plan(self, state_dict: Mapping[str, Any]) -> Plan:
        tensors, objects = flatten_state_dict(state_dict)
        tensors, quant = split_float8(tensors)
        entries, locals_ = self.layouts.describe(tensors)
        # LayoutCache hands out the same entry objects while nothing changed, so this comparison
        # is mostly identity checks; a changed shape, dtype, name or placement changes an entry
        if entries != self._last_entries:
            self._last_entries = entries
            self._digest = plan_digest(entries)
        return Plan(entries, locals_, objects, quant, self._digest)
