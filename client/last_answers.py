"""What each node of a multi-node job last answered ``stager status``, remembered on this host.

Daemons never talk to each other, and a node that dies or hangs answers nothing. So that
``stager status`` can still list the steps that were complete before a node went silent (that
node counting with what it said last, as a long-lived reader's ``latest()`` counts it), each
status of a job notes every node's answer in ``<runtime dir>/job-<digest>.json`` (the owner-only
directory of the ipc sockets), and reads it back for the nodes that do not answer. The file is
replaced atomically; one that does not parse is ignored, never an error; the files of jobs nobody
asked about for a week are removed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time

from stager.protocol import StagerError
from stager.protocol.endpoint import runtime_dir
from stager.protocol.job import MAX_STEPS, JobInfoReply

log = logging.getLogger("stager.client")
FORGET_AFTER_S = 7 * 24 * 3600

Seen = dict[str, tuple[JobInfoReply, float]]  # node -> (its answer, unix time it was given)


def _path(job: str) -> str:
    return os.path.join(runtime_dir(), f"job-{hashlib.sha256(job.encode()).hexdigest()[:16]}.json")


def _steps(value: object) -> list[int] | None:
    if isinstance(value, list) and len(value) <= MAX_STEPS and all(type(s) is int and s >= 0 for s in value):
        return value
    return None


def load(job: str, nodes: dict[str, str]) -> Seen:
    """The answers remembered for ``job``'s nodes (``nodes``: id -> endpoint, the membership now)."""
    try:
        with open(_path(job)) as f:
            data = json.load(f)
    except (OSError, ValueError, StagerError):
        return {}
    if not isinstance(data, dict) or data.get("job") != job or not isinstance(data.get("nodes"), dict):
        return {}
    out: Seen = {}
    for node, entry in data["nodes"].items():
        if node not in nodes or not isinstance(entry, dict) or not isinstance(entry.get("at"), (int, float)):
            continue
        steps = {k: _steps(entry.get(k)) for k in ("sealed", "staging", "failed")}
        if any(v is None for v in steps.values()):
            continue
        reply = JobInfoReply(job=job, node=node, endpoint=nodes[node], nodes={node: nodes[node]}, **steps)
        out[node] = (reply, float(entry["at"]))
    return out


def save(job: str, seen: Seen) -> None:
    """Remember ``seen`` for ``job``; a failure is logged, never raised (status prints regardless)."""
    tmp = None
    try:
        path = _path(job)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "job": job,
                    "nodes": {
                        n: {"sealed": r.sealed, "staging": r.staging, "failed": r.failed, "at": at}
                        for n, (r, at) in seen.items()
                    },
                },
                f,
            )
        os.replace(tmp, path)
        _forget_old(os.path.dirname(path))
    except (OSError, ValueError, StagerError) as exc:  # StagerError: the runtime directory is not ours
        log.debug("could not remember the job's answers: %s", exc)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _forget_old(directory: str) -> None:
    cutoff = time.time() - FORGET_AFTER_S
    for path in glob.glob(os.path.join(directory, "job-*.json")):
        try:
            if os.path.getmtime(path) < cutoff:
                os.unlink(path)
        except OSError:
            continue  # another status removed it first
