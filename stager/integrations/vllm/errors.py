"""Typed errors of engine updates; each says which state the engine was left in.

The engine never serves a mix of two versions. An update fails in one of two ways:

- :class:`UpdateRefused`: found before any weight of the engine changed. The engine still
  serves its previous version (``previous``: its step, None for the checkpoint it started from).
- :class:`UpdateIncomplete`: weights of the new version had landed when the update failed (a
  remote daemon died mid-read, the model's loader refused a tensor). The engine refuses to serve
  (:class:`EngineIncomplete`; a server stays paused) until an update to a complete version.

:class:`WeightMismatch` (verification against a reference engine failed) also makes the driver
refuse to serve from that engine.

Over HTTP or from a worker process these arrive as text; :func:`classify` types them again from
the phrases the messages carry.
"""

from __future__ import annotations

import re

from stager.protocol import ErrorCode, StagerError

_REFUSED = re.compile(r"update to step (-?\d+|latest) refused; the engine still serves (step -?\d+|its checkpoint)")
_INCOMPLETE = re.compile(
    r"update to step (-?\d+|latest) incomplete; the engine served (step -?\d+|its checkpoint) "
    r"before, now holds weights of two versions and refuses to serve until an update to a "
    r"complete version succeeds"
)
_CODE = re.compile(r"\[([a-z_]+)\]")


def _previous(previous: int | None) -> str:
    return "its checkpoint" if previous is None else f"step {previous}"


class UpdateRefused(StagerError):
    """An update refused before any weight changed: the engine still serves ``previous``."""

    def __init__(self, code: ErrorCode | str, step: int | str | None, previous: int | None, problem: str):
        self.step = step
        self.previous = previous
        self.problem = problem
        super().__init__(
            code,
            f"update to step {step if step is not None else 'latest'} refused; the engine still "
            f"serves {_previous(previous)}: {problem}",
        )


class UpdateIncomplete(StagerError):
    """An update that failed after some of its weights landed: the engine refuses to serve until a
    complete update (``previous`` is the step it served before)."""

    def __init__(self, code: ErrorCode | str, step: int | str | None, previous: int | None, problem: str):
        self.step = step
        self.previous = previous
        self.problem = problem
        super().__init__(
            code,
            f"update to step {step} incomplete; the engine served {_previous(previous)} before, "
            "now holds weights of two versions and refuses to serve until an update to a complete "
            f"version succeeds: {problem}",
        )


class VerifyFailed(UpdateIncomplete):
    """Verification (``update_info`` ``verify=True``) found engine tensors that differ from the
    version stager delivered: ``tensors`` names them (checkpoint names); the engine refuses to serve."""

    def __init__(self, step: int, previous: int | None, tensors: list[str], problem: str | None = None):
        self.tensors = list(tensors)
        shown = ", ".join(self.tensors[:5]) + (f" (and {len(self.tensors) - 5} more)" if len(self.tensors) > 5 else "")
        super().__init__(
            ErrorCode.BAD_VALUE,
            step,
            previous,
            problem
            or (
                f"verification: the engine's {shown} differ from what stager delivered for step {step}; "
                "update again (a loader or kernel changed them, or memory was overwritten)"
            ),
        )


class EngineIncomplete(StagerError):
    """Generation asked of an engine whose weights are not one version (its last update was
    incomplete, or failed verification); ``cause`` is that update's error."""

    def __init__(self, engine: str, cause: StagerError):
        self.engine, self.cause = engine, cause
        super().__init__(
            ErrorCode.UNAVAILABLE,
            f"{engine} does not serve until an update to a complete version "
            f"succeeds (stager.integrations.vllm.update); its last update failed: "
            f"{cause}",
        )


class WeightMismatch(StagerError):
    """Verification found engine weights that differ from the reference: ``tensors`` names them."""

    def __init__(self, engine: str, step: int | None, tensors: list[str]):
        self.engine = engine
        self.step = step
        self.tensors = list(tensors)
        shown = ", ".join(self.tensors[:5]) + (f" (and {len(self.tensors) - 5} more)" if len(self.tensors) > 5 else "")
        super().__init__(
            ErrorCode.BAD_VALUE,
            f"{engine} at step {step}: weights differ from the reference in {shown}; "
            "the update did not load them as the version holds them",
        )


def classify(text: str, fallback_step: int | str | None = None) -> StagerError:
    """The typed error of a message that crossed a process or HTTP boundary as text."""
    code_match = _CODE.search(text)
    code = (
        code_match.group(1)
        if code_match and code_match.group(1) in ErrorCode._value2member_map_
        else ErrorCode.INTERNAL
    )
    for pattern, cls in ((_REFUSED, UpdateRefused), (_INCOMPLETE, UpdateIncomplete)):
        m = pattern.search(text)
        if m is not None:
            step = int(m.group(1)) if m.group(1) != "latest" else "latest"
            prev = None if m.group(2) == "its checkpoint" else int(m.group(2).split()[1])
            return cls(code, step, prev, text[m.end() :].lstrip(": ").strip()[:2000])
    return StagerError(code, text.strip()[:2000] or f"the engine failed the update to step {fallback_step}")
