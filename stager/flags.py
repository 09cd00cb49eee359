"""Command-line flags made from a configuration dataclass: each setting is declared once.

A ``kw_only`` dataclass declares its fields with :func:`setting` (the default and the flag's help
beside the field); :func:`add_flags` turns each field into ``--field-name`` with that default, a
type from the annotation and that help, and :func:`from_flags` builds the dataclass from the parsed
arguments. The dataclass's ``__post_init__`` stays the one place that checks values: a flag and a
direct construction are checked alike.

Types: ``int``, ``float`` and ``str``, each optionally ``| None`` (the default None: "not given");
``bool`` is a switch (``--x`` sets True; a field defaulting to True gets ``--no-x`` as well); any
other type needs a ``parse`` function (e.g. sizes written ``64GiB``).

This module imports nothing of stager: the daemon declares its configuration with it and never
depends on the CLI (import-linter), and the CLI restates no default.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

_HELP = "help"
_METAVAR = "metavar"
_PARSE = "parse"


def setting(default: Any, help: str, *, metavar: str | None = None, parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field with its flag's ``help`` (argparse's: ``%(default)s`` names the default, ``%%``
    is a percent sign), an optional ``metavar`` and an optional ``parse`` (text -> value; a ValueError
    it raises is shown to the user as it is, so its message should say how to write the value)."""
    if not help:
        raise ValueError("setting() needs the flag's help text")
    metadata = {_HELP: help}
    if metavar is not None:
        metadata[_METAVAR] = metavar
    if parse is not None:
        metadata[_PARSE] = parse
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field: dataclasses.Field) -> str:
    """``memory_limit`` -> ``--memory-limit``."""
    return "--" + field.name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``; ``int`` -> ``int``; any other union is returned as it is (no flag form)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type whose ValueError message reaches the user (argparse would print
    "invalid parse value" instead)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass ``cls``, in field order (TypeError naming a field that has no
    help or whose type has no flag form: caught by the first ``--help``, and by the tests)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if _HELP not in field.metadata:
            raise TypeError(f"{cls.__name__}.{field.name} has no flag help: declare it with setting()")
        if field.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{field.name} has no default: every setting of a flag has one")
        options: dict[str, Any] = {"dest": field.name, "default": field.default, "help": field.metadata[_HELP]}
        if _METAVAR in field.metadata:
            options["metavar"] = field.metadata[_METAVAR]
        base = _base_type(hints[field.name])
        if _PARSE in field.metadata:
            options["type"] = _argument_type(field.metadata[_PARSE])
        elif base is bool:
            options["action"] = argparse.BooleanOptionalAction if field.default else "store_true"
        elif base in (int, float, str):
            options["type"] = base
        else:
            raise TypeError(
                f"{cls.__name__}.{field.name}: a {hints[field.name]} has no flag form; "
                "give its setting() a parse function"
            )
        parser.add_argument(flag_name(field), **options)


def from_flags(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass ``cls`` from arguments parsed by a parser :func:`add_flags` filled (other arguments
    of the same command are left out)."""
    return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})
