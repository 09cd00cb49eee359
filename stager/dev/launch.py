"""Run a daemon and a multi-process gloo job from Python: shared by the demo, tests and benchmarks."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

# once a rank failed, the others get this long to report: they may wait for it in a collective (gloo's own timeout
# is 30 minutes), and what the failed one said is the answer, not a timeout
FAILED_RANK_GRACE_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    """``stager serve`` in a subprocess on a private ipc endpoint; ``with DaemonProcess() as d: d.endpoint``."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        args: tuple[str, ...] = (),
        startup_timeout: float = 60.0,
        env: dict | None = None,
    ):
        self._tmp = None
        self.env = env
        if endpoint is None:
            self._tmp = tempfile.mkdtemp(prefix="stager-")
            endpoint = f"ipc://{self._tmp}/stager.sock"
        self.endpoint = endpoint
        self.args = args
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self) -> DaemonProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stager.cli", "serve", "--json", "--endpoint", self.endpoint, *self.args],
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            env={**os.environ, **self.env} if self.env else None,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], self.startup_timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"stager serve was not ready within {self.startup_timeout:.0f}s")
        self.info = json.loads(line)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SimulatedCluster:
    """Several daemons on this host, each its own node (``STAGER_HOST_ID=node-<i>``, its own ipc
    endpoint and shared memory), as a multi-node job sees them; ``run_ranks(..., nodes=c.nodes)``
    starts ranks as torchrun does on each node.

    >>> with SimulatedCluster(2) as c:  # doctest: +SKIP
    ...     run_ranks(train, 4, nodes=c.nodes)
    """

    def __init__(self, n: int, *, args: tuple[str, ...] = (), auth_dir: str | None = None):
        # with auth_dir (`stager keygen` keys): tcp endpoints with CURVE, as across real nodes
        self.auth_dir = auth_dir
        extra = ("--auth-dir", auth_dir) if auth_dir else ()
        self.daemons = [
            DaemonProcess(
                f"tcp://127.0.0.1:{free_port()}" if auth_dir else None,
                args=args + extra,
                env={"STAGER_HOST_ID": f"node-{i}"},
            )
            for i in range(n)
        ]

    @property
    def nodes(self) -> list[dict]:
        """Per node, the environment its ranks get: its host id and its daemon's endpoint."""
        keys = {"STAGER_AUTH_DIR": self.auth_dir} if self.auth_dir else {}
        return [
            {"STAGER_HOST_ID": d.env["STAGER_HOST_ID"], "STAGER_ENDPOINT": d.endpoint, **keys} for d in self.daemons
        ]

    @property
    def endpoints(self) -> list[str]:
        return [d.endpoint for d in self.daemons]

    def __enter__(self) -> SimulatedCluster:
        try:
            for d in self.daemons:
                d.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()

    def __exit__(self, *exc) -> None:
        self.stop()


def _rank_env(rank: int, world_size: int, env: dict, nodes: list[dict] | None) -> dict:
    """torchrun's variables for ``rank``; with ``nodes``, the ranks are split evenly over them in order."""
    if not nodes:
        return {**env, "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(env.get("LOCAL_WORLD_SIZE", world_size))}
    per_node = world_size // len(nodes)
    if per_node * len(nodes) != world_size:
        raise ValueError(f"{world_size} ranks do not split evenly over {len(nodes)} nodes")
    return {
        **env,
        **{k: str(v) for k, v in nodes[rank // per_node].items()},
        "LOCAL_RANK": str(rank % per_node),
        "LOCAL_WORLD_SIZE": str(per_node),
        "GROUP_RANK": str(rank // per_node),
    }


def _rank_main(target, rank, world_size, port, args, queue, env) -> None:
    os.environ.update(env)
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world_size)}
    )
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = target(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    target: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 240.0,
    env: dict | None = None,
    nodes: list[dict] | None = None,
) -> list[Any]:
    """Run ``target(rank, world_size, *args)`` in ``world_size`` spawned gloo processes; return the results by rank.

    ``target`` must be importable (a module-level function). A rank that raises fails the whole call.
    ``nodes``: per simulated node, the environment of its ranks (:attr:`SimulatedCluster.nodes`);
    ranks are split evenly over them, with LOCAL_RANK / LOCAL_WORLD_SIZE as torchrun sets them.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    env = {k: str(v) for k, v in (env or {}).items()}
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(target, r, world_size, port, args, queue, _rank_env(r, world_size, env, nodes)),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    failed: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                silent = sorted(set(range(world_size)) - set(results) - failed)
                if errors:  # the ones that failed say why; the others wait for them in a collective
                    raise RuntimeError("\n".join(errors) + f"\nranks {silent} did not report (waiting for those)")
                raise TimeoutError(f"ranks {silent} did not finish in {timeout}s")
            try:
                rank, state, value = queue.get(timeout=min(left, 1.0))
            except Exception:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and len(results) + len(errors) < world_size:
                    raise RuntimeError(f"a rank exited with code {dead[0].exitcode} without reporting") from None
                continue
            if state == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                failed.add(rank)
                deadline = min(deadline, time.monotonic() + FAILED_RANK_GRACE_S)  # the rest may wait for it forever
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
