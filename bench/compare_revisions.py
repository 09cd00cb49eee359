"""Run benchmarks of two git revisions back to back and compare their figures.

    python bench/compare_revisions.py --before 06e3a6b --after HEAD bench_live bench_restore [--rounds 3] [--json PATH]

Each revision is checked out in a throwaway ``git worktree`` (under a short temporary directory, removed at the
end), laid out as the package installs it (``stager.client`` and ``stager.protocol`` come from ``client/`` and
``protocol/``: linked into ``stager/`` as pyproject's ``package-dir`` says) and its C helper built in place. Every
bench runs as ``python bench/X.py ... --json F`` with the worktree as cwd and as PYTHONPATH, so that revision's
code is the one imported (checked first: an import that resolves outside the worktree stops the run).

The runs alternate between the revisions, bench by bench and round by round (A B A B ..., or A B B A with
``--order abba``), so that a machine whose load drifts (other jobs, page reporting) loads both alike. Every
numeric figure of a bench's JSON report is compared: a list of repeated measurements counts as its median; a list
of [seconds, bytes] pairs as one figure per position; sizes, counts, targets and figures equal in every run are
left out. Per figure: median before and after over the rounds, their ratio and the spread (min-max) of each; a
figure whose every run after is worse than every run before (the spreads do not overlap) is flagged WORSE.
Lower is better unless the name says a rate (``per_s``). ``--bench-from REV`` runs the bench scripts of REV on
both sides (the measuring code held fixed), where a bench itself was fixed between the revisions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

# Small sizes (bench_restore needs >= 64: its --preallocate daemon takes size + 64 MiB of a 2 x size limit). Each
# run's cost is mostly fixed (processes spawned, daemons started, torch imported): at these sizes one round of the
# five takes ~6 min per revision on an idle 2-core VM, and much longer under others' test load.
SMALL_ARGS = {
    "bench_live": "--size-gib 0.03",
    "bench_multinode": "--size-mib 32",
    "bench_assembly": "--size-mib 32",
    "bench_restore": "--size-mib 64",
    "bench_staging": "--size-gib 0.03 --iters 3 --warmup 1 --small 1000 --skip-dcp --first-rounds 0",
}
# Report keys that are not measurements of the code under test: the machine header, derived targets, per-rank
# detail (staging's median over ranks is kept), descriptions.
SKIP_KEYS = {
    "date",
    "host",
    "cpus",
    "torch",
    "python",
    "meta",
    "argv",
    "targets",
    "targets_definition",
    "describe",
    "per_rank",
    "max_over_ranks",
    "min",
}
COUNT = re.compile(r"(bytes|tensors|steps|skipped|delta|keep|limit)$")  # sizes and counts, not speed
RATE = re.compile(r"per_s($|_)|gb_s|throughput")


def _git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True).stdout.strip()


def _package_dirs(path: str) -> dict[str, str]:
    """pyproject's [tool.setuptools.package-dir] (read without tomllib, which Python 3.10 lacks)."""
    with open(os.path.join(path, "pyproject.toml")) as f:
        m = re.search(r"^\[tool\.setuptools\.package-dir\]\n(.*?)(?=^\[|\Z)", f.read(), re.M | re.S)
    return dict(re.findall(r'^"?([\w.]+)"?\s*=\s*"([^"]+)"', m.group(1), re.M)) if m else {}


def _prepare(repo: str, sha: str, path: str, build_tmp: str) -> None:
    """A worktree of ``sha`` at ``path`` importable from PYTHONPATH=path, with its C extension built."""
    subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", path, sha], check=True, capture_output=True)
    for pkg, src in _package_dirs(path).items():
        link = os.path.join(path, *pkg.split("."))
        if os.path.normpath(src) != os.path.join(*pkg.split(".")) and not os.path.exists(link):
            os.symlink(os.path.relpath(os.path.join(path, src), os.path.dirname(link)), link)
    if os.path.exists(os.path.join(path, "setup.py")):
        # optional=True in setup.py: a failed build is not an error there, so the probe checks the result
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp", build_tmp],
            cwd=path,
            check=True,
            capture_output=True,
        )


# On PYTHONPATH after the worktree: drops an editable install's import hook from every process (bench, daemons,
# spawned ranks), which would otherwise serve a module the worktree lacks from the installed checkout.
SITECUSTOMIZE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
"""


def _env(path: str) -> dict:
    site = os.path.join(os.path.dirname(path), "site")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([path, site])}


def _probe(path: str) -> dict:
    """Where the package's modules resolve from when run as the benches run; each must be inside ``path``."""
    mods = ["stager", "stager.protocol", "stager.client", "stager.daemon"]
    if os.path.exists(os.path.join(path, "client", "hook", "_streamcopy.c")):
        mods.append("stager.client.hook._streamcopy")
    code = (
        "import importlib, json, os, sys; print(json.dumps({m: os.path.realpath(importlib.import_module(m)"
        ".__file__) for m in sys.argv[1:]} | {'editable hook': [str(f) for f in sys.meta_path "
        "if 'editable' in str(f)]}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *mods], cwd=path, env=_env(path), check=True, capture_output=True, text=True
    ).stdout
    files = json.loads(out)
    root = os.path.realpath(path) + os.sep
    hook = files.pop("editable hook")
    wrong = {m: f for m, f in files.items() if not f.startswith(root)} | ({"editable hook": hook} if hook else {})
    if wrong:
        raise SystemExit(
            f"compare_revisions: in {path} these modules resolve elsewhere: {wrong}; "
            "the comparison would mix revisions (is the C extension built? see setup.py)"
        )
    return files


def flatten(obj, name: str = "") -> dict[str, float]:
    """The numeric figures of a bench report, by dotted path (see the module docstring for the rules)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in SKIP_KEYS and not COUNT.search(k):
                out.update(flatten(v, f"{name}.{k}" if name else str(k)))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[name] = float(obj)
    elif isinstance(obj, list) and obj:
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in obj):
            out[name] = statistics.median(obj)
        elif (
            all(isinstance(x, list) and x and all(isinstance(y, (int, float)) for y in x) for x in obj)
            and len({len(x) for x in obj}) == 1
        ):
            for i, col in enumerate(zip(*obj)):
                out[f"{name}[{i}]"] = statistics.median(col)
    return out  # deeper structures (per-reader traces) are left out


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the bench's process group (daemons shut down cleanly), SIGKILL to what is left after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            proc.poll()  # reaps the bench itself; its children are reaped by init
            time.sleep(0.1)
    proc.wait()


def _use_benches_of(repo: str, rev: str, path: str) -> None:
    """Replace the worktree's bench/ scripts with those of ``rev`` (the measuring code, not the code measured)."""
    listing = _git(repo, "ls-tree", "--name-only", rev, "bench/")
    for name in listing.splitlines():
        if name.endswith(".py"):
            with open(os.path.join(path, name), "w") as f:
                f.write(_git(repo, "show", f"{rev}:{name}") + "\n")


def _run_one(path: str, bench: str, args: list[str], out_json: str, log: str, timeout: float) -> dict | None:
    cmd = [sys.executable, os.path.join("bench", bench + ".py"), *args, "--json", out_json]
    t0 = time.monotonic()
    with open(log, "w") as f:
        # its own process group: a bench that times out (or Ctrl-C here) is ended with its daemons and ranks,
        # which would otherwise live on, orphaned, and load the runs after it
        proc = subprocess.Popen(
            cmd, cwd=path, env=_env(path), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            if proc.poll() is None or rc == "timeout":
                _end_group(proc)
    wall = time.monotonic() - t0
    if rc != 0 or not os.path.exists(out_json):
        with open(log) as f:
            tail = f.read()[-2000:]
        print(f"  {bench} in {path}: failed ({rc}) after {wall:.0f}s; log tail:\n{tail}", file=sys.stderr)
        return None
    with open(out_json) as f:
        return {"wall_s": wall, "figures": flatten(json.load(f))}


def _stats(vals: list[float]) -> dict | None:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)} if vals else None


def compare(runs: dict) -> list[dict]:
    """Rows of the table from ``runs[bench][side]``: a list of figure dicts, one per successful round."""
    rows = []
    for bench, sides in runs.items():
        names = sorted({n for side in sides.values() for r in side for n in r})
        for n in names:
            vals = {s: [r[n] for r in sides[s] if n in r] for s in ("before", "after")}
            if vals["before"] and vals["after"] and len({*vals["before"], *vals["after"]}) <= 1:
                continue  # a size or setting, not a measurement (a side with no run keeps the figure: shown "-")
            b, a = _stats(vals["before"]), _stats(vals["after"])
            higher = bool(RATE.search(n))
            flag = ""
            if a and b and min(a["n"], b["n"]) >= 2:  # one run has no spread to judge by
                if (a["max"] < b["min"]) if higher else (a["min"] > b["max"]):
                    flag = "WORSE"
                elif (a["min"] > b["max"]) if higher else (a["max"] < b["min"]):
                    flag = "better"
            ratio = a["median"] / b["median"] if a and b and b["median"] else None
            rows.append(
                {
                    "bench": bench,
                    "figure": n,
                    "higher_is_better": higher,
                    "before": b,
                    "after": a,
                    "ratio": ratio,
                    "flag": flag,
                }
            )
    return rows


def _fmt(s: dict | None) -> str:
    return f"{'-':>30s}" if s is None else f"{s['median']:10.4g} [{s['min']:.4g}-{s['max']:.4g}]".rjust(30)


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'figure':52s} {'before median [min-max]':>30s} {'after median [min-max]':>30s} {'after/bef':>9s}  flag")
    bench = None
    for r in rows:
        if r["bench"] != bench:
            bench = r["bench"]
            print(f"-- {bench}")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        name = r["figure"] + (" (^)" if r["higher_is_better"] else "")
        print(f"  {name[:50]:50s} {_fmt(r['before'])} {_fmt(r['after'])} {ratio:>9s}  {r['flag']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="default bench arguments (small sizes): " + json.dumps(SMALL_ARGS)
    )
    p.add_argument("benches", nargs="+", help="bench names, e.g. bench_live (the file bench/NAME.py)")
    p.add_argument("--before", required=True, help="git revision A (any commit-ish)")
    p.add_argument("--after", required=True, help="git revision B (any commit-ish)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each bench per revision (default 3)")
    p.add_argument(
        "--order",
        choices=("abab", "abba"),
        default="abab",
        help="abab: A first in every round; abba: B first in every other round (default abab)",
    )
    p.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="arguments of bench NAME instead of its small default, e.g. --args 'bench_live=--size-gib 1'",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one bench run may take (default 600)")
    p.add_argument("--json", metavar="PATH", help="also write every run's figures and the table's rows to PATH")
    p.add_argument("--keep", action="store_true", help="keep the temporary worktrees and logs (path printed)")
    p.add_argument(
        "--bench-from",
        metavar="REV",
        help="run the bench/ scripts of REV on both sides (the same measuring code against each revision's "
        "package; for a bench whose own code changed, e.g. a fixed poller), instead of each revision's own",
    )
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    bench_args = {n: shlex.split(s) for n, s in SMALL_ARGS.items()}
    for item in a.args:
        name, sep, rest = item.partition("=")
        if not sep:
            p.error(f"--args {item!r}: expected NAME=ARGS, e.g. 'bench_live=--size-gib 0.1'")
        bench_args[name] = shlex.split(rest)
    repo = _git(os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--show-toplevel")
    revs = {}
    for side, rev in (("before", a.before), ("after", a.after)):
        try:
            revs[side] = {"rev": rev, "sha": _git(repo, "rev-parse", "--verify", rev + "^{commit}")}
        except subprocess.CalledProcessError:
            p.error(f"--{side} {rev!r} is not a commit of {repo}")
    missing = [b for b in a.benches if not os.path.exists(os.path.join(repo, "bench", b + ".py"))]
    if missing:
        p.error(f"no such bench in {repo}/bench: {missing}")

    tmp = tempfile.mkdtemp(prefix="cr-", dir="/tmp")  # short: daemons' ipc socket paths must stay short
    paths = {"before": os.path.join(tmp, "a"), "after": os.path.join(tmp, "b")}
    os.mkdir(os.path.join(tmp, "site"))
    with open(os.path.join(tmp, "site", "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    runs = {b: {"before": [], "after": []} for b in a.benches}
    log_runs = []
    interrupted = False
    load = {"start": os.getloadavg()}
    t_start = time.monotonic()
    try:
        for side, path in paths.items():
            _prepare(repo, revs[side]["sha"], path, os.path.join(tmp, "build-" + side))
            if a.bench_from:
                _use_benches_of(repo, a.bench_from, path)
            revs[side]["modules"] = _probe(path)
            print(
                f"{side}: {revs[side]['rev']} = {revs[side]['sha'][:10]}, stager from "
                f"{revs[side]['modules']['stager']}",
                file=sys.stderr,
            )
        for rnd in range(a.rounds):
            sides = ["after", "before"] if a.order == "abba" and rnd % 2 else ["before", "after"]
            for bench in a.benches:
                for side in sides:
                    tag = f"{bench}-{side}-{rnd}"
                    print(
                        f"[{time.strftime('%H:%M:%S')}] round {rnd + 1}/{a.rounds} {bench} {side} "
                        f"(load {os.getloadavg()[0]:.2f})",
                        file=sys.stderr,
                        flush=True,
                    )
                    res = _run_one(
                        paths[side],
                        bench,
                        bench_args.get(bench, []),
                        os.path.join(tmp, tag + ".json"),
                        os.path.join(tmp, tag + ".log"),
                        a.timeout,
                    )
                    log_runs.append(
                        {
                            "bench": bench,
                            "side": side,
                            "round": rnd,
                            "load1": os.getloadavg()[0],
                            **(res or {"failed": True}),
                        }
                    )
                    if res:
                        runs[bench][side].append(res["figures"])
    except KeyboardInterrupt:  # Ctrl-C: the table of the runs done so far is still worth having
        interrupted = True
    finally:
        load["end"] = os.getloadavg()
        for path in paths.values():
            if os.path.exists(path) and not a.keep:
                subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", path], capture_output=True)
        if not a.keep:
            subprocess.run(["git", "-C", repo, "worktree", "prune"], capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp} (remove with: git worktree remove --force {tmp}/a {tmp}/b)", file=sys.stderr)
    rows = compare(runs)
    failed = sum(1 for r in log_runs if r.get("failed"))
    header = (
        f"before {revs['before']['rev']} ({revs['before']['sha'][:10]})  after {revs['after']['rev']} "
        f"({revs['after']['sha'][:10]})  {a.rounds} rounds{' (INTERRUPTED)' if interrupted else ''}, "
        f"order {a.order}, {failed} failed runs, "
        f"{time.monotonic() - t_start:.0f} s; load avg (1/5/15 min) start "
        f"{'/'.join(f'{x:.2f}' for x in load['start'])}, end {'/'.join(f'{x:.2f}' for x in load['end'])}\n"
        f"args: {json.dumps({b: shlex.join(bench_args.get(b, [])) for b in a.benches})}\n"
        "per figure over the rounds; (^) higher is better, else lower; WORSE/better: spreads do not overlap "
        "(judged with >= 2 runs a side)"
    )
    print_table(rows, header)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "revisions": revs,
                    "rounds": a.rounds,
                    "order": a.order,
                    "load": load,
                    "args": {b: bench_args.get(b, []) for b in a.benches},
                    "runs": log_runs,
                    "rows": rows,
                },
                f,
                indent=1,
            )
    return 1 if interrupted or failed or any(r["flag"] == "WORSE" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
