"""Full assembly (``serve --assemble-full``): the assembler hands its daemon whole versions.

The assembler is a consumer of the node's multi-node job: it leases a complete version through the
reading path like any reader, then asks its own daemon for a segment to copy it into, whole
(:class:`AssembleBegin`). The daemon creates (or reuses) that segment under its memory budget and
answers with its name and where each tensor goes (:class:`AssembleReply`), or why not (``reason``:
nothing to do, the tensors disagree with the node's, no free memory). The assembler maps the
segment by name, writes every byte, and says so (:class:`AssembleDone`): the daemon then swaps
its partial version of the step for the whole one, or takes the segment back (``ok`` false).

These messages are served only on the daemon's private assembler socket (an owner-only ipc path
the daemon hands its assembler); on the daemon's endpoint, ipc or tcp, they are refused
(``FORBIDDEN``).
"""

from __future__ import annotations

from typing import ClassVar

from .errors import ErrorCode, ProtocolError, short_repr
from .frames import Codec, Message, message, nonneg
from .layout import PlanEntry

MAX_SPECS = 1 << 20  # tensors of one version
MAX_REASON = 2000  # characters of a skip's message
SKIP_REASONS = ("", "not_partial", "mismatch", "no_memory")  # "": not skipped, the segment is given

Spec = tuple[str, str, tuple[int, ...]]  # (fqn, dtype name, global shape)


def specs_to_wire(specs) -> list:
    return [[fqn, dtype, list(shape)] for fqn, dtype, shape in specs]


def specs_from_wire(raw: list) -> tuple[Spec, ...]:
    """``[[fqn, dtype, shape], ...]``: every tensor once, a dtype of the closed table, a shape of
    ints >= 0; raises BAD_MESSAGE naming the bad entry."""
    if len(raw) > MAX_SPECS:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"at most {MAX_SPECS} tensors per version, got {len(raw)}")
    out, seen = [], set()
    for i, item in enumerate(raw):
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[2], list):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"spec {i} must be [fqn, dtype, shape], not {short_repr(item)}")
        fqn, dtype, shape = item
        try:  # a whole tensor is a plan entry holding all of itself: the plan's checks apply
            entry = PlanEntry.from_wire([fqn, dtype, shape, [0] * len(shape), shape], i)
        except ProtocolError as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"spec {i}: {exc.message}") from None
        if entry.fqn in seen:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"tensor {entry.fqn!r} appears twice; each name may appear once")
        seen.add(entry.fqn)
        out.append((entry.fqn, entry.dtype, entry.global_shape))
    return tuple(out)


def offsets_to_wire(offsets) -> list:
    return [[fqn, offset] for fqn, offset in offsets]


def offsets_from_wire(raw: list) -> tuple[tuple[str, int], ...]:
    out = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or type(item[1]) is not int
            or item[1] < 0
        ):
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"an offset must be [fqn, byte offset >= 0], not {short_repr(item)}"
            )
        out.append((item[0], item[1]))
    return tuple(out)


@message("assemble_begin")
class AssembleBegin(Message):
    """The assembler holds ``lease`` (taken on this node's daemon) on ``step``, a complete version of
    the job, whose tensors are ``specs``: which segment should it copy the whole version into?"""

    CODECS: ClassVar = {"specs": Codec(list, specs_to_wire, specs_from_wire)}
    step: int = 0
    lease: int = 0
    specs: tuple[Spec, ...] = ()

    def check(self) -> None:
        nonneg(self, "step", "lease")


@message("assemble_reply")
class AssembleReply(Message):
    """Where to write ``step`` whole: segment ``segment`` of ``size`` bytes, each tensor dense and
    row-major at its byte offset (``offsets``: fqn -> offset, every spec once). Or, with a
    ``reason`` (``not_partial``, ``mismatch``, ``no_memory``), nothing to write and ``message``
    says why."""

    CODECS: ClassVar = {"offsets": Codec(list, offsets_to_wire, offsets_from_wire)}
    step: int = 0
    segment: str = ""
    size: int = 0
    offsets: tuple[tuple[str, int], ...] = ()
    reason: str = ""
    message: str = ""

    def check(self) -> None:
        nonneg(self, "step", "size")
        if self.reason not in SKIP_REASONS:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"assemble_reply: reason must be one of {SKIP_REASONS}, not {short_repr(self.reason)}",
            )


@message("assemble_done")
class AssembleDone(Message):
    """The assembler is done with ``segment`` for ``step``: ``ok``, every byte is in (the daemon swaps
    the step's partial version for the whole one); else the daemon takes the segment back
    (``reason`` says what failed, for the daemon's log). Answered with ``Ok``."""

    step: int = 0
    segment: str = ""
    ok: bool = False
    reason: str = ""

    def check(self) -> None:
        nonneg(self, "step")
        if len(self.reason) > MAX_REASON:
            self.reason = self.reason[:MAX_REASON]  # a long traceback is cut, not refused: the segment must go back
