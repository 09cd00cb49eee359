"""The ``stager`` weight-transfer engine of a vLLM worker: each update reads one sealed version.

vLLM creates it in every worker of an engine started with
``weight_transfer_config=WeightTransferConfig(backend="stager")`` (registered by
:mod:`.plugin`). ``init_transfer_engine`` connects a :class:`~stager.client.Subscriber` (HF view,
the engine's dtype); each ``update_weights({"step": S})`` leases step S (or the newest) for the
whole update, checks its names and shapes against the model before touching it
(:mod:`.plan`), then feeds ``model.load_weights`` one decoder layer at a time through vLLM's
layerwise reload. On the daemon's host the tensors are views of its shared memory (nothing is
copied before the loader's own copy, unless the engine's dtype differs); elsewhere they arrive
as frames (a tensor-parallel rank's: only its slice, once learned, :mod:`.tp_slices`). The lease
is held until ``finish_weight_update``. Failure states: :mod:`.errors`. An engine at a step the
daemon keeps change maps from moves only what changed (:mod:`.delta`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from stager.client import Subscriber
from stager.protocol import ErrorCode, StagerError

from . import delta, direct, plan, reload, tp_slices
from .errors import UpdateIncomplete, UpdateRefused, VerifyFailed
from .init_info import check_init_info

log = logging.getLogger("stager.integrations.vllm")


@dataclasses.dataclass
class StagerInitInfo(WeightTransferInitInfo):
    """``init_info`` of the stager backend (every field optional).

    ``endpoint``: the daemon (default ``$STAGER_ENDPOINT`` or the per-user ipc socket); any daemon of
    a multi-node job reads the job's complete versions. ``auth_dir``: CURVE keys for tcp endpoints
    (``$STAGER_AUTH_DIR``). ``adapter`` (a built-in name), ``hf_config``, ``prefix``: override the
    version's ``model_info``. ``names``: update only these HF names. ``remote``: read frames even on
    the daemon's host. ``timeout``: seconds a daemon may stay silent before a read fails.
    ``quantize="fp8-block"``: for an engine serving an FP8 checkpoint (``quantization="fp8"``, block
    scales): the weights such a checkpoint quantizes come as e4m3 plus ``weight_scale_inv``, quantized
    on read (``Subscriber(view="hf", quantize="fp8-block")``), the rest in the engine's dtype.
    """

    endpoint: str | None = None
    auth_dir: str | None = None
    adapter: str | None = None
    hf_config: dict | None = None
    prefix: str | None = None
    names: list[str] | None = None
    remote: bool | None = None
    timeout: float = 30.0
    quantize: str | None = None

    def __post_init__(self) -> None:
        check_init_info(self)  # init_info may come over HTTP: only data, each field checked (.init_info)


@dataclasses.dataclass
class StagerUpdateInfo(WeightTransferUpdateInfo):
    """``update_info``: ``step``, a sealed step or ``"latest"`` (resolved and pinned here; a
    driver updating several engines resolves it once and passes the number to each). ``verify``:
    check the engine's tensors against the version once loaded (a mismatch: :class:`.errors.VerifyFailed`).
    ``full``: read the version in full, not as a delta from the step the engine held (after its weights
    changed without this backend: :meth:`StagerWeightTransferEngine.forget_base`)."""

    step: int | str = "latest"
    verify: bool = False  # after the update, compare the engine's tensors with the version (.direct.check)
    full: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not (isinstance(self.step, int) or self.step == "latest"):
            raise ValueError(f"update_info step must be a step number or 'latest', not {self.step!r}")
        if not isinstance(self.verify, bool):
            raise ValueError(f"update_info verify must be true or false, not {self.verify!r}")
        if not isinstance(self.full, bool):
            raise ValueError(f"update_info full must be true or false, not {self.full!r}")


class StagerWeightTransferEngine(WeightTransferEngine[StagerInitInfo, StagerUpdateInfo]):
    init_info_cls = StagerInitInfo
    update_info_cls = StagerUpdateInfo
    supports_draft_weight_update = False  # a draft model has its own names: not mapped here

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self._sub: Subscriber | None = None
        self._only: set[str] | None = None
        self.step: int | None = None  # the stager step the weights are at (None: the engine's checkpoint)
        self.incomplete: int | None = None  # the step of an update that failed part way
        self._expected: dict[str, tuple[int, ...]] | None = None
        self._expected_from = None
        self._session: dict[str, Any] | None = None
        self.on_tensor: Callable[[str], None] | None = None  # called per tensor handed to the loader (tests)
        self.on_loaded: Callable[[torch.nn.Module], None] | None = None  # called before verifying (tests)
        self._unproven = "no complete update yet"  # why there is no direct plan
        self._proof_tried = False
        self.last_update: dict[str, Any] = {}
        self._direct: direct.Plan | None = None  # proven after the first complete layerwise update (.direct)
        self.direct = True  # False: every update through vLLM's layerwise reload
        self._base: delta.Base | None = None  # the version the weights hold whole, as a change map's start
        self._base_params: tuple | None = None  # the parameters' identity when the base was loaded (_identity)
        self._quantize: str | None = None
        self.delta = True  # False: every update reads its version in full (no change maps asked)
        self.slices = tp_slices.Slices()  # a tensor-parallel rank's learned slices (.tp_slices)

    # ------------------------------------------------------------------ vLLM's lifecycle

    def init_transfer_engine(self, init_info: StagerInitInfo) -> None:
        self.shutdown()
        self._only = set(init_info.names) if init_info.names else None
        self._quantize = init_info.quantize
        self.slices = tp_slices.Slices(*tp_slices.worker_rank_size())
        self.slices.enabled = init_info.quantize is None  # fp8 blocks: each loader's narrow is not watched
        self._sub = Subscriber(
            init_info.endpoint,
            view="hf",
            dtype=self.model_config.dtype,
            adapter=init_info.adapter,
            hf_config=init_info.hf_config,
            prefix=init_info.prefix,
            names=init_info.names,
            remote=init_info.remote,
            timeout=float(init_info.timeout),
            quantize=init_info.quantize,
            auth_dir=init_info.auth_dir,
        )  # this subscriber's keys: the process env stays as is

    def start_weight_update(self) -> None:
        if self._sub is None:
            raise StagerError(
                ErrorCode.NOT_REGISTERED,
                "the stager weight transfer engine is not initialized: call "
                "init_weight_transfer_engine({'init_info': {...}}) first",
            )
        self._end_session()
        # the model is left alone until an update's checks pass (update_weights)
        self._session = {"step": None, "snap": None, "layers": None, "tensors": 0, "bytes": 0, "t0": time.monotonic()}

    def parse_init_info(self, init_dict: dict[str, Any]) -> StagerInitInfo:
        try:
            return StagerInitInfo(**init_dict)
        except (TypeError, ValueError) as exc:  # a typed error saying which field, not a bare ValueError
            raise StagerError(
                ErrorCode.BAD_VALUE,
                f"stager init_info: {exc}; fields: {', '.join(f.name for f in dataclasses.fields(StagerInitInfo))}",
            ) from None

    def parse_update_info(self, update_dict: dict[str, Any]) -> StagerUpdateInfo:
        try:
            return StagerUpdateInfo(**update_dict)
        except (TypeError, ValueError) as exc:
            raise UpdateRefused(
                ErrorCode.BAD_VALUE,
                update_dict.get("step") if isinstance(update_dict, dict) else None,
                self.step,
                f"update_info: {exc}; give {{'step': N}} or {{'step': 'latest'}}",
            ) from None

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: StagerUpdateInfo) -> None:
        session = self._session
        if session is None:
            raise UpdateRefused(
                ErrorCode.BAD_VALUE,
                update_info.step,
                self.step,
                "no update was started: call start_weight_update first",
            )
        if session["snap"] is not None:  # one version per update: a second would mix two
            first = session["step"]
            self._session = None  # vLLM ends the update when this raises: complete the first version now
            self._complete(session)
            raise UpdateRefused(
                ErrorCode.BAD_VALUE,
                update_info.step,
                self.step,
                f"one version per update: this update had loaded step {first}, which is now "
                "finished (set the weight version with LLM.update_weight_version); start another "
                f"update for step {update_info.step}",
            )
        step: int | str = update_info.step
        if update_info.full:
            self.forget_base()
        try:
            snap = self._lease(step)
            step = snap.step
            session.update(step=step, snap=snap, verify=update_info.verify)
            plan.check_names(step, snap.specs(), self._expected_shapes(), self.step, self._only)
            why = (
                f"no direct plan: {self._unproven}"
                if self._direct is None
                else "direct updates are off"
                if not self.direct
                else self._direct.covers(snap.specs())
            )
            found, session["why_full"] = self._find_delta(snap)
            session["delta"] = found
            if why is None:
                session["direct"] = direct.Writer(self.model, self._direct)
                self._load_direct(snap, session, found)
            else:
                session["why"] = why
                names = None
                if found is not None:  # only the layers that changed: the others keep their serving tensors
                    names = delta.changed_layers(self.model, found, [n for n, _, _ in snap.specs()])
                session["layers"] = reload.start(self.model)
                self._load(snap, session, names)
                if found is not None:
                    reload.keep_unloaded(self.model)
                unloaded = (
                    [] if self._only is not None or found is not None else reload.unloaded_layers(session["layers"])
                )
                if unloaded:  # finishing would keep these layers' old weights beside the new ones
                    raise StagerError(
                        ErrorCode.BAD_VALUE,
                        f"{len(unloaded)} layers ({', '.join(sorted(set(unloaded)))}) received no "
                        "weight from the version: stage the whole model, or check the adapter and prefix",
                    )
        except BaseException as exc:
            self._fail(exc, step)
            raise self._typed(exc, step) from exc
        session["loaded"] = True  # every tensor was taken: only finishing ends this update
        if update_info.verify:  # here, not in finish: vLLM stays mid-update when finish_weight_update raises
            self._finalize_and_verify(session)

    def finish_weight_update(self) -> None:
        session, self._session = self._session, None
        if session is None or session["snap"] is None:
            return  # nothing was loaded: the weights are as they were
        self._complete(session)

    def _complete(self, session: dict) -> None:
        """Finish the layerwise reload of a fully loaded update: the engine is at its step."""
        step = session["step"]
        if session.get("direct") is None and not session.get("finished"):
            try:
                reload.finish(self.model, self.model_config)
                session["sliced"] = self.slices.end(ok=True)  # the loaders ran; the lease still holds
            except BaseException as exc:
                self._session = session
                self._fail(exc, step, processed=True)
                raise self._typed(exc, step) from exc
            self._maybe_prove(session)
        specs = session["snap"].specs()
        # a change map may start here only if every tensor of the engine now holds this version
        whole = self._only is None and self._quantize is None
        self._base = delta.base(session["snap"], self.model_config.dtype) if whole else None
        self._base_params = _identity(self.model) if self._base is not None else None
        session["snap"].release()  # the loader's buffers are gone: the lease may end
        self.step, self.incomplete = step, None
        if self._only is None:
            self._expected = {name: tuple(shape) for name, _, shape in specs}
        seconds = time.monotonic() - session["t0"]
        self.last_update = {
            "step": step,
            "tensors": session["tensors"],
            "bytes": session["bytes"],
            "seconds": seconds,
            "path": "layerwise" if session.get("direct") is None else "direct",
            "why_layerwise": session.get("why"),
            "delta": None if session.get("delta") is None else session["delta"].stats(),
            "why_full": session.get("why_full"),
            "skipped": session.get("skipped", 0),
            "sliced": session.get("sliced", 0),
            "verified": session.get("verified", False),
        }
        log.info(
            "stager: weights at step %d (%d tensors, %.1f MB, %.3f s)",
            step,
            session["tensors"],
            session["bytes"] / 1e6,
            seconds,
        )

    def shutdown(self) -> None:
        self._end_session()
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        self.forget_base()  # a re-init may read another daemon, adapter or prefix: its steps are not this base

    def forget_base(self) -> None:
        """Read the next update in full, not as a delta from the step the engine held. Call it (on every
        worker: ``llm.collective_rpc``, or update info ``{"full": true}``) once the weights changed without
        this backend: vLLM's ``sleep(level=2)`` then ``wake_up`` (the weights' memory is discarded, mapped
        again at the same addresses, unwritten), ``reload_weights``, another weight-transfer backend. A
        parameter replaced or written through its own version counter is noticed (:func:`_identity`);
        memory rewritten under a parameter (``.data.copy_``, which vLLM's loaders use) is not."""
        self._base = None
        self._base_params = None
        self.slices.forget()

    # ------------------------------------------------------------------ internals

    def _lease(self, step: int | str):
        try:
            return self._sub.latest() if step == "latest" else self._sub.at(int(step))
        except StagerError as exc:
            raise UpdateRefused(exc.code, step, self.step, exc.message) from exc

    def _expected_shapes(self) -> dict[str, tuple[int, ...]] | None:
        if self._expected is None and self._expected_from is None:
            self._expected_from = getattr(self.model_config, "model", None)
            self._expected = plan.checkpoint_shapes(self._expected_from)
        return self._expected

    def _find_delta(self, snap) -> tuple[delta.Delta | None, str | None]:
        """The changes since the version the engine holds (:mod:`.delta`), or (None, why it reads in full)."""
        if not self.delta:
            return None, "delta updates are off"
        if self._only is not None or self._quantize is not None:
            return None, "init_info names or quantize: only whole updates in the engine's dtype take deltas"
        if self.incomplete is not None:
            return None, f"the last update (step {self.incomplete}) was incomplete"
        if self._base is not None and _identity(self.model) != self._base_params:
            held = self._base.step
            self.forget_base()
            return None, f"the engine's parameters were replaced or written since step {held} was loaded"
        return delta.find(snap, self._base, [name for name, _, _ in snap.specs()])

    def _load(self, snap, session: dict, names: list[str] | None = None) -> None:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        names = [name for name, _, _ in snap.specs()] if names is None else names
        session["skipped"] = len(snap.specs()) - len(names)

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for group in plan.layer_groups(names):  # one decoder layer at a time: what the reload buffers
                for name, tensor, nbytes in self.slices.items(snap, group):  # a TP rank's slices (.tp_slices)
                    session["tensors"] += 1
                    session["bytes"] += nbytes
                    if self.on_tensor is not None:
                        self.on_tensor(name)
                    yield name, tensor

        with disable_mtp_completeness_check(), torch.no_grad():
            self.model.load_weights(weights())

    def _load_direct(self, snap, session: dict, found: delta.Delta | None = None) -> None:
        """Write the version into the serving tensors (.direct), one decoder layer at a time; with
        ``found``, only what changed (:mod:`.delta`)."""
        writer = session["direct"]
        for group in plan.layer_groups(name for name, _, _ in snap.specs()):
            patches: dict = {}
            if found is not None:
                work = delta.direct_work(self._direct, found, group)
                patches, more = delta.patches(snap, self._base, work.patch)
                group = [n for n in group if n in set(work.whole) | set(more)]
                session["skipped"] = session.get("skipped", 0) + work.skipped
                for name, (_, values) in patches.items():
                    session["tensors"] += 1
                    session["bytes"] += values.numel() * values.element_size()
                    if self.on_tensor is not None:
                        self.on_tensor(name)
            got = {}
            for name, tensor in snap.items(group) if group else ():
                session["tensors"] += 1
                session["bytes"] += tensor.numel() * tensor.element_size()
                if self.on_tensor is not None:
                    self.on_tensor(name)
                got[name] = tensor
            writer.add(got, patches)  # writes the group before: a failed read of this one leaves it unwritten
        writer.flush()

    def _prove(self, snap) -> None:
        """After a complete layerwise update: the direct plan, proven against what vLLM loaded (.direct)."""
        try:
            specs = snap.specs()
            groups = plan.layer_groups(name for name, _, _ in specs)
            self._direct, self._unproven = direct.build(self.model, snap.items, groups, specs)
        except Exception as exc:  # never fails an update that completed: its weights are in place
            log.warning("stager: no direct updates (%s: %s); vLLM's layerwise reload goes on", type(exc).__name__, exc)
            self._direct, self._unproven = None, f"{type(exc).__name__}: {exc}"

    def _maybe_prove(self, session: dict) -> None:
        if self._direct is None and self._only is None and self.direct and not self._proof_tried:
            self._proof_tried = True  # once: an engine whose tensors cannot be proven stays layerwise
            self._prove(session["snap"])

    def _finalize_and_verify(self, session: dict) -> None:
        """Finish the reload, then compare the engine's tensors with the version, read again under
        the update's lease (:func:`.direct.check`): a mismatch, or tensors whose place in the engine
        is not proven, leave the engine refusing to serve (:class:`VerifyFailed`)."""
        step, snap = session["step"], session["snap"]
        try:
            if session.get("direct") is None:
                reload.finish(self.model, self.model_config)
                session["sliced"] = self.slices.end(ok=True)
                session["finished"] = True
                self._maybe_prove(session)
            if self.on_loaded is not None:
                self.on_loaded(self.model)
            if self._direct is None:
                raise VerifyFailed(
                    step,
                    self.step,
                    [],
                    f"step {step} cannot be verified: where vLLM keeps each tensor "
                    f"is not proven ({self._unproven}); verify against a reference "
                    "engine instead (update(..., verify=weight_checksums(ref)))",
                )
            # every tensor, after a delta update too: what it did not write is right only if the engine
            # held its base, which is what a delta assumes and what this check is there to catch
            bad = direct.check(self._direct, snap.items, plan.layer_groups(name for name, _, _ in snap.specs()))
            if bad:
                raise VerifyFailed(step, self.step, bad)
        except BaseException as exc:
            self._fail(exc, step, processed=True)
            raise self._typed(exc, step) from exc
        session["verified"] = True

    def _fail(self, exc: BaseException, step: int, processed: bool = False) -> None:
        """After a failed update: the model back in a servable shape, the incomplete state recorded."""
        session = self._session or {}
        self.slices.end(ok=False)  # what this update saw is not learned
        layers = session.get("layers")
        if layers is not None and not processed:
            processed = reload.processed_layers(layers) > 0
        if session.get("direct") is not None:
            processed = processed or session["direct"].written
        if layers is not None:
            reload.restore(self.model)
        if processed:
            self.incomplete = step
            self._base = None
        log.warning(
            "stager: update to step %s failed (%s): %s",
            step,
            "incomplete: refusing to serve until a complete update"
            if processed
            else f"still at {'the checkpoint' if self.step is None else f'step {self.step}'}",
            exc,
        )
        if session.get("snap") is not None:
            session["snap"].release()
        self._session = None

    def _typed(self, exc: BaseException, step: int | str) -> StagerError:
        """``exc`` as the error that says the engine's state: refused (still at ``self.step``) or,
        whenever the weights hold two versions (now or since an earlier failure), incomplete."""
        if isinstance(exc, (UpdateRefused, UpdateIncomplete)):
            code, problem = exc.code, exc.problem
        elif isinstance(exc, StagerError):
            code, problem = exc.code, exc.message
        else:
            code, problem = ErrorCode.BAD_VALUE, f"{type(exc).__name__}: {exc}"
        if self.incomplete is not None:
            return exc if isinstance(exc, UpdateIncomplete) else UpdateIncomplete(code, step, self.step, problem)
        return exc if isinstance(exc, UpdateRefused) else UpdateRefused(code, step, self.step, problem)

    def _end_session(self) -> None:
        """End an update vLLM left open: a fully loaded one is finished (any other end would keep
        old weights beside new ones), one not yet loaded gives the layers their weights back."""
        session, self._session = self._session, None
        if session is None or session.get("snap") is None:
            return
        if session.get("loaded"):
            self._complete(session)
            return
        if session.get("layers") is not None:
            reload.restore(self.model)
        self.slices.end(ok=False)
        session["snap"].release()


def _identity(model: torch.nn.Module) -> tuple:
    """What a delta's base assumes of the model's parameters: the same objects, in the same memory, not written
    since (their version counters; inference tensors have none). Taken as the base is recorded, compared
    before a delta: cheap (no byte read), blind to memory rewritten without torch knowing (forget_base)."""
    out = []
    for name, p in model.named_parameters():
        try:
            version = p._version
        except RuntimeError:  # an inference tensor: no version counter
            version = None
        out.append((name, id(p), p.data_ptr(), version))
    return tuple(out)
