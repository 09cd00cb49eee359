"""Shared pieces of the stress campaigns in this folder (fuzz.py, kill.py, soak.py).

- known contents: every tensor of a staged version is a pure function of (name, shape, dtype, step),
  so any reader can check any version byte for byte without being told what was staged;
- a ``stager serve`` subprocess whose log goes to a file (scanned for tracebacks afterwards);
- cleanup that runs even on failure: processes killed, temp dirs removed, /dev/shm segments of the
  daemons this campaign started unlinked (and reported as leaks when a daemon that exited cleanly
  left any);
- the one-line summary and exit code every campaign ends with.

Debugging knobs (environment): ``STRESS_KEEP_TMP=1`` keeps a failed campaign's temporary directory
(daemon and worker logs, outputs); ``STRESS_DAEMON_LOG_LEVEL=INFO`` makes the daemons log more.

Nothing here talks to anything but local ipc endpoints and loopback.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MAX_SHOWN = 5  # offending messages printed above the summary line

# the default state of a staged version: odd shapes, several dtypes (bf16/f16 hold the pattern exactly)
SPEC: dict[str, tuple[tuple[int, ...], str]] = {
    "layers.0.w": ((64, 48), "float32"),
    "layers.0.b": ((1000,), "bfloat16"),
    "layers.1.w": ((3, 5, 7), "float16"),
    "counts": ((37,), "int64"),
}


def _per_rank_spec(rank: int, lws: int) -> dict:
    """Each rank its own tensors (as pipeline stages hold them) plus one replica every rank holds
    (identical boxes: the daemon has the lowest rank write it)."""
    return {
        f"r{rank}.w": ((256, 1024), "float32"),
        f"r{rank}.b": ((4096,), "bfloat16"),
        "shared.emb": ((512, 64), "float32"),
    }


def job_spec(spec_name: str, lws: int) -> dict:
    """Every tensor of a version staged by an ``lws``-rank job of spec ``spec_name``."""
    out: dict = {}
    for rank in range(lws):
        out.update(SPECS[spec_name](rank, lws))
    return out


SPECS: dict[str, Callable[[int, int], dict]] = {
    "default": lambda rank, lws: dict(SPEC),
    "per-rank": _per_rank_spec,
    # a few MiB, so that writing an export takes long enough to be killed in the middle of it
    "export": lambda rank, lws: {
        "model.w1": ((1024, 1024), "float32"),
        "model.w2": ((1024, 768), "bfloat16"),
        "model.norm": ((1024,), "float32"),
        "model.steps": ((16,), "int64"),
    },
}


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def pattern(name: str, shape: tuple[int, ...], dtype: str, step: int):
    """The full tensor ``name`` must hold at ``step``: small integers (exact in every float dtype),
    different per element, per tensor and per step, so shifted, swapped or stale bytes show."""
    return pattern_box(name, shape, dtype, step, (0,) * len(shape), shape)


def pattern_box(name: str, shape: tuple[int, ...], dtype: str, step: int, offset, size):
    """The box ``offset``/``size`` of :func:`pattern` (a rank's shard), computed without the rest."""
    import torch

    salt = zlib.crc32(name.encode()) % 10007
    idx = torch.zeros((), dtype=torch.int64)
    stride = 1
    for d in reversed(range(len(shape))):
        view = [1] * len(shape)
        view[d] = -1
        idx = idx + (torch.arange(offset[d], offset[d] + size[d], dtype=torch.int64) * stride).view(view)
        stride *= shape[d]
    values = (idx.expand(tuple(size)) * 7919 + step * 104729 + salt * 31337) % 251 - 125
    return values.to(torch_dtype(dtype)).contiguous()


def expected_state(step: int, spec: dict = SPEC) -> dict:
    return {name: pattern(name, shape, dtype, step) for name, (shape, dtype) in spec.items()}


def compare_tensor(name: str, got, want) -> str | None:
    """None when ``got`` holds exactly ``want``'s dtype, shape and bytes; else what differs."""
    import torch

    if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
        return f"{name}: {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}"
    a = got.detach().contiguous().reshape(-1).view(torch.uint8)
    b = want.detach().contiguous().reshape(-1).view(torch.uint8)
    if torch.equal(a, b):
        return None
    bad = (a != b).nonzero()
    first = int(bad[0]) // want.element_size()
    return (
        f"{name}: {int(bad.numel())} bytes differ, first at element {first} "
        f"(got {got.reshape(-1)[first].item()!r}, want {want.reshape(-1)[first].item()!r})"
    )


def check_tensors(items: Iterable[tuple[str, Any]], step: int, spec: dict = SPEC) -> list[str]:
    """Problems of a version's (name, tensor) pairs against what ``step`` must hold."""
    problems, seen = [], set()
    for name, tensor in items:
        seen.add(name)
        if name not in spec:
            problems.append(f"step {step}: unexpected tensor {name}")
            continue
        shape, dtype = spec[name]
        why = compare_tensor(name, tensor, pattern(name, shape, dtype, step))
        if why:
            problems.append(f"step {step}: {why}")
    problems += [f"step {step}: tensor {n} missing" for n in sorted(set(spec) - seen)]
    return problems


# ---------------------------------------------------------------------------------------------- daemon


def start_daemon(endpoint: str, log_path: str, args: tuple[str, ...] = (), startup_timeout: float = 60.0):
    """``stager serve`` on ``endpoint`` (a :class:`stager.dev.launch.DaemonProcess`) whose stderr goes
    to ``log_path`` (appended); returns it started."""
    from stager.dev.launch import DaemonProcess

    class LoggedDaemon(DaemonProcess):
        def start(self):
            with open(log_path, "ab") as log:
                level = os.environ.get("STRESS_DAEMON_LOG_LEVEL", "WARNING")
                self.proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "stager.cli",
                        "--log-level",
                        level,
                        "serve",
                        "--json",
                        "--endpoint",
                        self.endpoint,
                        *self.args,
                    ],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    cwd=REPO,
                )
            ready, _, _ = select.select([self.proc.stdout], [], [], self.startup_timeout)
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                self.stop(signal.SIGKILL)
                raise RuntimeError(
                    f"stager serve was not ready within {self.startup_timeout:.0f}s; log: {tail(log_path)}"
                )
            self.info = json.loads(line)
            return self

    return LoggedDaemon(endpoint, args=args, startup_timeout=startup_timeout).start()


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def log_problems(path: str) -> list[str]:
    """Tracebacks and internal errors in a daemon log (each: its first line and the exception line)."""
    try:
        with open(path, errors="replace") as f:
            text = f.read().splitlines()
    except OSError:
        return []
    problems = []
    for i, line in enumerate(text):
        if line.startswith("Traceback"):
            last = next((t for t in text[i + 1 :] if t and not t.startswith((" ", "\t", "Traceback"))), "?")
            context = text[i - 1] if i else ""
            problems.append(f"daemon log: {context.strip()[:200]} -> {last.strip()[:300]}")
        elif "Fatal Python error" in line or "Segmentation fault" in line:
            problems.append(f"daemon log: {line.strip()[:300]}")
    return problems


def daemon_segments(pid: int) -> list[str]:
    from stager.daemon.segments import list_segments

    return list_segments(pid)


def remove_segments(names: Iterable[str]) -> None:
    from stager.protocol.shm import SHM_DIR

    for name in names:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except OSError:
            pass


def shm_bytes(pid: int) -> int:
    from stager.protocol.shm import SHM_DIR

    total = 0
    for name in daemon_segments(pid):
        try:
            total += os.stat(os.path.join(SHM_DIR, name)).st_blocks * 512  # resident, not the apparent size
        except OSError:
            pass
    return total


# ---------------------------------------------------------------------------------------------- cleanup


class Campaign:
    """Failures, cleanup actions and the final line of one campaign.

    ``with Campaign("fuzz") as c:`` ... ``c.fail(msg)`` ... ``return c.finish(summary)``: the
    cleanup actions run in reverse order on the way out, whatever happened (SIGTERM included)."""

    def __init__(self, name: str):
        self.name = name
        self.failures: list[str] = []
        self._cleanups: list[Callable[[], None]] = []
        self.daemon_pids: list[int] = []
        self.tmp = tempfile.mkdtemp(prefix=f"stg-{name[:6]}-", dir="/tmp")  # ipc paths must stay short
        self.started = time.monotonic()

    def __enter__(self) -> Campaign:
        self._old_term = signal.signal(signal.SIGTERM, _raise_exit)
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            # started in the background by a shell (`cmd &`): SIGINT is ignored, and children would
            # inherit that, so the followers this campaign stops with SIGINT (^C) would never stop
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()
        signal.signal(signal.SIGTERM, self._old_term)

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def on_exit(self, fn: Callable[[], None]) -> Callable[[], None]:
        self._cleanups.append(fn)
        return fn

    def daemon(self, endpoint: str, args: tuple[str, ...] = ()):
        """A started daemon; stopped (SIGTERM) at cleanup if still running."""
        d = start_daemon(endpoint, os.path.join(self.tmp, "daemon.log"), args)
        self.daemon_pids.append(d.pid)
        self.on_exit(lambda: d.stop())
        return d

    def daemon_log_problems(self) -> list[str]:
        return log_problems(os.path.join(self.tmp, "daemon.log"))

    def stop_daemon_and_check(self, daemon) -> None:
        """SIGTERM ``daemon``: it must exit 0, leave no segment in /dev/shm and no problem in its log."""
        pid = daemon.pid
        rc = daemon.stop()
        if rc != 0:
            self.fail(f"the daemon exited with code {rc} on SIGTERM")
        left = daemon_segments(pid)
        if left:
            self.fail(f"{len(left)} segments of the stopped daemon left in /dev/shm: {left[:3]}")
        for problem in self.daemon_log_problems():
            self.fail(problem)

    def leaked_segments(self) -> list[str]:
        """Segments of this campaign's daemons that are no longer running (they must have none)."""
        import psutil

        leaked = []
        for pid in self.daemon_pids:
            if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                leaked += daemon_segments(pid)
        return leaked

    def cleanup(self) -> None:
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                fn()
            except BaseException as exc:  # cleanup goes on
                print(f"{self.name}: cleanup step failed: {exc!r}", file=sys.stderr)
        for pid in self.daemon_pids:  # whatever a killed daemon left and nobody reclaimed
            try:
                remove_segments(daemon_segments(pid))
            except OSError:
                pass
        if os.environ.get("STRESS_KEEP_TMP") and self.failures:
            print(f"{self.name}: logs and outputs kept in {self.tmp} (STRESS_KEEP_TMP)", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self, summary: str) -> int:
        """Print the first failures, then the summary line ending in PASS or FAIL; the exit code."""
        for message in self.failures[:MAX_SHOWN]:
            print(f"  FAIL {message}")
        if len(self.failures) > MAX_SHOWN:
            print(f"  ... and {len(self.failures) - MAX_SHOWN} more failures")
        verdict = "FAIL" if self.failures else "PASS"
        print(f"{summary}: {verdict}", flush=True)
        return 1 if self.failures else 0


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def kill_process(proc, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
    """Signal a subprocess.Popen or multiprocessing.Process (if alive) and reap it."""
    if proc is None:
        return
    pid = proc.pid
    alive = proc.poll() is None if hasattr(proc, "poll") else proc.is_alive()
    if alive and pid:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        if hasattr(proc, "poll"):
            proc.wait(timeout)
        else:
            proc.join(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def stop_gently(proc, timeout: float = 15.0) -> int | None:
    """SIGINT (a follower finishes or drops its temporary and exits), then SIGKILL; the exit code."""
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def rss(pid: int) -> int:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def python_env() -> dict:
    """The environment for child processes: the repository importable, one torch thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
