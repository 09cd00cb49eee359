"""Prometheus metrics: the daemon's (`stager serve --metrics`) and the writers' (`--follow --metrics`),
scraped over HTTP and parsed with prometheus-client's own parser."""

import json
import math
import os
import socket
import subprocess
import sys
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families  # the test extra has stager[metrics]

from helpers import wait_until
from stager.client import StagingClient, Subscriber
from stager.client.connection import Connection
from stager.daemon.recorder import LatencyHistogram, build_snapshot, families
from stager.metrics import ConsumerMetrics, parse_listen
from stager.protocol import Acquire, Release


def scrape(url: str) -> dict:
    """{(sample name, frozenset(labels)): value} of one scrape, parsed by the library's parser."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset((k, str(v)) for k, v in labels.items()))]


def scrape_until(url: str, predicate, timeout: float = 10.0) -> dict:
    """Scrape until ``predicate(samples)`` holds (the loop publishes once per tick); the samples then."""

    def attempt():
        samples = scrape(url)
        try:
            return samples if predicate(samples) else None
        except KeyError:
            return None

    return wait_until(attempt, timeout=timeout)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("9108", ("127.0.0.1", 9108)),  # loopback unless told otherwise
        (":9108", ("127.0.0.1", 9108)),
        ("0", ("127.0.0.1", 0)),
        ("0.0.0.0:9108", ("0.0.0.0", 9108)),
        ("node17:9108", ("node17", 9108)),
        ("[::1]:9108", ("::1", 9108)),
        ("[fd00::17]:80", ("fd00::17", 80)),
    ],
)
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", "http", "9108:", "::1:9108", "host:99999", "host:port", "[::1]"])
def test_parse_listen_refuses(text):
    with pytest.raises(ValueError, match="--metrics"):
        parse_listen(text)


@pytest.mark.parametrize(
    "observed, expected",
    [
        ([], {"0.005": 0, "+Inf": 0}),
        ([0.001], {"0.005": 1, "0.1": 1, "+Inf": 1}),
        ([0.005], {"0.005": 1}),  # a bound is inclusive (le)
        ([0.2, 3.0, 500.0], {"0.1": 0, "0.25": 1, "5.0": 2, "120.0": 2, "+Inf": 3}),
    ],
)
def test_latency_histogram_buckets_are_cumulative(observed, expected):
    h = LatencyHistogram()
    for s in observed:
        h.observe(s)
    buckets = dict(h.buckets())
    for bound, count in expected.items():
        assert buckets[bound] == count
    assert math.isclose(h.sum, sum(observed))


def _status(**over):
    status = {
        "counters": {
            "sealed": 3,
            "failed": 1,
            "memory_refusals": 2,
            "ingested_bytes": 1000,
            "read_bytes": 7,
            "nixl_granted_bytes": 8,
            "evictions": 4,
            "backpressure_waits": 5,
            "errors": 6,
            "requests": 9,
            "announcements_dropped": 0,
        },
        "memory": {"used": 300, "limit": 1000},
        "versions": [{"step": 4, "state": "sealed"}, {"step": 6, "state": "sealed"}, {"step": 7, "state": "staging"}],
        "retention": {"waiting_for_memory": [7]},
        "leases": 2,
        "ranks": {"0": {}, "1": {}},
        "readers": 3,
        "subscribers": 1,
        "subscriber_lag": [{"pid": 11, "rank": 0, "lag": 2}],
        "state": "serving",
        "uptime_s": 1.5,
    }
    status.update(over)
    return status


class _Rec:  # what build_snapshot reads of a Recorder
    latency = LatencyHistogram()
    ingested_frames, served_shm, refused_draining = 400, 50, 1


@pytest.mark.parametrize(
    "name, labels, expected",
    [
        ("stager_versions_sealed", {}, 3),
        ("stager_versions_failed", {}, 1),
        ("stager_versions_refused", {"reason": "memory_limit"}, 2),
        ("stager_versions_refused", {"reason": "shutting_down"}, 1),
        ("stager_ingested_bytes", {"transport": "shm"}, 600),
        ("stager_ingested_bytes", {"transport": "frames"}, 400),
        ("stager_served_bytes", {"transport": "shm"}, 50),
        ("stager_served_bytes", {"transport": "frames"}, 7),
        ("stager_served_bytes", {"transport": "nixl"}, 8),
        ("stager_memory_used_bytes", {}, 300),
        ("stager_memory_limit_bytes", {}, 1000),
        ("stager_evictions", {}, 4),
        ("stager_backpressure_waits", {}, 5),
        ("stager_steps_waiting_for_memory", {}, 1),
        ("stager_leases", {}, 2),
        ("stager_connected_ranks", {}, 2),
        ("stager_connected_readers", {}, 3),
        ("stager_subscriber_lag_versions", {"pid": "11", "rank": "0"}, 2),
        ("stager_newest_sealed_step", {}, 6),
        ("stager_versions_held", {}, 2),
        ("stager_draining", {}, 0),
    ],
)
def test_snapshot_from_status(name, labels, expected):
    snapshot = build_snapshot(_status(), _Rec())
    by_name = {m[1]: m for m in snapshot}
    kind, _, labelnames, samples = by_name[name][0], by_name[name][1], by_name[name][3], by_name[name][4]
    assert kind in ("counter", "gauge")
    got = {tuple(lv): v for lv, v in samples}
    assert got[tuple(labels[n] for n in labelnames)] == expected
    assert families(snapshot)  # every tuple makes a valid family


def test_daemon_metrics_scraped(make_daemon):
    """Stage over shm and frames, read over shm and frames, evict, lag: every figure as scraped."""
    d = make_daemon(metrics="0", keep=1)
    url = d.daemon.metrics_url
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")  # loopback by default
    w = torch.arange(4096, dtype=torch.float32)  # 16 KiB
    nbytes = w.numel() * w.element_size()
    with (
        StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c,
        Subscriber(d.endpoint) as sub,
        Subscriber(d.endpoint, remote=True) as far,
    ):
        c.stage({"w": w}, step=1).wait(10)
        with sub.wait_for_newer(None, timeout=10) as snap:  # subscribes, leases step 1 (shm)
            assert snap.step == 1
            samples = scrape_until(url, lambda s: value(s, "stager_leases") == 1)
            assert value(samples, "stager_subscriber_lag_versions", pid=os.getpid(), rank=0) == 0
        with far.latest() as snap:
            assert torch.equal(snap["w"], w)  # remote=True: bytes as frames
        admin = Connection(d.endpoint, role="admin")  # stager status asking whether step 1 is readable: not served
        admin.request(Release(lease=admin.request(Acquire(step=1), 5.0).lease), 5.0)
        admin.close()
        c.stage({"w": w + 1}, step=2).wait(10)
        c.stage({"w": w + 2}, step=3).wait(10)
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, transport="frames") as c:
        c.stage({"w": w + 3}, step=4).wait(10)

        samples = scrape_until(url, lambda s: value(s, "stager_versions_sealed_total") == 4)
    assert value(samples, "stager_stage_to_sealed_seconds_count") == 4
    assert value(samples, "stager_stage_to_sealed_seconds_bucket", le="+Inf") == 4
    assert value(samples, "stager_stage_to_sealed_seconds_sum") > 0
    assert value(samples, "stager_ingested_bytes_total", transport="shm") == 3 * nbytes
    assert value(samples, "stager_ingested_bytes_total", transport="frames") == nbytes
    assert value(samples, "stager_served_bytes_total", transport="shm") == nbytes
    assert value(samples, "stager_served_bytes_total", transport="frames") == nbytes
    assert value(samples, "stager_evictions_total") == 3  # keep=1: steps 1, 2, 3 went
    assert value(samples, "stager_versions_held") == 1
    assert value(samples, "stager_newest_sealed_step") == 4
    assert value(samples, "stager_memory_limit_bytes") == 64 << 20
    assert 0 < value(samples, "stager_memory_used_bytes") <= 64 << 20
    assert value(samples, "stager_versions_failed_total") == 0
    status = d.status()
    assert status["metrics"] == url and status["counters"]["evictions"] == 3


def test_subscriber_lag_counts_versions_not_read(make_daemon):
    d = make_daemon(metrics="0", keep=4)
    w = torch.ones(256)
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c, Subscriber(d.endpoint) as sub:
        c.stage({"w": w}, step=1).wait(10)
        sub.latest().release()
        sub.wait_for_newer(None, timeout=10).release()  # subscribed; last leased: step 1
        for step in (2, 3, 4):
            c.stage({"w": w}, step=step).wait(10)
        lag = wait_until(lambda: d.status()["subscriber_lag"])
        assert lag == [{"pid": os.getpid(), "rank": 0, "local": True, "seq": 1, "lag": 3}]
        samples = scrape_until(
            d.daemon.metrics_url, lambda s: value(s, "stager_subscriber_lag_versions", pid=os.getpid(), rank=0) == 3
        )
        assert value(samples, "stager_subscribers") == 1
        sub.latest().release()
        assert wait_until(lambda: d.status()["subscriber_lag"])[0]["lag"] == 0


def test_backpressure_and_refusal_counted(make_daemon):
    w = torch.ones(1 << 18)  # 1 MiB
    d = make_daemon(metrics="0", keep=1, memory_limit=int(2.5 * (1 << 20)))
    with (
        StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1, backpressure_timeout=0.3) as c,
        Subscriber(d.endpoint) as sub,
    ):
        c.stage({"w": w}, step=1).wait(10)
        with sub.latest():  # step 1 leased: it stays, so step 3 finds no room
            c.stage({"w": w}, step=2).wait(10)
            handle = c.stage({"w": w}, step=3)
            with pytest.raises(Exception, match="memory"):
                handle.wait(10)
    samples = scrape_until(d.daemon.metrics_url, lambda s: value(s, "stager_versions_failed_total") == 1)
    assert value(samples, "stager_versions_refused_total", reason="memory_limit") == 1
    assert value(samples, "stager_backpressure_waits_total") == 1
    assert value(samples, "stager_versions_failed_total") == 1


def test_metrics_off_by_default(make_daemon):
    d = make_daemon()
    assert d.daemon.metrics is None and d.daemon.metrics_url is None
    assert "metrics" not in d.status()


def test_metrics_port_in_use_is_a_clear_error(make_daemon, short_dir):
    from stager.daemon import Daemon, DaemonConfig

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            Daemon(DaemonConfig(endpoint=f"ipc://{short_dir}/m.sock", memory_limit=1 << 20, metrics=str(port)))
    assert not os.path.exists(f"{short_dir}/m.sock")  # nothing left bound
    make_daemon()  # and the lock is free again: a daemon starts on the next endpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_consumer_metrics_in_process(make_daemon, tmp_path):
    from stager.writers.write_dcp import write_dcp

    d = make_daemon(keep=4)
    metrics = ConsumerMetrics("write-dcp", "127.0.0.1:0")
    try:
        with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
            c.stage({"w": torch.ones(1024), "train": {"step": 1}}, step=1).wait(10)
            c.stage({"w": torch.ones(1024), "train": {"step": 2}}, step=2).wait(10)
        write_dcp(str(tmp_path), endpoint=d.endpoint, step=1, on_report=metrics.observe)
        write_dcp(str(tmp_path), endpoint=d.endpoint, step=2, on_report=metrics.observe)
        samples = scrape(metrics.url)
    finally:
        metrics.close()
    labels = {"consumer": "write-dcp"}
    assert value(samples, "stager_consumer_writes_total", **labels) == 2
    assert value(samples, "stager_consumer_last_step", **labels) == 2
    assert value(samples, "stager_consumer_write_seconds_count", **labels) == 2
    on_disk = sum(f.stat().st_size for f in (tmp_path / "step-00000002").rglob("*") if f.is_file())
    assert value(samples, "stager_consumer_bytes_written_total", **labels) >= 2 * 4096
    assert value(samples, "stager_consumer_bytes_per_second", **labels) > 0
    assert on_disk > 4096
    assert value(samples, "stager_consumer_write_failures_total", **labels) == 0


def test_serve_and_follower_metrics_from_the_cli(short_dir, tmp_path):
    """`stager serve --metrics 0` says where in its ready line; `export-hf --follow --metrics` serves its own."""
    from stager.dev.launch import DaemonProcess

    endpoint = f"ipc://{short_dir}/cli.sock"
    daemon = DaemonProcess(endpoint, args=("--memory-limit", "32MiB", "--metrics", "0")).start()
    port = _free_port()
    follower = None
    try:
        assert daemon.info["metrics"].startswith("http://127.0.0.1:")
        follower = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stager.cli",
                "export-hf",
                "--endpoint",
                endpoint,
                "--out",
                str(tmp_path),
                "--follow",
                "--adapter",
                "identity",
                "--metrics",
                f"127.0.0.1:{port}",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "STAGER_ENDPOINT": endpoint},
        )
        url = f"http://127.0.0.1:{port}/metrics"

        def follower_up():
            try:
                return scrape(url)
            except OSError:
                assert follower.poll() is None, follower.stderr.read()
                return None

        wait_until(follower_up, timeout=60)
        cfg = {"model_type": "llama"}
        with StagingClient(endpoint, rank=0, local_world_size=1, world_size=1) as c:
            for step in (1, 2):
                c.stage({"w": torch.ones(512)}, step=step, model_info={"adapter": "identity", "hf_config": cfg}).wait(
                    10
                )
        samples = scrape_until(
            url, lambda s: value(s, "stager_consumer_last_step", consumer="export-hf") == 2, timeout=60
        )
        assert value(samples, "stager_consumer_writes_total", consumer="export-hf") >= 1
        # the daemon publishes a snapshot once per tick (0.2 s): it may lag the follower's own metrics
        served = scrape_until(
            daemon.info["metrics"], lambda s: value(s, "stager_versions_sealed_total") == 2, timeout=60
        )
        assert value(served, "stager_connected_readers") >= 1
    finally:
        if follower is not None:
            follower.terminate()
            follower.wait(30)
        daemon.stop()
    lines = [json.loads(line) for line in follower.stdout.read().splitlines() if line.strip()]
    assert lines and lines[-1]["step"] == 2


# prometheus-client is the optional extra stager[metrics]: without it, --metrics says how to get it
WITHOUT_PROMETHEUS = (
    "import sys; sys.modules['prometheus_client'] = None; from stager.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize(
    "command",
    [
        ["serve", "--memory-limit", "8MiB", "--metrics", "0"],
        ["write-dcp", "--out", "OUT", "--follow", "--metrics", "0"],
    ],
)
def test_metrics_without_prometheus_client_names_the_extra(command, short_dir, tmp_path):
    argv = [w.replace("OUT", str(tmp_path)) for w in command]
    if command[0] == "serve":
        argv += ["--endpoint", f"ipc://{short_dir}/nometrics.sock"]
    out = subprocess.run([sys.executable, "-c", WITHOUT_PROMETHEUS, *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--metrics needs the prometheus-client package: pip install 'stager[metrics]'" in out.stderr
    assert "Traceback" not in out.stderr
    assert not os.path.exists(f"{short_dir}/nometrics.sock")  # the daemon that could not start holds nothing
