"""Daemon configuration."""

from __future__ import annotations

import dataclasses
import re

import psutil

from stager.endpoint import is_loopback, resolve

DEFAULT_MEMORY_FRACTION = 0.5
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str | int) -> int:
    """``"4GiB"``, ``"512M"``, ``"30%"`` (of available memory) or a plain byte count -> bytes.

    >>> parse_size("1.5GiB")
    1610612736
    """
    if isinstance(text, int):
        return text
    s = text.strip().lower()
    if s.endswith("%"):
        return int(psutil.virtual_memory().available * float(s[:-1]) / 100)
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", s)
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"cannot read size {text!r}; write e.g. 8GiB, 512MiB, 30% or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclasses.dataclass(kw_only=True)
class DaemonConfig:
    """Settings of one `stager serve` process.

    >>> DaemonConfig(memory_limit=1 << 30, keep=3).keep
    3
    """

    endpoint: str | None = None
    """ZeroMQ endpoint to bind; None: ``$STAGER_ENDPOINT``, else the ipc socket in the runtime dir."""

    memory_limit: int | None = None
    """Bytes of shared memory for snapshots (sealed, in flight and pooled); None: half of available RAM."""

    keep: int = 2
    """Sealed versions retained (leased versions outlive this until released)."""

    step_timeout: float = 120.0
    """Seconds from a step's first begin until every rank must have committed, else it fails."""

    peer_timeout: float = 30.0
    """Seconds of silence after which a peer on another host is considered dead."""

    auth_dir: str | None = None
    """CURVE keys for a non-loopback tcp bind: ``server.key_secret`` and ``authorized/*.key`` (deploy/README.md)."""

    def __post_init__(self) -> None:
        self.endpoint = resolve(self.endpoint)
        if self.memory_limit is None:
            self.memory_limit = int(psutil.virtual_memory().available * DEFAULT_MEMORY_FRACTION)
        if self.memory_limit <= 0:
            raise ValueError("memory_limit must be positive")
        if self.keep < 1:
            raise ValueError("keep must be >= 1: the newest sealed version is always kept")
        if self.step_timeout <= 0 or self.peer_timeout <= 0:
            raise ValueError("step_timeout and peer_timeout must be positive")
        if not is_loopback(self.endpoint) and not self.auth_dir:
            raise ValueError(
                f"{self.endpoint} is not a loopback address: binding it without authentication would let "
                "anyone on the network read the model. Pass --auth-dir with CURVE keys (deploy/README.md) "
                "or bind tcp://127.0.0.1:PORT"
            )
