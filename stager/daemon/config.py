"""Daemon configuration."""

from __future__ import annotations

import dataclasses
import os
import re

import psutil
import torch

from stager.flags import setting
from stager.metrics import parse_listen
from stager.protocol.dtypes import parse_dtype
from stager.protocol.endpoint import is_loopback, resolve
from stager.protocol.nixl import nixl_installed

DEFAULT_MEMORY_FRACTION = 0.5
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1 << 40,
    "tib": 1 << 40,
}


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


def parse_transport(text: str) -> str:
    """``--transport``: ``frames`` or ``nixl``."""
    if text not in ("frames", "nixl"):
        raise ValueError(f"--transport must be frames or nixl, not {text!r}")
    return text


@dataclasses.dataclass(kw_only=True)
class DaemonConfig:
    """Settings of one `stager serve` process.

    Each field is also a `stager serve` flag (``memory_limit``: ``--memory-limit``), made from it by
    stager/flags.py: the default and the flag's help are declared here only, in ``setting()``; the
    docstring under each field says what the daemon does with it.

    >>> DaemonConfig(memory_limit=1 << 30, keep=3).keep
    3
    """

    endpoint: str | None = setting(
        None, "ipc:///path or tcp://host:port (default $STAGER_ENDPOINT or a per-user ipc socket)"
    )
    """ZeroMQ endpoint to bind; None: ``$STAGER_ENDPOINT``, else the ipc socket in the runtime dir."""

    memory_limit: int | None = setting(
        None,
        f"shared memory for snapshots, e.g. 16GiB or 40%% (default {DEFAULT_MEMORY_FRACTION * 100:g}%% of available)",
        parse=parse_size,
    )
    """Bytes of shared memory for snapshots (sealed, in flight and pooled); None: half of available RAM."""

    preallocate: int = setting(
        0,
        "shared memory to allocate at start, within --memory-limit, e.g. 8GiB: the first "
        "snapshot is written into pages already there (default none)",
        parse=parse_size,
    )
    """Bytes of shared memory to allocate when the daemon starts, in the background, counted
    against ``memory_limit``: the first new segment that fits takes these pages instead of
    allocating its own, so the first snapshot (a ``load-hf``, a trainer's first step) is written
    into memory that is already there. Given back whenever a step needs the memory. 0: none."""

    keep: int = setting(2, "sealed versions to retain (default %(default)s)")
    """Sealed versions retained (leased versions outlive this until released)."""

    step_timeout: float = setting(120.0, "seconds for all ranks to commit a step")
    """Seconds from a step's first begin until every rank must have committed, else it fails."""

    peer_timeout: float = setting(
        30.0, "seconds of silence after which a peer on another host counts as gone (default %(default)g)"
    )
    """Seconds of silence after which a peer on another host is considered dead."""

    auth_dir: str | None = setting(None, "CURVE keys directory (`stager keygen`), required for every tcp bind")
    """CURVE keys, required for every tcp bind (loopback included): ``server.key_secret`` and
    ``authorized/*.key``, made by ``stager keygen`` (deploy/README.md)."""

    insecure_no_auth: bool = setting(
        False,
        "serve a loopback tcp endpoint WITHOUT authentication: any local user can read snapshots and stage "
        '(throwaway setups only; the daemon warns and reports "insecure": true)',
    )
    """Serve a loopback tcp endpoint without authentication: every local user can then read status and
    snapshots and stage. For throwaway setups only; the daemon warns, and says ``"insecure": true``."""

    metrics: str | None = setting(
        None, "serve Prometheus metrics over HTTP (HOST default 127.0.0.1; off by default)", metavar="[HOST:]PORT"
    )
    """``[HOST:]PORT`` to serve Prometheus metrics on (HOST defaults to 127.0.0.1); None: no metrics."""

    drain_timeout: float = setting(
        30.0, "on SIGTERM, seconds to let steps in flight seal before exiting (default %(default)g)"
    )
    """Seconds a SIGTERM waits for the steps in flight to seal before the daemon exits anyway."""

    host_id: str | None = setting(
        None,
        "this node's identity (default $STAGER_HOST_ID, else the machine's); give each simulated node on "
        "one host its own, and set STAGER_HOST_ID for its ranks",
    )
    """This node's identity; None: ``$STAGER_HOST_ID``, else the machine's. Daemons (and their
    clients) with different ids never share memory: give each simulated node on one host its own."""

    advertise: str | None = setting(
        None, "endpoint other nodes of a job reach this daemon at (default: --endpoint)", metavar="ENDPOINT"
    )
    """The endpoint the other nodes of a job (and their readers) reach this daemon at; None: the
    bound endpoint. Set it when binding a wildcard (``tcp://0.0.0.0:7555`` -> ``tcp://node3:7555``)."""

    assemble_full: bool = setting(
        False,
        "multi-node jobs: pull each complete version whole onto this node in the background (free memory "
        "only), so readers here read all of it zero-copy",
    )
    """Multi-node jobs: after each version is complete on every node, pull the other nodes' regions
    into this node in the background, so readers here read the whole version zero-copy. Uses only
    memory free under ``memory_limit`` (a version is left partial otherwise); the trainer never waits
    for it. Other nodes are reached with ``$STAGER_AUTH_DIR`` (default: ``auth_dir``) keys."""

    read_cast_memory: int | None = setting(
        None,
        "heap memory, beyond --memory-limit, for remote reads the daemon casts to the reader's dtype, e.g. "
        "512MiB: reads past it wait (default 1/8 of --memory-limit, 64MiB to 1GiB)",
        parse=parse_size,
    )
    """Bytes of reply buffers for remote reads cast to the reader's dtype (``ReadItem.dtype``), in
    flight and kept for reuse, all readers together. They are the daemon's heap, not shared memory,
    so they are not within ``memory_limit``: this bounds them. A cast read that would go past it
    waits (is answered once earlier replies went out, readers in turn), as a reader's reads past its
    own bytes in flight do; one reply larger than the limit is served alone. None: an eighth of
    ``memory_limit``, at least 64 MiB and at most 1 GiB."""

    transport: str = setting(
        "frames",
        "how readers on other hosts get bytes: frames (ZeroMQ, CURVE-encrypted on tcp) or nixl (one-sided "
        "UCX/RDMA reads, NOT authenticated or encrypted: only on a fabric that is the trust boundary; "
        "needs stager[nixl]; default %(default)s)",
        metavar="{frames,nixl}",
        parse=parse_transport,
    )
    """How readers on other hosts get bytes. ``frames``: Read requests over the ZeroMQ connection
    (encrypted with CURVE on tcp). ``nixl``: a reader holding a lease may also ask for the version's
    NIXL descriptors and read the segment one-sidedly over UCX (RDMA where there is, else tcp);
    those transfers are neither authenticated nor encrypted, so enable it only on a fabric that is
    itself the trust boundary (README.md, "Multi-node jobs"). Control stays on ZeroMQ + CURVE."""

    change_maps: str = setting(
        "bfloat16",
        "reader dtypes to record what changed in after each seal, comma-separated (e.g. bfloat16 for RL "
        "readers' delta reads, or bfloat16,float16), or none (default %(default)s)",
        metavar="DTYPES",
    )
    """Reader dtypes in which the daemon records, after each seal and on its own thread, which elements
    changed against the previous version (so readers move only those: ``load_into(since=N)``). A
    reader of another dtype reads in full. ``none``: no change maps. On by default: a map is made on
    one niced thread (about 1.5 ns of CPU per element compared, one pass per region of same-dtype
    tensors), never holds a segment the pool needs (a map not made before its base is dropped is
    dropped, and one that cannot be is not begun: counted as ``skipped``), and the trainer never
    waits for it (BENCHMARKS.md)."""

    change_maps_keep: int = setting(64, "versions whose change maps are kept, beyond --keep (default %(default)s)")
    """Versions whose change maps are kept (maps outlive the versions' data: a reader at an evicted step
    is still brought up to date from them)."""

    change_maps_memory: int | None = setting(
        None,
        "memory for change maps, apart from --memory-limit, e.g. 2GiB (default an eighth of --memory-limit)",
        parse=parse_size,
    )
    """Bytes the kept change maps (int32 indices: 4 bytes per changed element) may hold, the oldest
    going first; None: an eighth of ``memory_limit`` (a map of a step changing 2% of a bf16 model is 4%
    of the model's bf16 bytes)."""

    def __post_init__(self) -> None:
        self.endpoint = resolve(self.endpoint)
        if self.host_id is not None and not 0 < len(self.host_id) <= 200:
            raise ValueError("host_id must be 1 to 200 characters")
        if self.advertise is not None:
            resolve(self.advertise)  # the same form as an endpoint, checked before anything is bound
        if self.metrics is not None:
            parse_listen(self.metrics)  # a ValueError naming the flag, before anything is bound
        parse_transport(self.transport)
        if self.transport == "nixl" and not nixl_installed():
            raise ValueError(
                "--transport nixl needs NIXL in the daemon's environment: pip install 'stager[nixl]' "
                "(nixl-cu12==1.5.1), or serve with --transport frames"
            )
        if self.drain_timeout < 0:
            raise ValueError("drain_timeout must be >= 0")
        if self.memory_limit is None:
            self.memory_limit = int(psutil.virtual_memory().available * DEFAULT_MEMORY_FRACTION)
        if self.memory_limit <= 0:
            raise ValueError("memory_limit must be positive")
        if not 0 <= self.preallocate <= self.memory_limit:
            raise ValueError(
                f"preallocate must be between 0 and memory_limit ({self.memory_limit} bytes), not {self.preallocate}"
            )
        if self.read_cast_memory is None:
            self.read_cast_memory = min(max(self.memory_limit // 8, 64 << 20), 1 << 30)
        if self.read_cast_memory <= 0:
            raise ValueError("read_cast_memory must be positive")
        if self.keep < 1:
            raise ValueError("keep must be >= 1: the newest sealed version is always kept")
        self.change_map_dtypes()  # a ValueError naming the dtype, before anything is bound
        if self.change_maps_memory is None:
            self.change_maps_memory = self.memory_limit // 8
        if self.change_maps_keep < 1 or self.change_maps_memory < 0:
            raise ValueError("change_maps_keep must be >= 1 and change_maps_memory >= 0")
        if self.step_timeout <= 0 or self.peer_timeout <= 0:
            raise ValueError("step_timeout and peer_timeout must be positive")
        if self.auth_dir and self.insecure_no_auth:
            raise ValueError("--auth-dir and --insecure-no-auth contradict each other: pass one of them")
        if self.endpoint.startswith("tcp://") and not self.auth_dir:
            if not is_loopback(self.endpoint):
                raise ValueError(
                    f"{self.endpoint} is not a loopback address: binding it without authentication would let "
                    "anyone on the network read the model. Pass --auth-dir with CURVE keys made by "
                    "`stager keygen DIR` (deploy/README.md)"
                )
            if not self.insecure_no_auth:
                raise ValueError(
                    f"{self.endpoint} is a tcp endpoint: without authentication every user of this host could read "
                    "the model's snapshots and stage steps. Pass --auth-dir with CURVE keys made by "
                    "`stager keygen DIR` (clients set STAGER_AUTH_DIR), use the default ipc endpoint (owner-only), "
                    "or, for a throwaway setup, --insecure-no-auth"
                )
        if self.auth_dir:
            self.auth_dir = os.path.abspath(self.auth_dir)
            missing = [
                name
                for name in ("server.key_secret", "authorized")
                if not os.path.exists(os.path.join(self.auth_dir, name))
            ]
            if missing:
                raise ValueError(
                    f"--auth-dir {self.auth_dir} lacks {' and '.join(missing)}; create the keys with "
                    f"`stager keygen {self.auth_dir}`"
                )

    def change_map_dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtypes of ``change_maps`` (empty for none)."""
        text = self.change_maps.strip().lower()
        if text in ("", "none", "off"):
            return ()
        try:
            dtypes = tuple(dict.fromkeys(parse_dtype(name.strip()) for name in text.split(",")))
        except ValueError as exc:
            raise ValueError(f"change_maps: {exc}; write e.g. bfloat16 or bfloat16,float16, or none") from None
        if not all(d.is_floating_point for d in dtypes):
            raise ValueError("change_maps: name floating dtypes (what readers cast to), e.g. bfloat16")
        return dtypes

    @property
    def insecure(self) -> bool:
        """True when the daemon serves tcp without authentication (only with ``insecure_no_auth``)."""
        return self.endpoint.startswith("tcp://") and not self.auth_dir
