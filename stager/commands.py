"""What each ``stager`` subcommand does, once :mod:`stager.cli` parsed its flags: ``status``, the writers
(``export-hf``, ``write-dcp``, each with ``--distributed``), the loaders (``load-hf``, ``load-dcp``), ``verify``,
``diff``, ``reclaim``, ``keygen`` and ``demo``. Each takes the parsed namespace and returns the exit status.
``serve`` stays in :mod:`stager.cli`, beside the flags it is made from."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from stager.protocol import StagerError


def status(args: argparse.Namespace) -> int:
    from stager.status_view import run

    return run(args)


def _run_writer(args: argparse.Namespace, command: str, key: str, write, fields=None, **options) -> int:
    """Shared by export-hf and write-dcp: one version (--step / newest) or --follow until ^C.
    ``fields(path)``: more keys for each --json line (beside ``key``)."""

    def printed(path: str) -> None:  # as each is done: a follower runs until ^C
        print(json.dumps({key: path, **(fields(path) if fields else {})}) if args.json else path, flush=True)

    from stager.metrics import consumer_metrics

    try:
        metrics = consumer_metrics(command, args.metrics)  # records nothing without --metrics
    except ValueError as exc:
        print(f"stager {command}: {exc}", file=sys.stderr)
        return 2
    try:
        return (
            _one_line_failures(
                command,
                lambda: write(
                    args.out,
                    endpoint=args.endpoint,
                    step=args.step,
                    follow=args.follow,
                    every=args.every,
                    keep=args.keep,
                    on_written=printed,
                    on_report=metrics.observe,
                    **options,
                ),
            )
            or 0
        )
    finally:
        metrics.close()


def _one_line_failures(command: str, run) -> int | None:
    """Run a writer's ``run()``; a failure of any kind is one line on stderr and its exit status
    (None: it succeeded). Shared by the single and the --distributed writers."""
    try:
        run()
    except KeyboardInterrupt:
        return 130
    except (StagerError, ValueError, OSError) as exc:
        print(f"stager {command}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, or a library's error: one line (the traceback at --log-level DEBUG)
        from stager.writers.persist import failure_cause

        logging.getLogger("stager.cli").debug("stager %s failed", command, exc_info=exc)
        print(
            f"stager {command}: {failure_cause(exc)} (unexpected: --log-level DEBUG shows where; please report it)",
            file=sys.stderr,
        )
        return 1
    return None


def export_hf(args: argparse.Namespace) -> int:
    """--json: one line per export, ``{"exported": path, "step", "seconds", "bytes", "files"}``;
    a progress bar on stderr when it is a terminal (--no-progress: never)."""
    from stager.writers.export_hf import export_hf

    options = dict(
        adapter=args.adapter,
        hf_config=args.hf_config,
        prefix=args.prefix,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        quantize=args.quantize,
    )
    if args.distributed and (args.recipe_state or args.peft or args.adapter_only):
        print(
            "stager export-hf: --recipe-state and --peft are written by a single exporter (not --distributed)",
            file=sys.stderr,
        )
        return 2
    if args.recipe_state:
        options["recipe_state"] = True
    if args.peft or args.adapter_only:
        options.update(
            peft=True, adapter_only=bool(args.adapter_only), base_model=args.adapter_only, lora_alpha=args.lora_alpha
        )
    if args.distributed:
        from stager.writers.export_hf_dist import export_hf_distributed

        return _distributed(
            args, "export-hf", "exported", "on_export", export_hf_distributed, hf_assets=args.hf_assets, **options
        )
    reports: dict[str, dict] = {}
    return _run_writer(
        args,
        "export-hf",
        "exported",
        export_hf,
        fields=lambda path: reports.get(path, {}),
        on_export=lambda r: reports.__setitem__(r["exported"], r),
        hf_assets=args.hf_assets,
        progress=False if args.no_progress else None,
        **options,
    )


def write_dcp(args: argparse.Namespace) -> int:
    """--json: one line per checkpoint, ``{"written": path, "step", "seconds", "bytes", "files"}``."""
    from stager.writers.write_dcp import write_dcp

    if args.distributed:
        from stager.writers.write_dcp_dist import write_dcp_distributed

        return _distributed(args, "write-dcp", "written", "on_write", write_dcp_distributed)
    reports: dict[str, dict] = {}
    return _run_writer(
        args,
        "write-dcp",
        "written",
        write_dcp,
        fields=lambda path: reports.get(path, {}),
        on_write=lambda r: reports.__setitem__(r["written"], r),
    )


def _distributed(args: argparse.Namespace, command: str, key: str, callback: str, write, **options) -> int:
    """One writer per node (``--distributed``): one step, written together. --json prints this
    writer's report (``write(..., callback=...)`` gives it): a single writer's keys, its own share
    of bytes and files, and writer, writers, node, published."""
    if args.follow or args.keep:
        print(
            f"stager {command}: --distributed writes one step (--step, default the newest complete one); "
            "run it again for the next",
            file=sys.stderr,
        )
        return 2
    reports: list[dict] = []
    paths: list[str] = []
    failed = _one_line_failures(
        command,
        lambda: paths.append(
            write(args.out, endpoint=args.endpoint, step=args.step, **{callback: reports.append}, **options)
        ),
    )
    if failed is not None:
        return failed
    report = reports[-1] if reports else {key: paths[-1]}  # a writer that returned without reporting
    print(json.dumps(report) if args.json else paths[-1], flush=True)
    return 0


def load(args: argparse.Namespace) -> int:
    """load-hf / load-dcp / convert: one JSON line with --json (the load's report, or ``{"written": path}``)."""
    try:
        if args.command == "load-hf":
            from stager.loaders.load_hf import load_hf

            report = load_hf(
                args.dir,
                endpoint=args.endpoint,
                adapter=args.adapter,
                step=args.step,
                dtype=args.dtype,
                prefix=args.prefix,
            )
        elif args.command == "load-dcp":
            from stager.loaders.load_dcp import load_dcp

            report = load_dcp(args.dir, endpoint=args.endpoint, step=args.step, model_only=args.model_only)
        else:
            from stager.convert import convert

            report = {
                "written": convert(
                    args.src,
                    args.out,
                    to=args.to,
                    adapter=args.adapter,
                    dtype=args.dtype,
                    model_only=args.model_only,
                    prefix=args.prefix,
                    hf_config=args.hf_config,
                    max_shard_size=args.max_shard_size,
                )
            }
    except KeyboardInterrupt:
        return 130
    except (StagerError, ValueError, OSError) as exc:
        print(f"stager {args.command}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report))
    elif "written" in report:
        print(report["written"])
    else:
        print(
            f"step {report['step']}: {report['tensors']} tensors, {report['nbytes'] / 2**20:.1f} MiB in "
            f"{report['seconds']:.2f}s"
        )
    return 0


def verify(args: argparse.Namespace) -> int:
    from stager.formats.integrity import verify

    try:
        report = verify(args.dir)
    except StagerError as exc:
        print(f"stager verify: {exc.message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.dir}: {'ok' if report['ok'] else 'CORRUPT'} ({report['checked']} tensors checked)")
        for key in ("mismatched", "missing", "unexpected"):
            for name in report[key]:
                print(f"  {key}: {name}")
        if report.get("error"):
            print(f"  unreadable: {report['error']}")
    return 0 if report["ok"] else 1


def _tensors_of(source: str, endpoint: str | None):
    """An export directory, or ``step:N`` / ``latest`` for a sealed version (a leased snapshot)."""
    from stager.formats.integrity import read_tensors

    if source == "latest" or source.startswith("step:"):
        from stager.client import Subscriber

        sub = Subscriber(endpoint)
        snap = sub.latest() if source == "latest" else sub.at(int(source[5:]))
        return {k: v.clone() for k, v in snap.items()}, lambda: (snap.release(), sub.close())
    return dict(read_tensors(source)), lambda: None


def diff(args: argparse.Namespace) -> int:
    from stager.formats.integrity import diff

    close_a = None
    try:  # a damaged export is one line naming what is wrong with which file, never a traceback
        a, close_a = _tensors_of(args.a, args.endpoint)
        b, close_b = _tensors_of(args.b, args.endpoint)
    except StagerError as exc:
        if close_a is not None:
            close_a()
        print(f"stager diff: {exc.message}", file=sys.stderr)
        return 2
    report = diff(a, b)
    close_a()
    close_b()
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['equal']} equal, {len(report['different'])} different, {len(report['shape_mismatch'])} "
            f"shape mismatches, {len(report['only_a'])} only in A, {len(report['only_b'])} only in B"
        )
        for name, delta in report["different"].items():
            print(f"  different: {name} (max abs diff {delta:.3g})")
        for name, sa, sb in report["shape_mismatch"]:
            print(f"  shape: {name} {sa} vs {sb}")
        for side in ("only_a", "only_b"):
            for name in report[side]:
                print(f"  {side}: {name}")
    return 0 if report["identical"] else 1


def reclaim(args: argparse.Namespace) -> int:
    """Unlink this user's segments whose daemon is dead (a daemon killed with SIGKILL leaves them)."""
    from stager.daemon.segments import reclaim_stale

    count = reclaim_stale()
    print(json.dumps({"reclaimed": count}) if args.json else f"reclaimed {count} segments of dead daemons")
    return 0


def keygen(args: argparse.Namespace) -> int:
    """Secret keys 0600, the directory and authorized/ 0700; public keys 0644."""
    import os
    import shutil

    from zmq.auth import create_certificates

    authorized = os.path.join(args.dir, "authorized")
    old_umask = os.umask(0o077)  # every file is created owner-only: a secret is never readable, not even briefly
    try:
        os.makedirs(authorized, mode=0o700, exist_ok=True)
        for path in (args.dir, authorized):
            os.chmod(path, 0o700)
        for name in ("server", "client"):
            for path in (os.path.join(args.dir, f"{name}.key_secret"), os.path.join(args.dir, f"{name}.key")):
                try:
                    os.unlink(path)  # open() would keep the mode of an older, wider file
                except FileNotFoundError:
                    pass
        server_public, server_secret = create_certificates(args.dir, "server")
        public, secret = create_certificates(args.dir, "client")
        shutil.copy(public, os.path.join(authorized, "client.key"))
    except OSError as exc:
        print(f"stager keygen: cannot write keys to {args.dir}: {exc}", file=sys.stderr)
        return 2
    finally:
        os.umask(old_umask)
    for path in (server_secret, secret):
        os.chmod(path, 0o600)
    for path in (server_public, public, os.path.join(authorized, "client.key")):
        os.chmod(path, 0o644)  # public keys: safe to copy around
    print(f"wrote CURVE keys to {args.dir}: serve with --auth-dir {args.dir}; clients set STAGER_AUTH_DIR={args.dir}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from stager.dev.demo import run_demo

    return run_demo(steps=args.steps, stage_every=args.every, json_out=args.json)
