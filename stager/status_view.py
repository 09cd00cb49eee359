"""`stager status`: the daemon's status for people (a compact table, ``--watch`` to refresh) and
for scripts (``--json``: one object, the stable schema below, documented in README.md).

:data:`STATUS_SCHEMA` is the contract: every key listed is present with that type (versions,
ranks and readers may be empty). Keys are only ever added, never renamed or removed; scripts
should ignore keys they do not know.
"""

from __future__ import annotations

import json
import sys
import time

# key -> (type, meaning); nested keys as "a.b". Checked against a live daemon by tests/test_status_view.py.
STATUS_SCHEMA: dict[str, tuple[type | tuple[type, ...], str]] = {
    "pid": (int, "the daemon's process id"),
    "session": (str, "changes at every daemon start"),
    "state": (str, "serving, or draining after SIGTERM (new stages are refused)"),
    "endpoint": (str, "the endpoint the daemon serves"),
    "uptime_s": ((int, float), "seconds since the daemon started"),
    "epoch": (int, "the job timeline: a new job (or a restarted one) starts a new epoch"),
    "versions": (
        list,
        "sealed, staging and failed steps: step, state, phase, bytes, tensors, objects, partial, "
        "leases, age_s (seconds since sealed / since the first begin), reason (failed)",
    ),
    "ranks": (dict, "local rank (string) -> {pid, local}: trainer ranks connected"),
    "local_world_size": ((int, type(None)), "ranks the node's job has (null before the first rank connects)"),
    "readers": (int, "reader connections"),
    "subscribers": (int, "readers subscribed to announcements"),
    "subscriber_lag": (
        list,
        "per subscriber: pid, rank, local, seq (of the version it last leased), lag (versions sealed since)",
    ),
    "leases": (int, "leases held"),
    "seq": (int, "versions sealed by this daemon"),
    "keep": (int, "--keep"),
    "memory.used": (int, "bytes of shared memory held (sealed, in flight, pooled)"),
    "memory.limit": (int, "--memory-limit in bytes"),
    "memory.pooled": (int, "bytes of free segments kept for the next steps"),
    "memory.draining": (int, "bytes of segments waiting for remote readers' frames to go out"),
    "memory.preallocated": (
        int,
        "bytes allocated ahead (--preallocate) that no segment has taken yet (0 while still being allocated)",
    ),
    "retention.policy": (str, "the retention policy, in words"),
    "retention.leased_steps": (list, "steps held by a lease"),
    "retention.waiting_for_memory": (list, "steps waiting for memory (back-pressure)"),
    "reads.bytes_in_flight": (int, "bytes of replies queued for remote readers"),
    "reads.deferred": (int, "remote reads held back (back-pressure)"),
    "reads.cast_buffers": (
        int,
        "bytes of reply buffers for remote reads the daemon casts to the reader's dtype "
        "(in flight, or kept up to 5 s for the next read), within --read-cast-memory",
    ),
    "counters": (
        dict,
        "totals since start: sealed, failed, ingested_bytes, read_bytes, requests, errors, "
        "announcements_dropped, memory_refusals, evictions, backpressure_waits, read_cast_bytes, "
        "read_cast_waits",
    ),
    "cpu_seconds": ((int, float), "CPU time the daemon used"),
    "node": (str, "this node's id (--host-id / $STAGER_HOST_ID, else the machine's)"),
    "job": (
        (dict, type(None)),
        "the multi-node job this node joined: job, node, advertise, nodes (id -> endpoint), "
        "ranks (id -> global ranks), world_size; null: none",
    ),
}
OPTIONAL = {
    "insecure": "true when tcp is served without authentication",
    "metrics": "the metrics URL (--metrics)",
    "job_nodes": "`stager status` only, in a multi-node job: every node's steps, asked of each at once: "
    "complete (steps every node sealed; a node that does not answer counts with what it last "
    "answered a status on this host), readable (those of them a reader can lease now: every "
    "region held by a node that answers), nodes (id -> endpoint, sealed, staging, failed; or "
    "down: why, with sealed, failed and last_seen_s as it last answered, when known)",
}


def lookup(status: dict, dotted: str):
    value = status
    for part in dotted.split("."):
        value = value[part]
    return value


def schema_errors(status: dict) -> list[str]:
    """What in ``status`` breaks :data:`STATUS_SCHEMA` (empty: it conforms)."""
    errors = []
    for key, (kind, _) in STATUS_SCHEMA.items():
        try:
            value = lookup(status, key)
        except (KeyError, TypeError):
            errors.append(f"{key}: missing")
            continue
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            errors.append(f"{key}: {type(value).__name__}, not {getattr(kind, '__name__', kind)}")
    return errors


def human_bytes(n: float) -> str:
    """>>> human_bytes(0), human_bytes(1536), human_bytes(13.2 * 2**30)
    ('0 B', '1.5 KiB', '13.2 GiB')"""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_age(seconds: float | None) -> str:
    """>>> human_age(0.4), human_age(12), human_age(192), human_age(7500), human_age(None)
    ('0.4s', '12s', '3m12s', '2h05m', '-')"""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def bar(used: int, limit: int, width: int = 20) -> str:
    """>>> bar(1, 4, 8)
    '[##------]'"""
    filled = 0 if limit <= 0 else min(width, round(width * used / limit))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def render(status: dict) -> str:
    """The human table (pure: the same status gives the same text)."""
    mem, c = status["memory"], status["counters"]
    lines = [
        f"daemon pid {status['pid']}  {status.get('state', 'serving')}  up {human_age(status.get('uptime_s'))}  "
        f"{status.get('endpoint', '')}".rstrip()
    ]
    if status.get("insecure"):
        lines.append("  INSECURE: this daemon serves tcp without authentication (--insecure-no-auth)")
    pct = 100 * mem["used"] / mem["limit"] if mem["limit"] else 0
    lines.append(
        f"memory {bar(mem['used'], mem['limit'])} {pct:3.0f}%  {human_bytes(mem['used'])} / "
        f"{human_bytes(mem['limit'])}  pooled {human_bytes(mem.get('pooled', 0))}  keep {status['keep']}"
    )
    lines.append(
        f"ranks {len(status['ranks'])}/{status['local_world_size'] or 0}  readers {status['readers']} "
        f"({status['subscribers']} subscribed)  leases {status['leases']}"
    )
    retention = status["retention"]
    if retention["waiting_for_memory"]:
        lines.append(f"  waiting for memory: steps {retention['waiting_for_memory']}")
    if status["versions"]:
        lines.append(f"  {'STEP':>8}  {'STATE':<8} {'AGE':>7} {'SIZE':>10} {'TENSORS':>7} {'LEASES':>6}")
    for v in status["versions"]:
        if v["state"] == "failed":
            lines.append(f"  {v['step']:>8}  failed   {v.get('reason', '')}")
            continue
        flags = "  partial" if v.get("partial") else ""
        lines.append(
            f"  {v['step']:>8}  {v['state']:<8} {human_age(v.get('age_s')):>7} {human_bytes(v['bytes']):>10} "
            f"{v['tensors']:>7} {v['leases']:>6}{flags}"
        )
    lag = status.get("subscriber_lag") or []
    if lag:
        lines.append(f"  {'READER PID':>10} {'RANK':>5} {'LAG':>4}")
        lines.extend(
            f"  {r['pid']:>10} {r['rank']:>5} {r['lag']:>4}{'' if r.get('local', True) else '  remote'}" for r in lag
        )
    job = status.get("job_nodes")
    if job:
        lines.append(
            f"job {job['job']}  node {job['node']}  complete steps {_steps(job['complete'])}"
            + (f"  readable now {_steps(job['readable'])}" if job.get("readable") != job["complete"] else "")
        )
        lines.append(f"  {'NODE':<16} {'SEALED':<18} {'STAGING':<10} {'FAILED':<10} ENDPOINT")
        for node, n in job["nodes"].items():
            if "down" in n and "last_seen_s" in n:  # what it said last, before it went silent
                lines.append(
                    f"  {node:<16} {_steps(n['sealed']):<18} {'DOWN':<10} {_steps(n['failed']):<10} "
                    f"{n['endpoint']}  (last seen {human_age(n['last_seen_s'])} ago: {n['down'][:60]})"
                )
            elif "down" in n:
                lines.append(f"  {node:<16} DOWN: {n['down'][:60]}  {n['endpoint']}")
            else:
                lines.append(
                    f"  {node:<16} {_steps(n['sealed']):<18} {_steps(n['staging']):<10} "
                    f"{_steps(n['failed']):<10} {n['endpoint']}"
                )
    lines.append(
        f"sealed {c.get('sealed', 0)}  failed {c.get('failed', 0)}  refused {c.get('memory_refusals', 0)}  "
        f"evicted {c.get('evictions', 0)}  waited {c.get('backpressure_waits', 0)}  "
        f"ingested {human_bytes(c.get('ingested_bytes', 0))}"
    )
    return "\n".join(lines)


def _steps(steps: list[int]) -> str:
    return ",".join(map(str, steps[-4:])) + (" ..." if len(steps) > 4 else "") if steps else "-"


def run(args) -> int:
    """``stager status [--json] [--watch [SECONDS]]``: exit 1 when the daemon does not answer (once);
    ``--watch`` refreshes until ^C and keeps trying while the daemon is away."""
    from stager.client.admin import daemon_status, job_status
    from stager.protocol import StagerError

    watch = getattr(args, "watch", None)
    clear = watch is not None and not args.json and sys.stdout.isatty()
    try:
        while True:
            try:
                status = daemon_status(args.endpoint, args.timeout)
                if status.get("job"):
                    status["job_nodes"] = job_status(args.endpoint, args.timeout)
            except StagerError as exc:
                print(f"stager status: {exc.message}", file=sys.stderr, flush=True)
                if watch is None:
                    return 1
            else:
                text = json.dumps(status) if args.json else render(status)
                print(("\x1b[H\x1b[2J" if clear else "") + text, flush=True)
            if watch is None:
                return 0
            time.sleep(watch)  # the refresh interval a person asked for
    except KeyboardInterrupt:
        return 0
