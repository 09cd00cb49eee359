"""Prometheus metrics over HTTP, for the daemon (``stager serve --metrics``) and the writers
(``export-hf`` / ``write-dcp --follow --metrics``), through the maintained ``prometheus-client``
library (the optional extra ``stager[metrics]``).

Off by default. ``--metrics PORT`` binds 127.0.0.1; ``--metrics HOST:PORT`` (``[::1]:PORT`` for
IPv6, ``0.0.0.0:PORT`` for every address) binds where it is told. Each process serves its own
registry (never the library's global one), on a daemon thread of the library's WSGI server.

>>> parse_listen("9108"), parse_listen("0.0.0.0:9108"), parse_listen("[::1]:9108")
(('127.0.0.1', 9108), ('0.0.0.0', 9108), ('::1', 9108))
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

log = logging.getLogger("stager.metrics")

DEFAULT_HOST = "127.0.0.1"
WRITE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
_LISTEN = re.compile(r"(?:(\[[0-9a-fA-F:.]+\]|[^:\[\]]*):)?(\d+)")


def parse_listen(text: str) -> tuple[str, int]:
    """``"PORT"`` / ``":PORT"`` -> loopback; ``"HOST:PORT"``; ``"[V6]:PORT"``. ValueError otherwise."""
    match = _LISTEN.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"cannot read --metrics {text!r}; write PORT, HOST:PORT or [IPV6]:PORT (e.g. 9108)")
    host, port = match.group(1), int(match.group(2))
    if not 0 <= port <= 65535:
        raise ValueError(f"--metrics port {port} is not a port number (0-65535)")
    host = (host or DEFAULT_HOST).strip("[]")
    return host, port


def prometheus():
    """The prometheus_client module; ValueError telling how to install it when it is missing."""
    try:
        import prometheus_client
    except ImportError:
        raise ValueError("--metrics needs the prometheus-client package: pip install 'stager[metrics]'") from None
    return prometheus_client


class MetricsServer:
    """Serves ``registry`` at ``http://HOST:PORT/metrics`` until :meth:`close`."""

    def __init__(self, registry: Any, listen: str):
        prometheus_client = prometheus()
        host, port = parse_listen(listen)
        try:
            self._httpd, self._thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ValueError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; pass a free port "
                "(--metrics [HOST:]PORT)"
            ) from None
        self.host, self.port = host, self._httpd.server_address[1]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(5.0)
            self._httpd = None


def tree_bytes(path: str) -> int:
    """Bytes of the regular files under ``path`` (what a writer put on disk)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class ConsumerMetrics:
    """A writer's metrics (``consumer`` = ``export-hf`` or ``write-dcp``), fed one report per version
    by :func:`stager.writers.persist.for_each_version`'s ``on_report``:
    ``{"step", "path", "seconds"}`` for a written version, ``{"step", "error", "seconds"}`` for one
    that could not be written. prometheus-client's metrics are thread-safe: the HTTP thread reads them."""

    def __init__(self, consumer: str, listen: str):
        pc = prometheus()
        self.registry = pc.CollectorRegistry(auto_describe=True)
        labels = {"consumer": consumer}
        kw = {"labelnames": ["consumer"], "registry": self.registry}
        self.writes = pc.Counter("stager_consumer_writes", "Versions written", **kw).labels(**labels)
        self.failures = pc.Counter(
            "stager_consumer_write_failures", "Versions that could not be written (skipped)", **kw
        ).labels(**labels)
        self.bytes = pc.Counter("stager_consumer_bytes_written", "Bytes written to disk", **kw).labels(**labels)
        self.seconds = pc.Histogram(
            "stager_consumer_write_seconds",
            "Seconds to write one version (lease to rename)",
            buckets=WRITE_BUCKETS,
            **kw,
        ).labels(**labels)
        self.last_step = pc.Gauge("stager_consumer_last_step", "Step of the newest version written", **kw).labels(
            **labels
        )
        self.rate = pc.Gauge("stager_consumer_bytes_per_second", "Bytes per second of the newest write", **kw).labels(
            **labels
        )
        self.last_step.set(-1)
        self.server = MetricsServer(self.registry, listen)
        self.url = self.server.url

    def observe(self, report: dict) -> None:
        if report.get("error") is not None:
            self.failures.inc()
            return
        nbytes = tree_bytes(report["path"])
        seconds = max(float(report["seconds"]), 1e-9)
        self.writes.inc()
        self.bytes.inc(nbytes)
        self.seconds.observe(seconds)
        self.last_step.set(report["step"])
        self.rate.set(nbytes / seconds)

    def close(self) -> None:
        self.server.close()


class _NoMetrics:
    url = None

    def observe(self, report: dict) -> None:
        pass

    def close(self) -> None:
        pass


def consumer_metrics(consumer: str, listen: str | None) -> ConsumerMetrics | _NoMetrics:
    """The writer's metrics when ``listen`` is given (``--metrics``), else an object that records nothing."""
    if not listen:
        return _NoMetrics()
    metrics = ConsumerMetrics(consumer, listen)
    log.info("%s metrics at %s", consumer, metrics.url)
    return metrics
