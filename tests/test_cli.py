"""The `stager` command as an operator uses it."""

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from stager.daemon.config import DaemonConfig, parse_size
from stager.daemon.segments import list_segments
from stager.dev.launch import DaemonProcess


def stager(*args, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "stager.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_status_fails_fast_without_a_daemon(short_dir):
    out = stager("status", "--endpoint", f"ipc://{short_dir}/none.sock", "--timeout", "0.5")
    assert out.returncode == 1 and "not reachable" in out.stderr


def test_serve_status_and_clean_shutdown(short_dir):
    endpoint = f"ipc://{short_dir}/d.sock"
    daemon = DaemonProcess(endpoint, args=("--memory-limit", "32MiB", "--keep", "3")).start()
    try:
        assert daemon.info["endpoint"] == endpoint and daemon.info["keep"] == 3
        sock = endpoint[len("ipc://") :]
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
    assert not os.path.exists(endpoint[len("ipc://") :])
    assert list_segments(daemon.pid) == []


@pytest.fixture
def curve_keys(tmp_path):
    """CURVE keys made by `stager keygen` (in-process: no interpreter start)."""
    from stager.cli import main

    keys = str(tmp_path / "keys")
    assert main(["keygen", keys]) == 0
    return keys


def test_every_tcp_bind_needs_auth_or_the_explicit_opt_out(tmp_path):
    from stager.dev.launch import free_port

    with pytest.raises(ValueError, match="not a loopback address"):
        DaemonConfig(endpoint="tcp://0.0.0.0:5555", memory_limit=1 << 20)
    with pytest.raises(ValueError, match="not a loopback address"):  # the opt-out is for loopback only
        DaemonConfig(endpoint="tcp://0.0.0.0:5555", memory_limit=1 << 20, insecure_no_auth=True)
    for loopback in ("tcp://127.0.0.1:5555", "tcp://localhost:5555", "tcp://[::1]:5555"):
        with pytest.raises(ValueError, match=r"--auth-dir.*--insecure-no-auth"):
            DaemonConfig(endpoint=loopback, memory_limit=1 << 20)
    with pytest.raises(ValueError, match="contradict"):
        DaemonConfig(
            endpoint="tcp://127.0.0.1:5555", memory_limit=1 << 20, auth_dir=str(tmp_path), insecure_no_auth=True
        )
    with pytest.raises(ValueError, match="stager keygen"):  # a directory without keys is named at once
        DaemonConfig(endpoint="tcp://127.0.0.1:5555", memory_limit=1 << 20, auth_dir=str(tmp_path))
    assert not DaemonConfig(memory_limit=1 << 20, insecure_no_auth=True).insecure  # ipc stays owner-only
    out = stager("serve", "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--memory-limit", "8MiB")
    assert out.returncode == 2 and "--auth-dir" in out.stderr and "--insecure-no-auth" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = stager("serve", "--endpoint", "tcp://0.0.0.0:5555")
    assert out.returncode == 2 and "--auth-dir" in out.stderr
    out = stager("serve", "--memory-limit", "8MiB", "--preallocate", "16MiB")
    assert out.returncode == 2 and "preallocate must be between 0 and memory_limit" in out.stderr


def test_insecure_opt_out_warns_and_says_so(short_dir):
    from stager.dev.launch import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stager.cli",
            "serve",
            "--json",
            "--endpoint",
            endpoint,
            "--memory-limit",
            "8MiB",
            "--insecure-no-auth",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "STAGER_AUTH_DIR"},
    )
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["insecure"] is True and ready["endpoint"] == endpoint
        out = stager("status", "--json", "--endpoint", endpoint)  # no keys needed: that is the point
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["insecure"] is True
        assert "INSECURE" in stager("status", "--endpoint", endpoint).stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "WARNING" in err and "WITHOUT AUTHENTICATION" in err


def test_keygen_writes_owner_only_secrets(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o755)  # an existing, wider directory is narrowed
    (keys / "server.key_secret").write_text("old")
    os.chmod(keys / "server.key_secret", 0o644)  # an older key file's mode is not inherited
    out = stager("keygen", str(keys))
    assert out.returncode == 0, out.stderr

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    assert mode(keys) == 0o700 and mode(keys / "authorized") == 0o700
    assert mode(keys / "server.key_secret") == 0o600 and mode(keys / "client.key_secret") == 0o600
    assert mode(keys / "server.key") == 0o644 and mode(keys / "authorized" / "client.key") == 0o644
    assert "secret-key" in (keys / "server.key_secret").read_text()


def test_tcp_loopback_daemon_serves_remote_style_clients(curve_keys, monkeypatch):
    import torch

    from stager.client import StagingClient, Subscriber
    from stager.dev.launch import free_port

    monkeypatch.setenv("STAGER_AUTH_DIR", curve_keys)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with DaemonProcess(endpoint, args=("--memory-limit", "16MiB", "--auth-dir", curve_keys)) as d:
        assert "insecure" not in d.info
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


def test_curve_authenticated_tcp(curve_keys, monkeypatch):
    import torch

    from stager.client import StagingClient, Subscriber
    from stager.dev.launch import free_port
    from stager.protocol import ErrorCode, StagerError

    keys = curve_keys
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with DaemonProcess(endpoint, args=("--memory-limit", "16MiB", "--auth-dir", keys)):
        monkeypatch.delenv("STAGER_AUTH_DIR", raising=False)
        with Subscriber(endpoint, timeout=2) as sub:  # no keys: the handshake never completes
            with pytest.raises(StagerError) as info:
                sub.latest()
            assert info.value.code == ErrorCode.UNAVAILABLE
        monkeypatch.setenv("STAGER_AUTH_DIR", keys)
        with StagingClient(endpoint, rank=0, local_world_size=1, world_size=1, transport="frames") as c:
            c.stage({"w": torch.ones(5)}, step=1).wait(10)
        with Subscriber(endpoint) as sub, sub.latest() as snap:
            assert torch.equal(snap["w"], torch.ones(5))


@pytest.mark.parametrize(
    "command,module,name",
    [
        ("write-dcp", "stager.writers.write_dcp_dist", "write_dcp_distributed"),
        ("export-hf", "stager.writers.export_hf_dist", "export_hf_distributed"),
    ],
)
def test_a_distributed_writer_fails_in_one_line_and_prints_its_path_without_a_report(
    command, module, name, tmp_path, monkeypatch, capsys
):
    """--distributed shares the single writer's failure path: a bug is one line and exit 1, never a
    traceback; a writer that returned without reporting still prints its path (a stand-in writer:
    what is tested is the command's handling of what the writer did)."""
    import importlib

    from stager.cli import main

    def buggy(out_dir, **kw):
        raise KeyError("head_dim")

    monkeypatch.setattr(importlib.import_module(module), name, buggy)
    assert main([command, "--distributed", "--out", str(tmp_path), "--json"]) == 1
    err = capsys.readouterr().err
    assert f"stager {command}: KeyError: 'head_dim' (unexpected" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err

    monkeypatch.setattr(importlib.import_module(module), name, lambda out_dir, **kw: str(tmp_path / "step_5"))
    assert main([command, "--distributed", "--out", str(tmp_path), "--json"]) == 0
    key = "written" if command == "write-dcp" else "exported"
    assert json.loads(capsys.readouterr().out) == {key: str(tmp_path / "step_5")}
