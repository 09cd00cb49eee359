"""One engine as the driver sees it: an ``LLM`` object in this process, or a server by base URL.

Both give the same steps: init, pause, start, update, finish (with the weight version), reset
(the prefix cache: KV computed with the old weights), resume, and refuse (an engine whose update
was incomplete must not serve). A server is paused with vLLM's ``/pause`` (requests wait) and
stays paused when it must refuse; an ``LLM`` in this process generates only when its caller asks,
so refusing means its ``generate`` and ``chat`` raise :class:`EngineIncomplete` until a complete
update. Servers need ``VLLM_SERVER_DEV_MODE=1`` (vLLM's weight-transfer and cache routes).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from stager.protocol import ErrorCode, StagerError

from .errors import EngineIncomplete, classify

GUARDED = ("generate", "chat", "beam_search", "encode")  # what an LLM serves with


class LLMHandle:
    """A ``vllm.LLM`` in this process (its weight-transfer backend must be ``stager``)."""

    concurrent = False  # the caller's own thread runs it

    def __init__(self, llm: Any):
        self.llm = llm
        self.name = f"LLM@{id(llm):x}"

    def call(self, what: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.llm, what)(*args, **kwargs)
        except StagerError:
            raise
        except Exception as exc:  # wrapped on the way (another worker process): typed again from its text
            raise classify(f"{type(exc).__name__}: {exc}") from exc

    def init(self, info: dict) -> None:
        self.call("init_weight_transfer_engine", {"init_info": info})

    def pause(self) -> None:
        pass  # nothing generates while this thread updates

    def start(self) -> None:
        self.call("start_weight_update")

    def update(self, step: int, verify: bool = False) -> None:
        self.call("update_weights", {"update_info": {"step": step, **({"verify": True} if verify else {})}})

    def finish(self, version: str) -> None:
        self.call("finish_weight_update", weight_version=version)

    def reset(self) -> None:
        self.llm.reset_prefix_cache()

    def resume(self) -> None:
        pass

    def accept(self) -> None:
        """After a complete update: serve again (the class's own methods)."""
        for attr in GUARDED:
            self.llm.__dict__.pop(attr, None)

    def refuse(self, cause: StagerError) -> None:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise EngineIncomplete(self.name, cause)

        for attr in GUARDED:
            if hasattr(self.llm, attr):
                setattr(self.llm, attr, refused)

    def version(self) -> str:
        return self.llm.get_weight_version()

    def checksums(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in self.llm.collective_rpc("compute_weight_checksums"):
            out.update(part)
        return out


class HTTPHandle:
    """A vLLM server (``vllm serve ... --weight-transfer-config '{"backend": "stager"}'``)."""

    concurrent = True  # servers are updated in parallel, one thread each

    def __init__(self, base_url: str, timeout: float = 300.0, pause_mode: str = "keep"):
        self.base = base_url.rstrip("/")
        self.name = self.base
        self.timeout = timeout
        self.pause_mode = pause_mode

    def request(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> Any:
        url = f"{self.base}/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"} if data is not None else {}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            if exc.code == 404:
                raise StagerError(
                    ErrorCode.UNAVAILABLE,
                    f"{url}: 404; start the server with VLLM_SERVER_DEV_MODE=1 "
                    "(vLLM serves its weight-transfer routes only then)",
                ) from None
            raise classify(f"{url}: HTTP {exc.code}: {_detail(text)}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise StagerError(ErrorCode.UNAVAILABLE, f"{url}: {exc}; is the vLLM server up?") from None
        return json.loads(raw) if raw else None

    def init(self, info: dict) -> None:
        self.request("POST", "init_weight_transfer_engine", {"init_info": info})

    def pause(self) -> None:
        self.request("POST", "pause", query={"mode": self.pause_mode})

    def start(self) -> None:
        self.request("POST", "start_weight_update")

    def update(self, step: int, verify: bool = False) -> None:
        self.request("POST", "update_weights", {"update_info": {"step": step, **({"verify": True} if verify else {})}})

    def finish(self, version: str) -> None:
        self.request("POST", "finish_weight_update", {"weight_version": version})

    def reset(self) -> None:
        self.request("POST", "reset_prefix_cache")

    def resume(self) -> None:
        self.request("POST", "resume")

    def refuse(self, cause: StagerError) -> None:
        pass  # paused before the update, and left paused

    def accept(self) -> None:
        pass  # resumed

    def version(self) -> str:
        return self.request("GET", "weight_info")["weight_version"]

    def checksums(self) -> dict[str, str]:
        return self.request("POST", "weight_checker", {"action": "checksum"})["checksums"]


def _detail(text: str) -> str:
    """The error text of a vLLM error response (JSON with a message or detail), else the body."""
    try:
        body = json.loads(text)
    except ValueError:
        return text[:2000]
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message", value)
            if value:
                return str(value)[:2000]
    return text[:2000]


def handle(engine: Any, timeout: float = 300.0, pause_mode: str = "keep") -> LLMHandle | HTTPHandle:
    if isinstance(engine, (LLMHandle, HTTPHandle)):
        return engine
    if isinstance(engine, str):
        if not engine.startswith(("http://", "https://")):
            raise StagerError(
                ErrorCode.BAD_VALUE,
                f"engine {engine!r}: give a server's base URL (http://host:8000) or a vllm.LLM object",
            )
        return HTTPHandle(engine, timeout, pause_mode)
    if not hasattr(engine, "update_weights") or not hasattr(engine, "init_weight_transfer_engine"):
        raise StagerError(
            ErrorCode.BAD_VALUE,
            f"engine {type(engine).__name__}: give a vllm.LLM (0.32 or newer: "
            "it has update_weights) or a server's base URL",
        )
    return LLMHandle(engine)
