"""`stager write-dcp --distributed`: one DCP writer per node of a multi-node job, one checkpoint.

Each writer is one rank of a gloo process group (started as torchrun starts ranks: one per node,
``torchrun --nnodes=N --nproc-per-node=1 --no-python stager write-dcp --distributed ...``). The
writers agree on a step, lease it from their own node's daemon, and each writes only the regions
its node holds (a region several nodes hold, e.g. HSDP replicas, by one of them, spread by a
hash): no tensor byte crosses the network. DCP's own planner then merges the writers' plans into
one ``.metadata`` (validating that the chunks tile every tensor), so plain ``dcp.load`` reads the
checkpoint at any world size. The directory is written under a temporary name on the shared
filesystem, fsynced by every writer, and renamed by the first once all are done.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import zlib
from typing import Any

import msgpack
import torch

from stager.consumers.integrity import MANIFEST, checksum, write_manifest
from stager.consumers.persist import (
    fsync_path, fsync_tree, publish_step, remove_stale_temporaries, step_dirname, step_path,
)
from stager.protocol import ErrorCode, StagerError

log = logging.getLogger("stager.consumers.persist")


def assign_regions(placement: dict[str, list[tuple[tuple, tuple, list[str]]]], writers: list[str]
                   ) -> dict[str, list[tuple[str, tuple, tuple]]]:
    """``{writer node: [(fqn, offset, shape)]}``: each region written once, by a node that holds
    it (replicas spread over their holders by a hash of the region), so no byte crosses nodes.
    Pure and deterministic: every writer computes the same assignment.

    >>> assign_regions({"w": [((0,), (2,), ["a"]), ((2,), (2,), ["a", "b"])]}, ["a", "b"])["a"]
    [('w', (0,), (2,))]
    """
    out: dict[str, list] = {w: [] for w in writers}
    for fqn, regions in placement.items():
        for offset, shape, holders in regions:
            candidates = [h for h in holders if h in out]
            if not candidates:
                raise StagerError(ErrorCode.BAD_VALUE, f"{fqn} at {list(offset)} is held only by nodes "
                                                       f"{holders} and none of them runs a writer: run one "
                                                       "write-dcp --distributed per node of the job")
            pick = zlib.crc32(f"{fqn}@{list(offset)}".encode()) % len(candidates)
            out[candidates[pick]].append((fqn, tuple(offset), tuple(shape)))
    return out


def _planner(regions: dict[tuple[str, tuple], torch.Tensor], shapes: dict[str, torch.Size],
             objects: dict[str, Any]):
    """A DCP SavePlanner whose local plan is this writer's regions (plus, on the coordinator, the
    non-tensor values); everything global (merging, validation, metadata) is DCP's own."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    class RegionSavePlanner(DefaultSavePlanner):
        def create_local_plan(self) -> SavePlan:
            items = [WriteItem(index=MetadataIndex(fqn, torch.Size(offset)), type=WriteItemType.SHARD,
                               tensor_data=TensorWriteData(
                                   chunk=ChunkStorageMetadata(offsets=torch.Size(offset), sizes=t.shape),
                                   properties=TensorProperties.create_from_tensor(t), size=shapes[fqn]))
                     for (fqn, offset), t in regions.items()]
            if self.is_coordinator:
                items += [WriteItem(index=MetadataIndex(name), type=WriteItemType.BYTE_IO) for name in objects]
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
            if write_item.type == WriteItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save(objects[write_item.index.fqn], buf)  # DCP's own format for non-tensor values
                return buf
            return regions[(write_item.index.fqn, tuple(write_item.index.offset))]

    return RegionSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def _gather(value: Any) -> list[Any]:
    from stager.client.hook.job import all_gather_bytes

    return [msgpack.unpackb(b) for b in all_gather_bytes(msgpack.packb(value))]


def init_writers() -> None:
    """Join the writers' gloo process group from torchrun's environment (once)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise StagerError(ErrorCode.BAD_VALUE, "write-dcp --distributed runs one writer per node as ranks of a "
                                                   "process group: start it with torchrun (--nproc-per-node=1 "
                                                   "--no-python stager write-dcp --distributed ...)")
        dist.init_process_group("gloo")


def write_dcp_distributed(out_dir: str, *, endpoint: str | None = None, step: int | None = None) -> str:
    """Write version ``step`` (default: the newest complete one) of the job as one DCP checkpoint,
    this process writing its node's regions; a collective over the writers. Returns the path."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from stager.client import Subscriber

    init_writers()
    rank = dist.get_rank()
    with Subscriber(endpoint) as sub:
        job = sub.job
        node = job["node"] if job else ""
        nodes = _gather(node)
        if not all(nodes) or len(set(nodes)) != len(nodes) or len({j for j in _gather(job and job["job"])}) != 1:
            raise StagerError(ErrorCode.BAD_VALUE, f"the writers' daemons are nodes {nodes}: run one writer per node "
                                                   "of one multi-node job, each pointed at its node's daemon")
        chosen = None
        if rank == 0:  # the first writer picks the step; the others lease the same one
            with sub.at(step) if step is not None else sub.latest() as snap:
                chosen = snap.step
        chosen = _gather(chosen)[0]
        with sub.at(chosen) as snap:
            placement = snap.placement()
            mine = assign_regions(placement, nodes)[node]
            shapes = {fqn: torch.Size(snap.meta(fqn)[0]) for fqn in placement}
            regions = {(fqn, offset): snap.get(fqn, offsets=offset, sizes=shape) for fqn, offset, shape in mine}
            tmp_name = _gather(f".{step_dirname(chosen)}.partial-{os.getpid()}")[0]
            tmp, final = os.path.join(out_dir, tmp_name), step_path(out_dir, chosen)
            if rank == 0:
                os.makedirs(out_dir, exist_ok=True)
                remove_stale_temporaries(out_dir)
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            dist.barrier()
            try:
                planner = _planner(regions, shapes, dict(snap.objects) if rank == 0 else {})
                dcp.save({}, storage_writer=dcp.FileSystemWriter(tmp), planner=planner)
                chunks = [[fqn, list(offset), list(t.shape), checksum(t)] for (fqn, offset), t in regions.items()]
                all_chunks = [c for part in _gather(chunks) for c in part]
                fsync_tree(tmp)
            except BaseException:
                if rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            dist.barrier()  # every writer's files are durable
            if rank == 0:
                _publish(tmp, out_dir, chosen, all_chunks, {f: snap.meta(f) for f in placement})
            dist.barrier()
    log.info("wrote DCP checkpoint of step %d to %s (writer %d of %d)", chosen, final, rank, len(nodes))
    return final


def _publish(tmp: str, out_dir: str, step: int, chunks: list, meta: dict) -> None:
    """The manifest (per tensor: dtype, shape and each chunk's crc32), then the atomic rename."""
    entries: dict[str, dict] = {}
    for fqn, offset, shape, crc in sorted(chunks):
        full_shape, dtype = meta[fqn]
        e = entries.setdefault(fqn, {"dtype": str(dtype).removeprefix("torch."), "shape": list(full_shape),
                                     "chunks": []})
        e["chunks"].append({"offset": offset, "shape": shape, "crc32": crc})
    write_manifest(tmp, step, "dcp", entries)
    fsync_path(os.path.join(tmp, MANIFEST))
    publish_step(tmp, out_dir, step)
