"""`stager write-dcp --distributed`: one DCP writer per node of a multi-node job, one checkpoint.

Each writer is one rank of a gloo process group (started as torchrun starts ranks: one per node,
``torchrun --nnodes=N --nproc-per-node=1 --no-python stager write-dcp --distributed ...``). The
writers agree on a step, lease it from their own node's daemon, and each writes only the regions
its node holds (a region several nodes hold, e.g. HSDP replicas, by one of them, spread by a
hash): no tensor byte crosses the network. DCP's own planner then merges the writers' plans into
one ``.metadata`` (validating that the chunks tile every tensor), so plain ``dcp.load`` reads the
checkpoint at any world size.
"""

from __future__ import annotations

import io
import logging
import time
import zlib
from collections.abc import Callable
from typing import Any

import torch

from stager.formats.integrity import checksum, write_manifest
from stager.protocol import ErrorCode, StagerError
from stager.writers.node_writers import NodeWriters, gather
from stager.writers.persist import exact_storage
from stager.writers.write_dcp import data_files

log = logging.getLogger("stager.writers.persist")


def assign_regions(
    placement: dict[str, list[tuple[tuple, tuple, list[str]]]], writers: list[str]
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
                raise StagerError(
                    ErrorCode.BAD_VALUE,
                    f"{fqn} at {list(offset)} is held only by nodes "
                    f"{holders} and none of them runs a writer: run one "
                    "write-dcp --distributed per node of the job",
                )
            pick = zlib.crc32(f"{fqn}@{list(offset)}".encode()) % len(candidates)
            out[candidates[pick]].append((fqn, tuple(offset), tuple(shape)))
    return out


def _planner(regions: dict[tuple[str, tuple], torch.Tensor], shapes: dict[str, torch.Size], objects: dict[str, Any]):
    """A DCP SavePlanner whose local plan is this writer's regions (plus, on the coordinator, the
    non-tensor values); everything global (merging, validation, metadata) is DCP's own."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    class RegionSavePlanner(DefaultSavePlanner):
        def create_local_plan(self) -> SavePlan:
            items = [
                WriteItem(
                    index=MetadataIndex(fqn, torch.Size(offset)),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(offset), sizes=t.shape),
                        properties=TensorProperties.create_from_tensor(t),
                        size=shapes[fqn],
                    ),
                )
                for (fqn, offset), t in regions.items()
            ]
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


def write_dcp_distributed(
    out_dir: str,
    *,
    endpoint: str | None = None,
    step: int | None = None,
    on_write: Callable[[dict], None] | None = None,
) -> str:
    """Write version ``step`` (default: the newest complete one) of the job as one DCP checkpoint,
    this process writing its node's regions; a collective over the writers. Returns the path.
    ``on_write`` gets what a single writer reports (``written``, ``step``, ``seconds``, and ``bytes``
    and ``files``: this writer's share) plus ``writer`` (its rank), ``writers``, ``node`` and
    ``published`` (true on the one writer that renamed the directory)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import MetadataIndex

    started = time.monotonic()
    with NodeWriters("write-dcp", out_dir, endpoint, step) as w:
        snap = w.snap
        placement = w.shared(lambda: _view_placement(snap))
        shapes = {fqn: torch.Size(snap.meta(fqn)[0]) for fqn in placement}

        def read_regions() -> dict:
            mine = assign_regions(placement, w.nodes)[w.node]
            return {
                (fqn, offset): exact_storage(snap.get(fqn, offsets=offset, sizes=shape)) for fqn, offset, shape in mine
            }

        regions = w.together("reading its regions", read_regions)
        planner = _planner(regions, shapes, dict(snap.objects) if w.rank == 0 else {})
        metadata = dcp.save({}, storage_writer=dcp.FileSystemWriter(w.tmp), planner=planner)
        chunks = gather([[fqn, list(offset), list(t.shape), checksum(t)] for (fqn, offset), t in regions.items()])
        meta = {f: snap.meta(f) for f in placement}
        path = w.publish(lambda: _manifest(w.tmp, w.step, [c for part in chunks for c in part], meta, snap))
    log.info("wrote DCP checkpoint of step %d to %s (writer %d of %d)", w.step, path, w.rank, len(w.nodes))
    if on_write is not None:
        written = [MetadataIndex(fqn, offset) for fqn, offset in regions]
        written += [MetadataIndex(name) for name in (snap.objects if w.rank == 0 else ())]
        on_write(
            {
                "written": path,
                "step": w.step,
                "seconds": round(time.monotonic() - started, 3),
                "bytes": sum(t.numel() * t.element_size() for t in regions.values()),
                "files": data_files(metadata, written),
                **w.identity(),
            }
        )
    return path


def _view_placement(snap: Any) -> dict[str, list[tuple[tuple, tuple, list[str]]]]:
    """The regions of the tensors a DCP checkpoint holds (the native view: float8 scales are
    consumed by dequantization). A float8 tensor is dequantized whole, by one writer: it is one
    region held by every node holding part of it."""
    placement = snap.placement()
    out = {}
    for fqn in snap:
        regions = placement[fqn]
        if fqn in snap.quant:
            shape, _ = snap.meta(fqn)
            regions = [((0,) * len(shape), tuple(shape), sorted({h for _, _, hs in regions for h in hs}))]
        out[fqn] = regions
    return out


def _manifest(tmp: str, step: int, chunks: list, meta: dict, snap) -> None:
    """The manifest: per tensor its dtype, shape and each chunk's crc32 (no writer saw it whole)."""
    entries: dict[str, dict] = {}
    for fqn, offset, shape, crc in sorted(chunks):
        full_shape, dtype = meta[fqn]
        e = entries.setdefault(
            fqn, {"dtype": str(dtype).removeprefix("torch."), "shape": list(full_shape), "chunks": []}
        )
        e["chunks"].append({"offset": offset, "shape": shape, "crc32": crc})
    write_manifest(tmp, step, "dcp", entries, snap.objects, snap.model_info)
