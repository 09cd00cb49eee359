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

import os
import shutil
from typing import Any, Callable

import msgpack

from stager.consumers.persist import fsync_tree, publish_step, remove_stale_temporaries, step_dirname
from stager.protocol import ErrorCode, StagerError


def init_writers(command: str) -> None:
    """Join the writers' gloo process group from torchrun's environment (once)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise StagerError(ErrorCode.BAD_VALUE, f"{command} --distributed runs one writer per node as ranks of a "
                                                   f"process group: start it with torchrun (--nproc-per-node=1 "
                                                   f"--no-python stager {command} --distributed ...)")
        dist.init_process_group("gloo")


def gather(value: Any) -> list[Any]:
    """Every writer's ``value`` (msgpack-able), in rank order."""
    from stager.client.hook.job import all_gather_bytes

    return [msgpack.unpackb(b) for b in all_gather_bytes(msgpack.packb(value))]


class NodeWriters:
    """``with NodeWriters(command, out_dir, endpoint, step) as w:`` -> ``w.snap`` (the leased step,
    native view), ``w.node`` / ``w.nodes`` (this writer's node, every writer's by rank), ``w.tmp``
    (the shared temporary directory); then ``w.publish(finish)``: fsync, wait for every writer,
    ``finish()`` on the first (index, manifest) and the atomic rename."""

    def __init__(self, command: str, out_dir: str, endpoint: str | None, step: int | None):
        self.command, self.out_dir, self.endpoint, self.requested = command, out_dir, endpoint, step

    def __enter__(self) -> "NodeWriters":
        import torch.distributed as dist

        from stager.client import Subscriber

        init_writers(self.command)
        self.rank = dist.get_rank()
        self.sub = Subscriber(self.endpoint)
        try:
            job = self.sub.job
            self.node = job["node"] if job else ""
            self.nodes = gather(self.node)
            jobs = gather(job["job"] if job else "")
            if not all(self.nodes) or len(set(self.nodes)) != len(self.nodes) or len(set(jobs)) != 1:
                raise StagerError(ErrorCode.BAD_VALUE, f"the writers' daemons are nodes {self.nodes} of jobs {jobs}: "
                                                       "run one writer per node of one multi-node job, each pointed "
                                                       "at its node's daemon")
            chosen = None
            if self.rank == 0:  # the first writer picks the step; the others lease the same one
                with self.sub.at(self.requested) if self.requested is not None else self.sub.latest() as snap:
                    chosen = snap.step
            self.step = gather(chosen)[0]
            self.snap = self.sub.at(self.step)
            self.tmp = os.path.join(self.out_dir, gather(f".{step_dirname(self.step)}.partial-{os.getpid()}")[0])
            if self.rank == 0:
                os.makedirs(self.out_dir, exist_ok=True)
                remove_stale_temporaries(self.out_dir)
                shutil.rmtree(self.tmp, ignore_errors=True)
                os.makedirs(self.tmp)
            dist.barrier()
        except BaseException:
            self.sub.close()
            raise
        return self

    def publish(self, finish: Callable[[], None]) -> str:
        import torch.distributed as dist

        fsync_tree(self.tmp)
        dist.barrier()  # every writer's files are durable
        path = None
        if self.rank == 0:
            finish()
            fsync_tree(self.tmp)
            path = publish_step(self.tmp, self.out_dir, self.step)
        return gather(path)[0]

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self.rank == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.snap.release()
        self.sub.close()
