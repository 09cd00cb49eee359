"""The daemon's Prometheus metrics: recorded on the loop thread, read by the HTTP thread.

The socket loop owns every count: :class:`Recorder` watches the requests it handles and the
messages it sends (no handler knows about metrics), and once per housekeeping tick
:meth:`Recorder.publish` builds an immutable snapshot (a tuple of metric tuples) from the
daemon's status and swaps it in with one assignment. The HTTP server's thread only ever reads
the current snapshot (:class:`SnapshotCollector`): it never touches daemon state, so no lock
is needed and a slow scraper cannot delay the loop.

Metric names and meanings: README.md, "Operations".
"""

from __future__ import annotations

import bisect
import math

from stager.protocol import (
    Acquire,
    AcquireReply,
    Message,
    NixlInfo,
    Ok,
    Put,
    Read,
    Sealed,
    Subscribe,
    SubscribeReply,
)

# stage-to-sealed latency: the first Begin of a step to its seal
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, math.inf)


class LatencyHistogram:
    """Cumulative-bucket histogram counts, as Prometheus exposes them (plain numbers, one thread)."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> tuple[tuple[str, int], ...]:
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), running))
        return tuple(out)


def _frame_bytes(frame) -> int:
    return frame.buffer.nbytes if hasattr(frame, "buffer") else memoryview(frame).nbytes


class Recorder:
    """What only the loop sees: per-transport byte counts, per-subscriber positions, latencies.
    Every method runs on the daemon's loop thread."""

    def __init__(self, state):
        self.state = state
        self.latency = LatencyHistogram()
        self.ingested_frames = 0  # tensor bytes that arrived as Put frames (ranks on another host)
        self.served_shm = 0  # bytes of versions same-host readers leased and read zero-copy (at lease end)
        self._shm_leases: dict[int, int] = {}  # lease -> bytes, while held by a same-host reader that maps it
        self.refused_draining = 0  # stages refused because the daemon is shutting down
        self.last_seq: dict[bytes, int] = {}  # reader identity -> seq of the version it last leased
        self._observed_seq = 0
        self.snapshot: tuple = ()

    def on_request(self, identity: bytes, msg: Message, reply: Message | None) -> None:
        if isinstance(msg, Put) and isinstance(reply, Ok):
            self.ingested_frames += sum(_frame_bytes(f) for f in msg.frames)
        elif isinstance(msg, Acquire) and isinstance(reply, AcquireReply):
            self.last_seq[identity] = reply.seq
            peer = self.state.peers.get(identity)
            held = self.state.leases.get(reply.lease)
            # an admin's lease reads nothing (stager status asks whether a step is readable)
            if peer is not None and peer.local and peer.role != "admin" and held is not None:
                self._shm_leases[reply.lease] = held[1].layout.nbytes
        elif isinstance(msg, (Read, NixlInfo)):  # this lease's bytes travel as frames or over NIXL
            self._shm_leases.pop(msg.lease, None)
        elif isinstance(msg, Subscribe) and isinstance(reply, SubscribeReply):
            self.last_seq.setdefault(identity, reply.seq)
        if self._shm_leases and len(self._shm_leases) != len(self.state.leases):
            self.settle_leases()

    def settle_leases(self) -> None:
        """Count the bytes of same-host leases that ended (released, or their reader died) as served."""
        for lease in [lease for lease in self._shm_leases if lease not in self.state.leases]:
            self.served_shm += self._shm_leases.pop(lease)

    def on_sent(self, identity: bytes, msg: Message) -> None:
        if isinstance(msg, Sealed):  # sent to each rank of the step as it seals: observe it once
            v = self.state.sealed.get(msg.step)
            if v is not None and v.seq > self._observed_seq and v.sealed_at is not None:
                self._observed_seq = v.seq
                self.latency.observe(max(0.0, v.sealed_at - v.started))

    def subscriber_lag(self) -> list[dict]:
        """Each subscriber's distance from the newest sealed version, in versions."""
        state = self.state
        for identity in [i for i in self.last_seq if i not in state.peers]:
            del self.last_seq[identity]
        out = []
        for identity in state.subscribers:
            peer = state.peers.get(identity)
            if peer is None:
                continue
            seq = self.last_seq.get(identity, state.seq)
            out.append(
                {"pid": peer.pid, "rank": peer.rank, "local": peer.local, "seq": seq, "lag": max(0, state.seq - seq)}
            )
        return sorted(out, key=lambda r: (r["pid"], r["rank"]))

    def publish(self, status: dict) -> None:
        """Build the snapshot the HTTP thread reads; one assignment swaps it in."""
        self.settle_leases()
        self.snapshot = build_snapshot(status, self)


def build_snapshot(status: dict, rec: Recorder) -> tuple:
    """``(kind, name, help, labelnames, samples)`` per metric, from a status dict and the recorder:
    ``kind`` is counter / gauge / histogram; samples are ``(labelvalues, value)`` (histogram:
    ``(labelvalues, buckets, sum)``). Pure: the same inputs give the same tuple."""
    c = status["counters"]
    mem = status["memory"]
    ingested = c.get("ingested_bytes", 0)
    sealed = [v for v in status["versions"] if v["state"] == "sealed"]
    return (
        ("counter", "stager_versions_sealed", "Versions sealed", (), (((), c.get("sealed", 0)),)),
        (
            "counter",
            "stager_versions_failed",
            "Steps that failed (a rank died, aborted, timed out, bad data)",
            (),
            (((), c.get("failed", 0)),),
        ),
        (
            "counter",
            "stager_versions_refused",
            "Stages refused, by reason",
            ("reason",),
            ((("memory_limit",), c.get("memory_refusals", 0)), (("shutting_down",), rec.refused_draining)),
        ),
        (
            "histogram",
            "stager_stage_to_sealed_seconds",
            "Seconds from a step's first begin to its seal",
            (),
            (((), rec.latency.buckets(), rec.latency.sum),),
        ),
        (
            "counter",
            "stager_ingested_bytes",
            "Tensor bytes staged into the daemon's memory, by transport",
            ("transport",),
            ((("shm",), max(0, ingested - rec.ingested_frames)), (("frames",), rec.ingested_frames)),
        ),
        (
            "counter",
            "stager_served_bytes",
            "Bytes served to readers, by transport (shm: size of each version "
            "leased and read zero-copy by a same-host reader, counted when the lease ends; frames: bytes sent to "
            "remote readers; nixl: this node's bytes of each version granted to a NIXL reader, counted at the grant: "
            "its one-sided reads are invisible here)",
            ("transport",),
            (
                (("shm",), rec.served_shm),
                (("frames",), c.get("read_bytes", 0)),
                (("nixl",), c.get("nixl_granted_bytes", 0)),
            ),
        ),
        (
            "gauge",
            "stager_memory_used_bytes",
            "Shared memory held by segments (sealed, in flight, pooled)",
            (),
            (((), mem["used"]),),
        ),
        ("gauge", "stager_memory_limit_bytes", "--memory-limit", (), (((), mem["limit"]),)),
        (
            "counter",
            "stager_evictions",
            "Sealed versions dropped to make room or past --keep",
            (),
            (((), c.get("evictions", 0)),),
        ),
        (
            "counter",
            "stager_backpressure_waits",
            "Steps that had to wait for memory",
            (),
            (((), c.get("backpressure_waits", 0)),),
        ),
        (
            "gauge",
            "stager_steps_waiting_for_memory",
            "Steps waiting for memory now",
            (),
            (((), len(status["retention"]["waiting_for_memory"])),),
        ),
        ("gauge", "stager_leases", "Leases held by readers", (), (((), status["leases"]),)),
        ("gauge", "stager_connected_ranks", "Trainer ranks connected", (), (((), len(status["ranks"])),)),
        ("gauge", "stager_connected_readers", "Readers connected", (), (((), status["readers"]),)),
        ("gauge", "stager_subscribers", "Readers subscribed to announcements", (), (((), status["subscribers"]),)),
        (
            "gauge",
            "stager_subscriber_lag_versions",
            "Versions sealed since a subscriber last leased one",
            ("pid", "rank"),
            tuple(((str(r["pid"]), str(r["rank"])), r["lag"]) for r in status.get("subscriber_lag", ())),
        ),
        (
            "counter",
            "stager_announcements_dropped",
            "Announcements a slow subscriber did not take",
            (),
            (((), c.get("announcements_dropped", 0)),),
        ),
        ("gauge", "stager_versions_held", "Sealed versions held", (), (((), len(sealed)),)),
        (
            "gauge",
            "stager_newest_sealed_step",
            "Step of the newest sealed version (-1: none)",
            (),
            (((), max((v["step"] for v in sealed), default=-1)),),
        ),
        (
            "gauge",
            "stager_draining",
            "1 while the daemon drains before exiting (SIGTERM)",
            (),
            (((), 1 if status.get("state") == "draining" else 0),),
        ),
        ("counter", "stager_request_errors", "Requests answered with an error", (), (((), c.get("errors", 0)),)),
        ("counter", "stager_requests", "Requests received", (), (((), c.get("requests", 0)),)),
        (
            "gauge",
            "stager_uptime_seconds",
            "Seconds since the daemon started",
            (),
            (((), status.get("uptime_s", 0.0)),),
        ),
    )


def families(snapshot: tuple):
    """prometheus-client metric families for a snapshot (called on the HTTP thread)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
    out = []
    for kind, name, doc, labels, samples in snapshot:
        family = kinds[kind](name, doc, labels=list(labels))
        for sample in samples:
            if kind == "histogram":
                values, buckets, total = sample
                family.add_metric(list(values), list(buckets), total)
            else:
                family.add_metric(list(sample[0]), sample[1])
        out.append(family)
    return out


class SnapshotCollector:
    """A prometheus-client collector over whatever snapshot ``source()`` returns now."""

    def __init__(self, source):
        self._source = source

    def collect(self):
        return families(self._source())


def serve_metrics(recorder: Recorder, listen: str):
    """Start the HTTP server for ``recorder``'s snapshots; returns the :class:`~stager.metrics.MetricsServer`."""
    from stager.metrics import MetricsServer, prometheus

    registry = prometheus().CollectorRegistry(auto_describe=False)  # ValueError naming the extra when missing
    registry.register(SnapshotCollector(lambda: recorder.snapshot))
    return MetricsServer(registry, listen)
