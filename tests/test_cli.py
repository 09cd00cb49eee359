"""The `stager` command as an operator uses it."""

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from stager.config import DaemonConfig, parse_size
from stager.launch import DaemonProcess
from stager.shm import list_segments


def stager(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "stager.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_status_fails_fast_without_a_daemon(short_dir):
    out = stager("status", "--endpoint", f"ipc://{short_dir}/none.sock", "--timeout", "0.5")
    assert out.returncode == 1 and "not reachable" in out.stderr


def test_serve_status_and_clean_shutdown(short_dir):
    endpoint = f"ipc://{short_dir}/d.sock"
    daemon = DaemonProcess(endpoint, args=("--memory-limit", "32MiB", "--keep", "3")).start()
    try:
        assert daemon.info["endpoint"] == endpoint and daemon.info["keep"] == 3
        sock = endpoint[len("ipc://"):]
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600  # owner only
        # the default endpoint comes from STAGER_ENDPOINT for every command
        out = stager("status", "--json", env={"STAGER_ENDPOINT": endpoint})
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert status["memory"]["limit"] == 32 << 20 and status["keep"] == 3
        human = stager("status", "--endpoint", endpoint)
        assert human.returncode == 0 and "memory" in human.stdout
        import torch

        from stager.client import StagingClient

        with StagingClient(endpoint, rank=0, local_world_size=1, world_size=1) as c:
            c.stage({"w": torch.ones(1024)}, step=1).wait(10)
        segs = list_segments(daemon.pid)
        assert segs and all(stat.S_IMODE(os.stat(f"/dev/shm/{s}").st_mode) == 0o600 for s in segs)
        # a second daemon on the same endpoint is refused, the first keeps serving
        second = stager("serve", "--endpoint", endpoint, "--memory-limit", "8MiB")
        assert second.returncode == 2 and "already serves" in second.stderr
        assert stager("status", "--endpoint", endpoint).returncode == 0
    finally:
        code = daemon.stop(signal.SIGTERM)
    assert code == 0
    assert not os.path.exists(endpoint[len("ipc://"):])
    assert list_segments(daemon.pid) == []


def test_tcp_binds_loopback_only_without_auth():
    with pytest.raises(ValueError, match="not a loopback address"):
        DaemonConfig(endpoint="tcp://0.0.0.0:5555", memory_limit=1 << 20)
    out = stager("serve", "--endpoint", "tcp://0.0.0.0:5555")
    assert out.returncode == 2 and "--auth-dir" in out.stderr


def test_tcp_loopback_daemon_serves_remote_style_clients():
    import torch

    from stager.client import StagingClient, Subscriber
    from stager.launch import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with DaemonProcess(endpoint, args=("--memory-limit", "16MiB")):
        sd = {"w": torch.randn(300, 7), "i": torch.arange(9)}
        with StagingClient(endpoint, rank=0, local_world_size=1, world_size=1, transport="frames") as c:
            c.stage(sd, step=1).wait(10)
        with Subscriber(endpoint) as sub, sub.latest() as snap:
            assert torch.equal(snap["w"], sd["w"]) and torch.equal(snap["i"], sd["i"])


@pytest.mark.parametrize("text,expected", [("1GiB", 1 << 30), ("512MiB", 512 << 20), ("1.5g", 3 << 29), ("4096", 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_config_checks():
    with pytest.raises(ValueError, match="keep"):
        DaemonConfig(memory_limit=1 << 20, keep=0)
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")


def test_curve_authenticated_tcp(tmp_path):
    import torch

    from stager.client import StagingClient, Subscriber
    from stager.launch import free_port
    from stager.protocol import ErrorCode, StagerError

    keys = str(tmp_path / "keys")
    assert stager("keygen", keys).returncode == 0
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with DaemonProcess(endpoint, args=("--memory-limit", "16MiB", "--auth-dir", keys)):
        os.environ.pop("STAGER_AUTH_DIR", None)
        with Subscriber(endpoint, timeout=2) as sub:  # no keys: the handshake never completes
            with pytest.raises(StagerError) as info:
                sub.latest()
            assert info.value.code == ErrorCode.UNAVAILABLE
        os.environ["STAGER_AUTH_DIR"] = keys
        try:
            with StagingClient(endpoint, rank=0, local_world_size=1, world_size=1, transport="frames") as c:
                c.stage({"w": torch.ones(5)}, step=1).wait(10)
            with Subscriber(endpoint) as sub, sub.latest() as snap:
                assert torch.equal(snap["w"], torch.ones(5))
        finally:
            del os.environ["STAGER_AUTH_DIR"]
