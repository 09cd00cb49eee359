"""Moving vLLM engines to a sealed step: one call for one or many engines, and a follower.

>>> from stager.integrations.vllm import update, Follower      # doctest: +SKIP
>>> llm = LLM(model_dir, weight_transfer_config=WeightTransferConfig(backend="stager"))
>>> update(llm, step="latest").step                            # pinned, loaded, prefix cache reset
>>> follower = Follower([llm, "http://rollout-1:8000"], k=1)
>>> follower.sync()                                            # before each rollout batch: within k steps

``update`` resolves ``"latest"`` once and holds a lease on the step while the engines read it
(each engine leases it too), so every engine lands on the same version. Per engine: pause
(servers), start, update, finish with ``weight_version=str(step)``, reset the prefix cache,
resume. The engine's weight version is the step: vLLM tags each output with it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from stager.client import Subscriber
from stager.protocol import ErrorCode, StagerError

from .errors import UpdateIncomplete, WeightMismatch
from .handles import handle

log = logging.getLogger("stager.integrations.vllm")


@dataclasses.dataclass
class EngineResult:
    """One engine's update: its name (``LLM@...`` or the base URL), the weight version it reports
    afterwards, seconds per phase (pause, start, update, finish, reset, resume, total) and the
    error (None when it succeeded)."""

    engine: str
    step: int
    weight_version: str | None
    seconds: dict[str, float]
    error: StagerError | None = None


@dataclasses.dataclass
class UpdateResult:
    step: int
    engines: list[EngineResult]

    @property
    def ok(self) -> bool:
        return all(e.error is None for e in self.engines)


def update(
    engines: Any,
    step: int | str = "latest",
    *,
    endpoint: str | None = None,
    init_info: Mapping[str, Any] | None = None,
    verify: Mapping[str, str] | bool | None = None,
    pause_mode: str = "keep",
    timeout: float = 300.0,
    raise_errors: bool = True,
) -> UpdateResult:
    """Move ``engines`` (an ``LLM``, a base URL, or a list of them) to ``step`` (or the newest).

    ``endpoint``: the daemon the driver pins the step on (default: ``$STAGER_ENDPOINT``).
    ``init_info``: the backend's init info (:class:`~.engine.StagerInitInfo` fields; its endpoint
    defaults to ``endpoint``), sent to each engine first (None: the engines were initialized
    before). ``verify``: True: each engine checks its tensors against the version it loaded
    (:class:`~.errors.VerifyFailed` naming them, the engine refuses to serve); or vLLM weight
    checksums of a reference engine at the same step (:func:`weight_checksums`): a difference
    raises :class:`WeightMismatch` naming the tensors, and the engine refuses to serve.
    ``pause_mode``: vLLM's ``/pause`` mode for servers (``keep``: requests wait and go on after;
    ``abort``). Raises the first engine's typed error (:mod:`.errors`) after every engine was
    tried, with ``.result`` set; ``raise_errors=False`` returns it in the result instead. A step
    the driver's daemon does not hold raises its error (``no_version``) before any engine is touched.
    """
    handles = [handle(e, timeout, pause_mode) for e in (engines if isinstance(engines, (list, tuple)) else [engines])]
    info = dict(init_info) if init_info is not None else {}
    if init_info is not None and endpoint is not None:
        info.setdefault("endpoint", endpoint)
    with Subscriber(endpoint, remote=True, names=(), timeout=min(timeout, 30.0)) as pin:
        with pin.latest() if step == "latest" else pin.at(int(step)) as snap:  # held while engines read
            target = snap.step
            http = [h for h in handles if h.concurrent]
            results: dict[int, EngineResult] = {}
            with ThreadPoolExecutor(max_workers=max(1, len(http))) as pool:
                futures = {id(h): pool.submit(_one, h, target, info, verify) for h in http}
                for h in handles:
                    if not h.concurrent:
                        results[id(h)] = _one(h, target, info, verify)
                for key, future in futures.items():
                    results[key] = future.result()
    result = UpdateResult(target, [results[id(h)] for h in handles])
    failed = [r for r in result.engines if r.error is not None]
    if failed and raise_errors:
        error = failed[0].error
        error.result = result  # type: ignore[attr-defined]
        raise error
    return result


def _one(h, step: int, info: dict, verify: Mapping[str, str] | None) -> EngineResult:
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    def timed(phase: str, fn, *args) -> None:
        t = time.perf_counter()
        fn(*args)
        seconds[phase] = time.perf_counter() - t

    error: StagerError | None = None
    paused = False
    try:
        if info:
            timed("init", h.init, info)
        timed("pause", h.pause)
        paused = True
        timed("start", h.start)
        timed("update", h.update, step, verify is True)
        timed("finish", h.finish, str(step))
        timed("reset", h.reset)  # the prefix cache holds KV of the old weights
        if verify is not None and verify is not True and verify is not False:
            _verify(h, step, verify)
        timed("resume", h.resume)
        h.accept()
    except StagerError as exc:
        error = exc
    except Exception as exc:  # a transport failure the handle did not type
        error = StagerError(ErrorCode.INTERNAL, f"{h.name}: {type(exc).__name__}: {exc}")
    if error is not None:
        if isinstance(error, (UpdateIncomplete, WeightMismatch)):
            h.refuse(error)  # no mix is served: a server stays paused, an LLM raises
            log.error("%s: %s", h.name, error)
        else:
            log.warning("%s: %s", h.name, error)
            if paused:
                try:
                    h.resume()  # refused before any weight changed: it serves its previous version
                except StagerError as exc:
                    log.warning("%s: resume failed: %s", h.name, exc)
    seconds["total"] = time.perf_counter() - t0
    try:
        version = h.version()
    except Exception as exc:  # the result still says what happened
        log.debug("%s: weight version not read: %s", h.name, exc)
        version = None
    return EngineResult(h.name, step, version, seconds, error)


def _verify(h, step: int, reference: Mapping[str, str]) -> None:
    got = h.checksums()
    differ = sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))
    if differ:
        raise WeightMismatch(h.name, step, differ)


def weight_checksums(engine: Any) -> dict[str, str]:
    """vLLM's per-tensor digests of an engine's weights as it serves them (its ``weight_checker``):
    the reference :func:`update` verifies other engines against (same model, same parallelism)."""
    return handle(engine).checksums()


class Follower:
    """Keeps engines at most ``k`` steps behind the newest sealed version (the async-RL staleness
    bound, PRIME-RL's ``max_async_level``).

    ``init_info`` goes with the first update. Call :meth:`sync` before each rollout batch: when
    the engines are more than ``k`` steps behind the newest version (or hold no version yet), they
    are updated to the newest; otherwise it returns at once. ``self.step`` is the step the engines
    are at. Other keyword arguments go to :func:`update`.
    """

    def __init__(
        self,
        engines: Any,
        k: int = 1,
        *,
        endpoint: str | None = None,
        timeout: float = 60.0,
        init_info: Mapping[str, Any] | None = None,
        **update_kwargs: Any,
    ):
        if k < 0:
            raise ValueError("k must be >= 0 (0: always the newest version)")
        self.engines = engines if isinstance(engines, (list, tuple)) else [engines]
        self.k = k
        self.endpoint = endpoint
        self.step = None
        self.updates: list[UpdateResult] = []
        self._kwargs = dict(update_kwargs, endpoint=endpoint)
        self._init_info = init_info  # sent with the first update only
        self._sub = Subscriber(endpoint, remote=True, names=(), timeout=timeout)

    def newest(self) -> int | None:
        """The newest sealed (for a multi-node job: complete) step, None when there is none."""
        try:
            with self._sub.latest() as snap:
                return snap.step
        except StagerError as exc:
            if exc.code == ErrorCode.NO_VERSION:
                return None
            raise

    def sync(self, min_step: int | None = None, timeout: float | None = None) -> UpdateResult | None:
        """Update the engines to the newest version if they are more than ``k`` steps behind it, or
        behind ``min_step`` (first waiting up to ``timeout`` seconds for a step >= ``min_step`` to be
        sealed: an RL loop passes the oldest step its next batch may use). Returns the update made,
        or None when the engines were recent enough."""
        newest = self.newest()
        if min_step is not None and (newest is None or newest < min_step):
            with self._sub.wait_for_newer(min_step - 1, timeout) as snap:
                newest = snap.step
        if newest is None:
            return None
        behind = self.step is None or newest - self.step > self.k or (min_step is not None and self.step < min_step)
        if not behind:
            return None
        result = update(self.engines, newest, init_info=self._init_info, **self._kwargs)
        self.step, self._init_info = result.step, None
        self.updates.append(result)
        return result

    def lag(self) -> int | None:
        """Steps between the newest version and the engines' (None: unknown yet)."""
        newest = self.newest()
        return None if newest is None or self.step is None else newest - self.step

    def close(self) -> None:
        self._sub.close()

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
