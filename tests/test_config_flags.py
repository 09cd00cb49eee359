"""`stager serve`'s flags are made from DaemonConfig (stager/flags.py): one source of each default and help."""

import argparse
import dataclasses

import pytest
import torch

from stager.cli import build_parser
from stager.daemon.config import DaemonConfig, parse_size
from stager.flags import add_flags, flag_name, from_flags, setting

pytestmark = pytest.mark.fast

# every flag `stager serve` has had: README, deploy/ and operators' scripts use these names
SERVE_FLAGS = {
    "--endpoint",
    "--memory-limit",
    "--preallocate",
    "--keep",
    "--step-timeout",
    "--peer-timeout",
    "--auth-dir",
    "--insecure-no-auth",
    "--json",
    "--metrics",
    "--host-id",
    "--advertise",
    "--assemble-full",
    "--drain-timeout",
    "--transport",
    "--change-maps",
    "--change-maps-keep",
    "--change-maps-memory",
    "--read-cast-memory",
}
CLI_ONLY = {"help", "json"}  # how the command prints, not how the daemon runs


def serve_parser() -> argparse.ArgumentParser:
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices["serve"]


def serve_actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in serve_parser()._actions if a.dest not in CLI_ONLY}


def test_every_field_is_a_flag_with_its_default_and_help_and_every_flag_a_field():
    fields = {f.name: f for f in dataclasses.fields(DaemonConfig)}
    actions = serve_actions()
    assert sorted(actions) == sorted(fields)  # vice versa: no serve flag the daemon does not read
    for name, field in fields.items():
        action = actions[name]
        assert action.option_strings == [flag_name(field)], name
        assert action.default == field.default, name
        assert action.help and action.help == field.metadata["help"], name
        if field.type == "bool":
            assert action.nargs == 0 and not action.default, name  # a switch
    options = {o for a in serve_parser()._actions for o in a.option_strings} - {"-h", "--help"}
    assert options == SERVE_FLAGS
    text = serve_parser().format_help()  # every help renders (a stray % would raise here)
    assert "(default 2)" in text and "(default 30)" in text and "50% of available" in text


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], {}),
        (
            ["--keep", "3", "--step-timeout", "5", "--peer-timeout", "7.5", "--drain-timeout", "0"],
            {"keep": 3, "step_timeout": 5.0, "peer_timeout": 7.5, "drain_timeout": 0.0},
        ),
        (
            ["--preallocate", "1MiB", "--memory-limit", "0.5GiB", "--read-cast-memory", "96MiB"],
            {"preallocate": 1 << 20, "memory_limit": 1 << 29, "read_cast_memory": 96 << 20},
        ),
        (
            ["--insecure-no-auth", "--assemble-full", "--host-id", "n1", "--metrics", "9108"],
            {"insecure_no_auth": True, "assemble_full": True, "host_id": "n1", "metrics": "9108"},
        ),
        (
            ["--endpoint", "ipc:///tmp/x.sock", "--advertise", "tcp://node3:7555"],
            {"endpoint": "ipc:///tmp/x.sock", "advertise": "tcp://node3:7555"},
        ),
        (
            ["--change-maps", "bfloat16,float16", "--change-maps-keep", "8", "--change-maps-memory", "1MiB"],
            {"change_maps": "bfloat16,float16", "change_maps_keep": 8, "change_maps_memory": 1 << 20},
        ),
    ],
    ids=["defaults", "numbers", "sizes", "switches and text", "endpoints", "change maps"],
)
def test_flags_build_the_same_config_as_the_constructor(argv, expected):
    expected = {"memory_limit": 64 << 20, **expected}  # fixed: the default depends on the free memory now
    args = build_parser().parse_args(["serve", "--memory-limit", "64MiB", *argv])
    assert from_flags(DaemonConfig, args) == DaemonConfig(**expected)


def test_bad_values_are_refused_by_the_parser_with_how_to_write_them(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--memory-limit", "lots"])
    assert exit_.value.code == 2
    assert "--memory-limit: cannot read size 'lots'; write e.g. 8GiB" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--keep", "two"])
    assert "--keep: invalid int value: 'two'" in capsys.readouterr().err


def test_change_map_dtypes_are_checked():
    assert DaemonConfig(memory_limit=1 << 20, change_maps="bfloat16, float16").change_map_dtypes() == (
        torch.bfloat16,
        torch.float16,
    )
    assert DaemonConfig(memory_limit=1 << 20, change_maps="none").change_map_dtypes() == ()
    with pytest.raises(ValueError, match="change_maps: dtype 'bf17'.*write e.g. bfloat16"):
        DaemonConfig(memory_limit=1 << 20, change_maps="bf17")
    with pytest.raises(ValueError, match="floating"):
        DaemonConfig(memory_limit=1 << 20, change_maps="int32")


@dataclasses.dataclass(kw_only=True)
class Toy:
    count: int = setting(1, "how many (default %(default)s)")
    ratio: float | None = setting(None, "a ratio")
    name: str = setting("x", "a name", metavar="NAME")
    size: int = setting(0, "bytes", parse=parse_size)
    quiet: bool = setting(False, "say less")
    color: bool = setting(True, "colour the output")


def toy(*argv: str) -> Toy:
    parser = argparse.ArgumentParser()
    add_flags(parser, Toy)
    return from_flags(Toy, parser.parse_args(list(argv)))


def test_each_type_form_has_its_flag():
    assert toy() == Toy()
    assert toy("--count", "4", "--ratio", "0.25", "--name", "y", "--size", "2KiB", "--quiet", "--no-color") == Toy(
        count=4, ratio=0.25, name="y", size=2048, quiet=True, color=False
    )


def test_a_field_without_help_or_a_flag_form_is_refused_naming_it():
    @dataclasses.dataclass(kw_only=True)
    class NoHelp:
        plain: int = 3

    @dataclasses.dataclass(kw_only=True)
    class NoForm:
        pair: tuple = setting((1, 2), "two numbers")

    with pytest.raises(TypeError, match=r"NoHelp\.plain has no flag help"):
        add_flags(argparse.ArgumentParser(), NoHelp)
    with pytest.raises(TypeError, match=r"NoForm\.pair: a .*tuple.* has no flag form"):
        add_flags(argparse.ArgumentParser(), NoForm)
    with pytest.raises(ValueError, match="help"):
        setting(1, "")
