"""`stager export-hf --distributed`: one HF exporter per node of a multi-node job, one export.

The exporters (:class:`~stager.writers.node_writers.NodeWriters`: one per node, ranks of a gloo
group started by torchrun) plan the export exactly as a single exporter does (the same files,
the same tensors in each), and each writes the files whose bytes its node holds most of, reading
its node's regions through shared memory and fetching only the regions it lacks from the nodes
that hold them. The first exporter then writes the index, config.json and the manifest and
publishes the directory atomically: byte for byte what one exporter would have written.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from stager.writers.export_hf import ExportPlan, finish_export, plan_export, write_files
from stager.writers.node_writers import NodeWriters, gather

log = logging.getLogger("stager.writers.persist")


def assign_files(
    ep: ExportPlan, placement: dict[str, list[tuple[tuple, tuple, list[str]]]], writers: list[str]
) -> list[str]:
    """The writer node of each planned file: the one holding the most of its bytes (ties: the
    earlier writer). An HF tensor counts as its native source's regions, scaled to its size;
    one a whole-dict adapter made (no source known) counts for the first writer.

    >>> from types import SimpleNamespace as NS
    >>> ep = NS(tensors=[NS(source="w"), NS(source="v")], sizes=[8, 8], files=[[0], [1]])
    >>> assign_files(ep, {"w": [((0,), (3,), ["a"]), ((3,), (1,), ["b"])], "v": [((0,), (4,), ["b"])]}, ["a", "b"])
    ['a', 'b']
    """
    held: dict[str, dict[str, float]] = {}  # native fqn -> node -> share of its elements
    for fqn, regions in placement.items():
        total = sum(math.prod(shape) for _, shape, _ in regions) or 1
        shares = held[fqn] = {}
        for _, shape, holders in regions:
            for node in holders:
                shares[node] = shares.get(node, 0.0) + math.prod(shape) / total
    owners = []
    for indices in ep.files:
        score = dict.fromkeys(writers, 0.0)
        for i in indices:
            for node, share in held.get(ep.tensors[i].source, {writers[0]: 1.0}).items():
                if node in score:
                    score[node] += share * ep.sizes[i]
        owners.append(max(writers, key=lambda n: (score[n], -writers.index(n))))
    return owners


def export_hf_distributed(
    out_dir: str,
    *,
    endpoint: str | None = None,
    step: int | None = None,
    hf_assets: str | None = None,
    on_export: Callable[[dict], None] | None = None,
    **options: Any,
) -> str:
    """Export version ``step`` (default: the newest complete one) of the job, this process writing
    the files its node holds most of; a collective over the exporters. ``options``: adapter,
    hf_config, dtype, max_shard_size, prefix (see :func:`~stager.writers.export_hf.plan_export`).
    ``on_export`` gets what a single exporter reports (``exported``, ``step``, ``seconds``, and
    ``bytes`` and ``files``: this exporter's share) plus ``writer`` (its rank), ``writers``, ``node``
    and ``published`` (true on the one exporter that wrote the index and renamed the directory)."""
    started = time.monotonic()
    with NodeWriters("export-hf", out_dir, endpoint, step) as w:
        ep = w.together("planning the export", lambda: plan_export(w.snap, **options))
        owners = assign_files(ep, w.shared(w.snap.placement), w.nodes)
        mine = [f for f, node in enumerate(owners) if node == w.node]
        manifest: dict[str, dict] = {}
        weight_map = w.together("writing its files", lambda: write_files(w.snap, ep, mine, w.tmp, manifest))
        parts = gather([weight_map, manifest])
        merged_map = {k: v for part in parts for k, v in part[0].items()}
        merged_manifest = {k: v for part in parts for k, v in part[1].items()}
        path = w.publish(lambda: finish_export(w.tmp, ep, w.step, merged_map, merged_manifest, hf_assets))
    log.info(
        "exported step %d to %s (exporter %d of %d: %d of %d files)",
        w.step,
        path,
        w.rank,
        len(w.nodes),
        len(mine),
        len(owners),
    )
    if on_export is not None:
        on_export(
            {
                "exported": path,
                "step": w.step,
                "seconds": round(time.monotonic() - started, 3),
                "bytes": sum(ep.sizes[i] for f in mine for i in ep.files[f]),
                "files": len(mine),
                **w.identity(),
            }
        )
    return path
