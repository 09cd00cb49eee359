"""The ``stager`` command: ``serve`` (the daemon), ``status``, the loaders (``load-hf``, ``load-dcp``),
the writers (``export-hf``, ``write-dcp``), ``convert``, ``verify``, ``diff``, ``keygen``, ``reclaim``
and ``demo``. ``serve``'s flags come from :class:`stager.daemon.DaemonConfig` (:mod:`stager.flags`)."""

from __future__ import annotations

import argparse
import gc
import json
import sys

from stager import commands
from stager.protocol import StagerError


def _assembler_keys(config) -> str | None:
    """The full assembler (``--assemble-full``) reads the other nodes as a client, with the keys of
    ``$STAGER_AUTH_DIR`` (default ``--auth-dir``): checked here, before the daemon starts."""
    import os

    from stager.protocol.endpoint import AUTH_ENV

    keys = os.environ.get(AUTH_ENV) or config.auth_dir
    if keys and not os.path.isfile(os.path.join(keys, "client.key_secret")):
        raise ValueError(
            f"--assemble-full reads the other nodes as a client, but {keys} holds no client.key_secret; "
            f"make the keys with `stager keygen DIR` (or point {AUTH_ENV} at the client keys)"
        )
    return keys


def _freeze_start_up() -> None:
    """Move the objects made so far (torch's modules, the daemon's set-up: ~180k) out of the GC's reach.

    Why: they live as long as the process, yet every full collection walked them all, ~80-100 ms of
    CPU holding the GIL, during which the socket loop answers no Begin (measured in a 1000-tensor
    run: one in ~30 steps, with change maps on, landed in a step's copy window). Frozen, a full
    collection walks only what the daemon made since: a few ms (bench/gc_change_maps.py). Done here,
    in the process ``stager serve`` owns, not in :class:`Daemon`: a program embedding a daemon keeps
    its own GC policy. The garbage made so far goes first (a frozen object is never collected)."""
    gc.collect()
    gc.freeze()


def _serve(args: argparse.Namespace) -> int:
    from stager.daemon import Daemon, DaemonConfig
    from stager.flags import from_flags

    try:
        config = from_flags(DaemonConfig, args)
        keys = _assembler_keys(config) if config.assemble_full else None
        daemon = Daemon(config)
    except (ValueError, StagerError) as exc:
        print(f"stager serve: {exc}", file=sys.stderr)
        return 2
    assembler = None
    if config.assemble_full:  # a consumer in this process (why: stager/loaders/assemble_full.py)
        from stager.loaders.assemble_full import Assembler

        assembler = Assembler(
            daemon.endpoint, daemon.assembly_endpoint, node=daemon.state.host_id, auth_dir=keys, nixl=daemon.nixl
        )

    def ready(d: Daemon) -> None:
        info = {
            "endpoint": d.endpoint,
            "pid": __import__("os").getpid(),
            "memory_limit": config.memory_limit,
            "keep": config.keep,
        }
        if config.insecure:
            info["insecure"] = True
        if d.metrics_url:
            info["metrics"] = d.metrics_url
        line = (
            json.dumps(info)
            if args.json
            else (
                f"stager ready: {d.endpoint} (pid {info['pid']}, memory limit {config.memory_limit / 2**30:.2f} GiB, "
                f"keep {config.keep}){'  INSECURE: no authentication' if config.insecure else ''}"
            )
        )
        print(line, flush=True)

    if assembler is not None:
        assembler.start()
    _freeze_start_up()
    try:
        daemon.serve(ready=ready)
    finally:
        if assembler is not None:
            assembler.close()
    return 0


def _load_arguments(p: argparse.ArgumentParser, *, hf: bool, dcp: bool) -> None:
    from stager.client.adapters import BUILT_IN
    from stager.protocol.dtypes import torch_names

    if hf:
        p.add_argument(
            "--adapter",
            metavar="NAME|module:attr",
            help=f"maps HF names to the training ones: {', '.join(sorted(BUILT_IN))}, or module:attr "
            "(default identity: HF names kept)",
        )
        p.add_argument(
            "--prefix",
            metavar="PREFIX",
            help="put before every training name, e.g. 'model.' for a job that stages {'model': ..., 'optim': ...}",
        )
        p.add_argument(
            "--dtype",
            choices=torch_names(floating=True),
            help="cast floating tensors (and FP8 dequantization) to this dtype",
        )
    if dcp:
        p.add_argument("--model-only", action="store_true", help="leave out the optimizer (optim.*) and train state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.load)


DISTRIBUTED_JSON = (
    "With --distributed each writer prints one line, with bytes and files of its own share, plus "
    '"writer": its rank, "writers", "node", and "published": true on the one writer that published '
    "the directory."
)


def _distributed_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--distributed",
        action="store_true",
        help="one writer per node of a multi-node job, started by torchrun (--nnodes=N --nproc-per-node=1 "
        f"--no-python stager ...): {what}",
    )


def _writer_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--endpoint")
    p.add_argument(
        "--out", required=True, help=f"directory; each {what} goes to OUT/step-NNNNNNNN, OUT/latest links it"
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument("--step", type=int, help=f"{what} this sealed step (default: the newest)")
    when.add_argument("--follow", action="store_true", help=f"{what} new versions as they are sealed, until ^C")
    p.add_argument("--every", type=int, default=1, help=f"with --follow: at least this many steps between each {what}")
    p.add_argument("--keep", type=int, help=f"keep the newest K ({what}s)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--metrics", metavar="[HOST:]PORT", help="serve Prometheus metrics (HOST default 127.0.0.1)")


def build_parser() -> argparse.ArgumentParser:
    """The ``stager`` command's parser, every subcommand's flags (the tests read ``serve``'s from it)."""
    parser = argparse.ArgumentParser(prog="stager", description="Per-node staging daemon for PyTorch training state.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one object per line (ts, level, logger, msg, step, rank, peer, code)",
    )
    parser.add_argument("--log-file", help="append logs to this file (reopened on SIGHUP) instead of stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    from stager.daemon.config import DaemonConfig
    from stager.flags import add_flags

    p = sub.add_parser("serve", help="run the node's staging daemon")
    add_flags(p, DaemonConfig)  # every setting's flag, default and help come from DaemonConfig's fields
    p.add_argument("--json", action="store_true", help="print the ready line as JSON")
    p.set_defaults(func=_serve)

    p = sub.add_parser("status", help="show the daemon's versions, ranks and memory")
    p.add_argument("--endpoint")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the daemon (default 2)")
    p.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until ^C",
    )
    p.set_defaults(func=commands.status)

    from stager.client.adapters import BUILT_IN
    from stager.client.adapters.fp8_scope import QUANTIZE_CHOICES
    from stager.protocol.dtypes import torch_names

    p = sub.add_parser(
        "export-hf",
        help="write sealed versions as Hugging Face safetensors checkpoints",
        epilog='--json prints one line per export: {"exported": DIR, "step": N, "seconds": S, '
        '"bytes": B, "files": F} (seconds: the exporter\'s own time for that export). ' + DISTRIBUTED_JSON,
    )
    _writer_arguments(p, "export")
    p.add_argument(
        "--adapter",
        metavar="NAME|module:attr",
        help=f"built in: {', '.join(sorted(BUILT_IN))}; or module:attr naming a plug-in (torchtitan's "
        "StateDictAdapter shape) to import here (default: the built-in name in the staged "
        "model_info, else identity; a staged module:attr is refused)",
    )
    p.add_argument(
        "--hf-config",
        metavar="PATH",
        help="HF config.json (default: the dict in the staged model_info; a staged path is never read)",
    )
    p.add_argument(
        "--prefix",
        metavar="PREFIX",
        help="only the tensors under PREFIX are the model, e.g. 'model.' for stage({'model': ..., "
        "'optim': ...}) (default: the staged model_info's 'prefix', else all)",
    )
    p.add_argument("--hf-assets", help="directory whose tokenizer/generation files are copied along")
    p.add_argument(
        "--recipe-state",
        action="store_true",
        help="also write the optimizer and train state (recipe_state.safetensors + .json) so a run "
        "resumes from the export (load-hf brings them back)",
    )
    p.add_argument(
        "--peft",
        action="store_true",
        help="also write the version's LoRA weights (<module>.lora_a/lora_b.weight) in PEFT format, "
        "in the export's adapter/ directory",
    )
    p.add_argument(
        "--adapter-only",
        metavar="BASE_MODEL",
        help="write only the PEFT adapter (adapter_model.safetensors + adapter_config.json naming "
        "BASE_MODEL, a path or hub id)",
    )
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the staged model_info['lora']['alpha'])")
    p.add_argument(
        "--dtype", choices=torch_names(floating=True), help="cast floating tensors to this dtype (default: as staged)"
    )
    p.add_argument("--max-shard-size", default="5GB", help="per safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        help="fp8-block: the weights an FP8 checkpoint of the architecture quantizes as e4m3 plus fp32 "
        "weight_scale_inv per block (128x128, or the config's quantization_config), with "
        "quantization_config in config.json; --dtype is then that of the other tensors",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (default: one on stderr when it is a terminal)"
    )
    _distributed_argument(p, "each writes the files its node holds most of, together one export")
    p.set_defaults(func=commands.export_hf)

    p = sub.add_parser(
        "write-dcp",
        help="write sealed versions as resumable DCP checkpoints",
        epilog='--json prints one line per checkpoint: {"written": DIR, "step": N, "seconds": S, '
        '"bytes": B, "files": F} (bytes: tensor bytes; files: .distcp data files). ' + DISTRIBUTED_JSON,
    )
    _writer_arguments(p, "checkpoint")
    _distributed_argument(p, "each writes its node's regions, together one checkpoint")
    p.set_defaults(func=commands.write_dcp)

    p = sub.add_parser("load-hf", help="load a Hugging Face checkpoint into the daemon as a sealed version")
    p.add_argument("dir", help="sharded safetensors + model.safetensors.index.json, or one model.safetensors")
    p.add_argument("--endpoint")
    p.add_argument("--step", type=int, help="the version's step (default: the recipe state's, else 0)")
    _load_arguments(p, hf=True, dcp=False)

    p = sub.add_parser("load-dcp", help="load a DCP checkpoint into the daemon as a sealed version")
    p.add_argument("dir", help="a DCP checkpoint directory (holding .metadata)")
    p.add_argument("--endpoint")
    p.add_argument("--step", type=int, help="the version's step (default: the manifest's, else 0)")
    _load_arguments(p, hf=False, dcp=True)

    p = sub.add_parser("convert", help="convert a checkpoint: HF -> DCP, DCP -> HF, either -> one torch.save file")
    p.add_argument("src", help="an HF model directory or a DCP checkpoint directory")
    p.add_argument("out", help="dcp/hf: a directory (the result goes to OUT/step-N); torch: the file to write")
    p.add_argument("--to", required=True, choices=("dcp", "hf", "torch"))
    p.add_argument("--max-shard-size", default="5GB", help="--to hf: per safetensors file (default 5GB)")
    p.add_argument(
        "--hf-config",
        metavar="PATH",
        help="--to hf: config.json (default: the one a stager DCP "
        "checkpoint recorded, from the HF checkpoint it was loaded from)",
    )
    _load_arguments(p, hf=True, dcp=True)

    p = sub.add_parser("verify", help="check an HF or DCP export against its checksum manifest")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.verify)

    p = sub.add_parser("diff", help="compare two exports, or an export and a sealed version (step:N, latest)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--endpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.diff)

    p = sub.add_parser("keygen", help="create CURVE keys for a tcp daemon (server, one client, authorized/)")
    p.add_argument("dir")
    p.set_defaults(func=commands.keygen)

    p = sub.add_parser("reclaim", help="unlink shared memory that killed daemons of this user left behind")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.reclaim)

    p = sub.add_parser("demo", help="start a daemon, train a 2-rank FSDP2 model on CPU, stage and verify")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--every", type=int, default=2, help="stage every N steps")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from stager.protocol.logs import configure, request_reopen

    configure(args.log_level, args.log_format, args.log_file)
    if args.log_file and args.func is not _serve:  # serve's own lifecycle handles SIGHUP
        import signal

        signal.signal(signal.SIGHUP, lambda *_: request_reopen())  # logrotate must not kill a follower
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
