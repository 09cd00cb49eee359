"""One writer per node of a multi-node job, together writing one checkpoint directory.

The writers (``write-dcp --distributed``, ``export-hf --distributed``) are the ranks of a gloo
process group, started as torchrun starts ranks (one per node: ``torchrun --nnodes=N
--nproc-per-node=1 --no-python stager ...``). :class:`NodeWriters` does what they share: check
that each runs on its own node of one job, agree on the step (the first writer picks the newest
complete one), lease it from each writer's own daemon, make one temporary directory on the
shared filesystem, and publish it once every writer's files are fsynced (renamed by the first
writer: the directory is complete or absent). Messages between writers are msgpack over gloo.
"""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from stager.protocol import ErrorCode, StagerError
from stager.writers.persist import fsync_tree, publish_step, remove_stale_temporaries, step_dirname

T = TypeVar("T")
WRITERS_TIMEOUT = datetime.timedelta(minutes=10)  # a writer that vanished fails the others' collectives


def init_writers(command: str) -> None:
    """Join the writers' gloo process group from torchrun's environment (once)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise StagerError(
                ErrorCode.BAD_VALUE,
                f"{command} --distributed runs one writer per node as ranks of a "
                f"process group: start it with torchrun (--nproc-per-node=1 "
                f"--no-python stager {command} --distributed ...)",
            )
        dist.init_process_group("gloo", timeout=WRITERS_TIMEOUT)


def gather(value: Any) -> list[Any]:
    """Every writer's ``value`` (msgpack-able), in rank order."""
    from stager.client.hook.job_join import all_gather_bytes

    return [msgpack.unpackb(b) for b in all_gather_bytes(msgpack.packb(value))]


class NodeWriters:
    """``with NodeWriters(command, out_dir, endpoint, step) as w:`` -> ``w.snap`` (the leased step,
    native view), ``w.node`` / ``w.nodes`` (this writer's node, every writer's by rank), ``w.tmp``
    (the shared temporary directory); ``w.together(what, fn)`` for each phase of local work; then
    ``w.publish(finish)``: fsync, wait for every writer, ``finish()`` on the first (index,
    manifest) and the atomic rename. A phase that fails on any writer fails on all of them, so
    none is left waiting in a collective."""

    def __init__(self, command: str, out_dir: str, endpoint: str | None, step: int | None):
        self.command = command
        self.out_dir = out_dir
        self.endpoint = endpoint
        self.requested = step
        self.nodes: list[str] = []
        self.snap = None

    def together(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` here; if it raised on any writer, raise on every writer, naming the first."""
        result, error = None, ""
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001  (reported to every writer, then raised here)
            error = f"{exc}"[:2000] or type(exc).__name__
            mine = exc
        errors = gather(error)
        failed = [(rank, e) for rank, e in enumerate(errors) if e]
        if failed:
            if error:
                raise mine
            rank, message = failed[0]
            where = f"writer {rank}" + (f" (node {self.nodes[rank]})" if rank < len(self.nodes) else "")
            raise StagerError(ErrorCode.UNAVAILABLE, f"{where} failed {what}: {message}")
        return result  # type: ignore[return-value]

    def __enter__(self) -> NodeWriters:
        import torch.distributed as dist

        from stager.client import Subscriber

        init_writers(self.command)
        self.rank = dist.get_rank()
        self.sub = Subscriber(self.endpoint)
        try:
            job = self.together("asking its daemon for the job", lambda: self.sub.job)
            self.node = job["node"] if job else ""
            self.nodes = gather(self.node)
            jobs = gather(job["job"] if job else "")
            if not all(self.nodes) or len(set(self.nodes)) != len(self.nodes) or len(set(jobs)) != 1:
                raise StagerError(
                    ErrorCode.BAD_VALUE,
                    f"the writers' daemons are nodes {self.nodes} of jobs {jobs}: "
                    "run one writer per node of one multi-node job, each pointed "
                    "at its node's daemon",
                )
            # the first writer picks the step and keeps its lease until every writer holds one
            first = self.together("leasing the step", self._lease_first)
            step = gather(first.step if first is not None else None)[0]
            self.snap = self.together(f"leasing step {step}", lambda: first or self.sub.at(step))
            self.step = step
            self.tmp = os.path.join(self.out_dir, gather(f".{step_dirname(step)}.partial-{os.getpid()}")[0])
            self.together("making the temporary directory", self._make_tmp)
        except BaseException:
            self._close()
            raise
        return self

    def shared(self, placement: Callable[[], dict]) -> dict[str, list[tuple[tuple, tuple, list[str]]]]:
        """The first writer's ``placement()`` (``{fqn: [(offset, shape, nodes)]}``), on every writer:
        a node may swap its part of the step for the whole one meanwhile (``serve --assemble-full``),
        and writers that planned from different placements would leave holes or overlap."""
        mine = self.together("reading the placement", lambda: placement() if self.rank == 0 else None)
        first = gather(mine)[0]
        return {fqn: [(tuple(o), tuple(s), list(n)) for o, s, n in regions] for fqn, regions in first.items()}

    def _lease_first(self):
        if self.rank != 0:
            return None
        return self.sub.at(self.requested) if self.requested is not None else self.sub.latest()

    def _make_tmp(self) -> None:
        if self.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            remove_stale_temporaries(self.out_dir)
            shutil.rmtree(self.tmp, ignore_errors=True)
            os.makedirs(self.tmp)

    def publish(self, finish: Callable[[], None]) -> str:
        """fsync this writer's files; once every writer's are durable, the first finishes and renames."""
        self.together("syncing its files", lambda: fsync_tree(self.tmp))

        def last() -> str | None:
            if self.rank != 0:
                return None
            finish()
            fsync_tree(self.tmp)
            return publish_step(self.tmp, self.out_dir, self.step)

        return gather(self.together("publishing", last))[0]

    def identity(self) -> dict:
        """What each writer's report says of it: ``writer`` (its rank), ``writers``, ``node``, and
        ``published`` (true on the first: it renames the directory, see :meth:`publish`)."""
        return {"writer": self.rank, "writers": len(self.nodes), "node": self.node, "published": self.rank == 0}

    def _close(self) -> None:
        if self.snap is not None:
            self.snap.release()
        self.sub.close()

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self.rank == 0 and getattr(self, "tmp", None):
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._close()
