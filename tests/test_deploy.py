"""deploy/: the files run as they are. Each is checked with the tool that owns its format where one is
installed here (systemd-analyze, the kubernetes client's API models, shellcheck), every `stager` command
line in them parses with the real CLI, and the Slurm script runs end to end on fake srun/torchrun."""

import argparse
import os
import pathlib
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from unittest import mock

import pytest

from helpers import wait_until
from stager.daemon.config import parse_size
from stager.daemon.segments import list_segments

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# the entry point of the environment under test (beside its interpreter), not whichever `stager` PATH finds first:
# a venv's python run without activating the venv would find another installation's, or a shim with no stager
_BESIDE = os.path.join(os.path.dirname(sys.executable), "stager")
STAGER_BIN = _BESIDE if os.path.exists(_BESIDE) else (shutil.which("stager") or _BESIDE)


class _Parsed(Exception):
    pass


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """``argv`` as `stager` parses it (nothing runs); AssertionError naming the line when it does not parse."""
    from stager import cli

    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            cli.main(list(argv))
        except _Parsed as parsed:
            return parsed.args[0]
        except SystemExit as exc:
            raise AssertionError(f"`stager {shlex.join(argv)}` does not parse (exit {exc.code})") from None
    raise AssertionError("the CLI did not parse its arguments")


def stager_argv(command: list[str]) -> list[str]:
    """The arguments after the `stager` executable in a command line."""
    index = next(i for i, word in enumerate(command) if os.path.basename(word) == "stager")
    return command[index + 1 :]


# ---------------------------------------------------------------------------------------------- systemd

UNITS = {"system": DEPLOY / "systemd" / "stager.service", "user": DEPLOY / "systemd" / "user" / "stager.service"}


def unit_settings(path: pathlib.Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def systemd_verify(text: str, tmp_path: pathlib.Path, user: bool) -> subprocess.CompletedProcess:
    unit = tmp_path / "stager.service"  # the stager path of this machine in place of the documented one
    unit.write_text(text.replace("/opt/stager/bin/stager", STAGER_BIN).replace("%h/.venv/bin/stager", STAGER_BIN))
    runtime = tmp_path / "run"
    runtime.mkdir(exist_ok=True)
    return subprocess.run(
        ["systemd-analyze", *(["--user"] if user else []), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_LEVEL": "notice"},
    )


def assert_verified(result: subprocess.CompletedProcess) -> None:
    # systemd-analyze reports unknown keys and bad values on stderr and still exits 0: any output fails
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), (
        result.stdout + result.stderr
    )


needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


@needs_systemd
@pytest.mark.parametrize("variant", sorted(UNITS))
def test_systemd_units_verify(variant, tmp_path):
    assert_verified(systemd_verify(UNITS[variant].read_text(), tmp_path, user=variant == "user"))


@needs_systemd
@pytest.mark.parametrize(
    "breakage",
    [
        ("KillSignal=", "KilSignal="),
        ("Restart=on-failure", "Restart=sometimes"),
        ("TimeoutStopSec=90", "TimeoutStopSec=ninety"),
    ],
)
def test_systemd_verify_catches_a_broken_unit(breakage, tmp_path):
    text = UNITS["system"].read_text()
    assert breakage[0] in text
    with pytest.raises(AssertionError):
        assert_verified(systemd_verify(text.replace(breakage[0], breakage[1]), tmp_path, user=False))


@pytest.mark.parametrize("variant", sorted(UNITS))
def test_systemd_units_start_restart_and_stop_stager_cleanly(variant):
    s = unit_settings(UNITS[variant])
    serve = parse_cli(stager_argv(shlex.split(s["ExecStart"][0].replace("%%", "%"))))
    assert serve.command == "serve" and parse_size(serve.memory_limit) > 0
    assert parse_cli(stager_argv(shlex.split(s["ExecStopPost"][0]))).command == "reclaim"  # a killed daemon's segments
    assert s["Restart"] == ["on-failure"] and s["KillSignal"] == ["SIGTERM"] and s["KillMode"] == ["mixed"]
    assert float(s["TimeoutStopSec"][0]) > serve.drain_timeout  # the drain finishes before systemd's SIGKILL
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # SIGHUP reopens the logs
    if variant == "system":
        assert s["User"] and s["RuntimeDirectory"] == ["stager"] and s["RemoveIPC"] == ["no"]
        assert "PrivateDevices" not in s and "PrivateIPC" not in s  # the ranks share this /dev/shm
        endpoint = dict(e.split("=", 1) for e in s["Environment"])["STAGER_ENDPOINT"]
        assert endpoint == "ipc:///run/stager/stager.sock"


def test_reclaim_unlinks_what_a_killed_daemon_left(short_dir):
    """ExecStopPost's `stager reclaim`: after a SIGKILL (TimeoutStopSec passed) no segment stays."""
    import torch

    from stager.client import StagingClient
    from stager.dev.launch import DaemonProcess

    endpoint = f"ipc://{short_dir}/killed.sock"
    daemon = DaemonProcess(endpoint, args=("--memory-limit", "16MiB")).start()
    with StagingClient(endpoint, rank=0, local_world_size=1, world_size=1) as c:
        c.stage({"w": torch.ones(1024)}, step=1).wait(10)
    assert list_segments(daemon.pid)
    daemon.stop(signal.SIGKILL)
    assert list_segments(daemon.pid)  # left behind by the kill
    out = subprocess.run([STAGER_BIN, "reclaim"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("reclaimed ")
    assert list_segments(daemon.pid) == []


# ------------------------------------------------------------------------------------------- kubernetes

MODELS = {("v1", "Secret"): "V1Secret", ("apps/v1", "DaemonSet"): "V1DaemonSet", ("v1", "Pod"): "V1Pod"}
_PRIMITIVE = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "float": (int, float),
    "object": (object,),
    "datetime": (str,),
    "date": (str,),
}


def strict_check(data, type_name: str, path: str = "$") -> None:
    """Every key of ``data`` is a field of the kubernetes client model ``type_name`` (recursively), with a
    value of the field's type: a misspelled or misplaced field raises ValueError naming its path."""
    import kubernetes.client

    # the client's type names: "list[X]" / "dict(str, X)" in older releases, "List[X]" / "Dict[str, X]" since
    if re.fullmatch(r"[Ll]ist\[.+\]", type_name):
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list")
        for i, item in enumerate(data):
            strict_check(item, type_name[5:-1], f"{path}[{i}]")
    elif re.fullmatch(r"dict\(.+\)|Dict\[.+\]", type_name):
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping")
        inner = re.fullmatch(r"[Dd]ict[(\[]([^,]+), (.+)[)\]]", type_name).group(2)
        for key, value in data.items():
            strict_check(value, inner, f"{path}.{key}")
    elif type_name in _PRIMITIVE:
        kinds = _PRIMITIVE[type_name]
        if not isinstance(data, kinds) or (isinstance(data, bool) and bool not in kinds and object not in kinds):
            raise ValueError(f"{path}: {data!r} is not {type_name}")
    else:
        model = getattr(kubernetes.client, type_name)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a {type_name} mapping")
        fields = {json_key: attr for attr, json_key in model.attribute_map.items()}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{path}: {unknown} are not fields of {type_name}")
        for key, value in data.items():
            strict_check(value, model.openapi_types[fields[key]], f"{path}.{key}")


def validate(doc: dict):
    """The object the official client deserializes from ``doc`` (required fields checked by its models),
    after :func:`strict_check`."""
    import kubernetes.client

    model = MODELS.get((doc.get("apiVersion"), doc.get("kind")))
    if model is None:
        raise ValueError(f"unexpected apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')}")
    strict_check(doc, model)
    return kubernetes.client.ApiClient()._ApiClient__deserialize(doc, model)


def manifests() -> dict[str, list[dict]]:
    yaml = pytest.importorskip("yaml")
    return {
        p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
        for p in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    }


def pod_specs() -> dict[str, dict]:
    out = {}
    for name, docs in manifests().items():
        for doc in docs:
            if doc["kind"] == "Pod":
                out[name] = doc["spec"]
            elif doc["kind"] == "DaemonSet":
                out[name] = doc["spec"]["template"]["spec"]
    return out


def containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def daemon_container(spec: dict) -> dict | None:
    for c in containers(spec):
        argv = c.get("args") or c.get("command", [])[1:]
        if "serve" in argv:
            return c
    return None


def test_kubernetes_manifests_are_valid_api_objects():
    pytest.importorskip("kubernetes")
    kinds = []
    for name, docs in manifests().items():
        for doc in docs:
            obj = validate(doc)
            kinds.append((name, type(obj).__name__))
    assert ("daemonset.yaml", "V1DaemonSet") in kinds and ("secret.example.yaml", "V1Secret") in kinds
    assert ("daemonset.yaml", "V1Secret") not in kinds  # re-applying the DaemonSet never replaces real keys
    assert {"training-pod.yaml", "reader-pod.yaml", "single-pod.yaml"} <= {n for n, _ in kinds}


@pytest.mark.parametrize(
    "path, wrong",
    [
        (("spec", "template", "spec"), {"hostPid": True}),  # misspelled (hostPID)
        (("spec", "template", "spec", "containers", 0), {"readinesProbe": {}}),
        (("spec", "template", "spec", "volumes", 0, "hostPath"), {"tpye": "Directory"}),
        (("spec", "template", "spec", "containers", 0, "resources"), {"request": {"memory": "1Gi"}}),
        (("spec", "template", "spec"), {"hostNetwork": "yes"}),  # wrong type
        (("spec",), {"replicas": 3}),  # a Deployment's field on a DaemonSet
    ],
)
def test_strict_validation_refuses_a_misspelled_field(path, wrong):
    pytest.importorskip("kubernetes")
    import copy

    doc = copy.deepcopy(next(d for d in manifests()["daemonset.yaml"] if d["kind"] == "DaemonSet"))
    node = doc
    for part in path:
        node = node[part]
    node.update(wrong)
    with pytest.raises(ValueError, match="not"):
        validate(doc)


def test_kubernetes_pods_share_the_daemons_memory_pids_and_identity():
    specs = pod_specs()
    ds = specs["daemonset.yaml"]
    users = {spec["securityContext"]["runAsUser"] for spec in specs.values()}
    assert users == {1000}  # segments and sockets are owner-only: one user everywhere
    for name in ("daemonset.yaml", "training-pod.yaml", "reader-pod.yaml"):
        spec = specs[name]
        assert spec["hostPID"] is True and spec["hostNetwork"] is True, name  # pids and host identity
        shm = [v for v in spec["volumes"] if v.get("hostPath", {}).get("path") == "/dev/shm"]
        assert shm and all(
            {"name": shm[0]["name"], "mountPath": "/dev/shm"} in c["volumeMounts"] for c in containers(spec)
        ), name
        endpoint = {e["name"]: e.get("value") for c in containers(spec) for e in c.get("env", [])}["STAGER_ENDPOINT"]
        assert endpoint == "tcp://$(NODE_IP):7555", name
    single = specs["single-pod.yaml"]
    assert single["shareProcessNamespace"] is True
    dshm = next(v for v in single["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["medium"] == "Memory"
    runtime = next(v for v in single["volumes"] if v["name"] == "runtime")
    assert "emptyDir" in runtime
    for c in containers(single):
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert {"name": "runtime", "mountPath": "/run/shared"} in c["volumeMounts"]
        assert {"name": "STAGER_ENDPOINT", "value": "ipc:///run/shared/stager/stager.sock"} in c["env"]
    # the daemon's runtime directory is one it creates (0700, its own) inside a volume: a mount point belongs
    # to root, and the daemon refuses a runtime directory its user does not own
    for spec in (single, ds):
        daemon = daemon_container(spec)
        env = {e["name"]: e.get("value") for e in daemon["env"]}
        mounts = {m["mountPath"] for m in daemon["volumeMounts"]}
        assert env["XDG_RUNTIME_DIR"] in mounts and not env["XDG_RUNTIME_DIR"].endswith("/stager")
    serve = parse_cli(daemon_container(single)["args"])
    assert parse_size(dshm["emptyDir"]["sizeLimit"].replace("Gi", "GiB")) >= parse_size(serve.memory_limit)
    assert ds["volumes"][-1]["secret"]["secretName"] == "stager-curve-keys"
    assert {"key": "authorized-client.key", "path": "authorized/client.key"} in ds["volumes"][-1]["secret"]["items"]


def _k8s_argv(words: list[str]) -> list[str]:
    return [w.replace("$(NODE_IP)", "10.0.0.17") for w in words]


def test_kubernetes_daemon_resources_match_memory_limit_and_probes_use_status():
    for name, spec in pod_specs().items():
        daemon = daemon_container(spec)
        if daemon is None:
            continue
        serve = parse_cli(_k8s_argv(daemon["args"]))
        limit = parse_size(serve.memory_limit)
        resources = daemon["resources"]
        assert resources["requests"] == resources["limits"], name  # Guaranteed QoS: never evicted first
        assert parse_size(resources["limits"]["memory"].replace("Gi", "GiB")) == limit + (1 << 30), name
        probes = [daemon[p] for p in ("readinessProbe", "livenessProbe", "startupProbe") if p in daemon]
        assert len(probes) >= 2, name
        for probe in probes:
            status = parse_cli(probe["exec"]["command"][1:])
            assert probe["exec"]["command"][0] == "stager" and status.command == "status"
            assert status.timeout < probe.get("timeoutSeconds", 1) or probe.get("timeoutSeconds") is None


def test_kubernetes_container_commands_parse():
    parsed = {}
    for name, spec in pod_specs().items():
        for c in containers(spec):
            words = _k8s_argv(c.get("command", ["stager"]) + c.get("args", []))
            if os.path.basename(words[0]) == "stager":
                parsed[f"{name}/{c['name']}"] = parse_cli(words[1:]).command
    # the manifests run the daemon and its writers: a manifest whose commands stopped naming stager would
    # otherwise pass with nothing parsed
    assert "serve" in parsed.values(), parsed
    assert {"write-dcp", "export-hf"} & set(parsed.values()), parsed


# ------------------------------------------------------------------------------------------------ slurm

SBATCH = DEPLOY / "slurm" / "stager-train.sbatch"


def test_sbatch_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    out = subprocess.run(["shellcheck", "--shell=bash", str(SBATCH)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sbatch_stager_commands_parse():
    text = SBATCH.read_text()
    assert "--ntasks-per-node=1" in text and "torchrun" in text and "trap teardown EXIT" in text
    lines = re.findall(r'"\$STAGER" ([^\n&]+?)(?: [&>]|\\?\n)', text.replace("\\\n    ", " "))
    # the daemons start through `bash -c '... exec "$2" serve ...' _ "$RUN_DIR" "$STAGER" ...`: the inner command
    # is checked itself, the outer one only hands $STAGER over as an argument
    lines = [line for line in lines if not line.startswith('"$')]
    lines += re.findall(r'exec "\$2" ([^\'\n]+)', text)
    assert len(lines) >= 5  # serve (ipc; tcp with keys), status, write-dcp, export-hf
    for line in lines:
        argv = [re.sub(r"\$\{?(\w+)(:-([^}]*))?\}?", lambda m: m.group(3) or "1", w) for w in shlex.split(line)]
        parse_cli([a for a in argv if a != ">/dev/null"])


def _fake_slurm(bin_dir: pathlib.Path) -> None:
    """srun: run the task once here (one node), dropping its options; scontrol: this host; torchrun:
    the training script with one local rank."""
    scripts = {
        "srun": """#!/bin/sh
                   while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done
                   exec "$@"
                """,
        "scontrol": """#!/bin/sh
                       echo localhost
                    """,
        "torchrun": f"""#!/bin/sh
                       while [ $# -gt 1 ]; do shift; done
                       LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 WORLD_SIZE=1 RANK=0 exec {sys.executable} "$1"
                    """,
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(textwrap.dedent("\n".join(line.strip() for line in body.splitlines())).lstrip())
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


TRAIN = """
import json, os, sys, time
import torch
from stager.client import StagingClient
from stager.client.admin import daemon_status
status = daemon_status()
open(os.environ["PID_FILE"], "w").write(str(status["pid"]))
with StagingClient() as c:
    for step in (1, 2):
        c.stage({{"w": torch.full((256,), float(step))}}, step=step).wait(30)
deadline = time.monotonic() + 60  # let the DCP follower write the newest step before training ends
while not os.path.exists(os.path.join(os.environ["CKPT_DIR"], "dcp", "step-00000002")):
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.1)
sys.exit({code})
"""


@pytest.mark.parametrize("code", [0, 1])
def test_sbatch_runs_and_tears_down_on_success_and_failure(code, tmp_path, short_dir):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_slurm(bin_dir)
    (tmp_path / "train.py").write_text(TRAIN.format(code=code))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.path.dirname(STAGER_BIN)}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "TRAIN_SCRIPT": str(tmp_path / "train.py"),
        "CKPT_DIR": str(tmp_path / "ckpt"),
        "STAGER_RUN_DIR": f"{short_dir}/run",
        "STAGER_MEMORY_LIMIT": "16MiB",
        "DCP_EVERY": "1",
        "HF_EVERY": "1",
        "PID_FILE": str(tmp_path / "daemon.pid"),
        "STAGER_READY_TIMEOUT": "60",
    }
    out = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == code, out.stdout + out.stderr
    daemon_pid = int((tmp_path / "daemon.pid").read_text())
    import psutil

    wait_until(lambda: not psutil.pid_exists(daemon_pid) or psutil.Process(daemon_pid).status() == "zombie")
    assert list_segments(daemon_pid) == []  # the daemon drained and unlinked everything
    assert not os.path.exists(f"{short_dir}/run/stager.sock")
    assert (tmp_path / "ckpt" / "dcp" / "step-00000002" / ".metadata").exists()


# ------------------------------------------------------------------------------------------------ image

DOCKERFILE = DEPLOY / "container" / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_rules():
    import json

    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    assert ins[0] == ("ARG", "BASE=python:3.11-slim-bookworm") and ins[1] == ("FROM", "${BASE}")  # CPU default
    assert "TORCH_INDEX" in DOCKERFILE.read_text() and re.search(
        r'"torch==\$\{TORCH_VERSION\}"', DOCKERFILE.read_text()
    )
    user_at = max(i for i, w in enumerate(words) if w == "USER")
    assert ins[user_at][1] not in ("root", "0") and all(w != "RUN" for w in words[user_at:])  # non-root at run time
    assert json.loads(dict(ins)["ENTRYPOINT"]) == ["stager"]  # exec form: signals reach stager, not a shell
    assert json.loads(dict(ins)["CMD"]) == ["serve"] and dict(ins)["STOPSIGNAL"] == "SIGTERM"
    health = dict(ins)["HEALTHCHECK"]
    assert parse_cli(json.loads(health[health.index("CMD") + 3 :])[1:]).command == "status"
    notes = DOCKERFILE.read_text()
    assert all(flag in notes for flag in ("--ipc=", "--pid=host", "--shm-size"))
    assert "[metrics]" in notes  # the image can serve --metrics
