"""Each entry point's command line, built from a table of :class:`Flag`.

A bench states its flags as data (name, type, default, help, and the value
its ``--quick`` smoke run uses) and :func:`parse` turns them into argparse:
``--help`` shows every default, a bad flag gets one line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from counter_sync.flags import OneLineParser
from testkit.processes import MissingBinary, find_binary

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["Flag", "installed", "loopback", "names_in", "parse", "positive", "settings_from"]

Fields = TypeVar("Fields", bound="DataclassInstance")


@dataclass(frozen=True)
class Flag:
    """One flag. ``kind`` None makes it a switch; ``quick`` is its value under ``--quick``.

    A flag with a ``quick`` value takes ``default`` in a full run and
    ``quick`` in a smoke run, unless the command line gives it.
    """

    name: str
    help: str
    kind: Callable[[str], Any] | None = str
    default: Any = None
    quick: Any = None
    short: str | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")


def positive(kind: type[int | float]) -> Callable[[str], Any]:
    """An argparse type: a finite number of ``kind`` above 0."""

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text} must be a number above 0")
        return value

    return convert


def loopback(text: str) -> str:
    """An argparse type: an IPv4 loopback address (the benches send nothing elsewhere)."""
    try:
        if ipaddress.IPv4Address(text).is_loopback:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text} is not an IPv4 loopback address (127.x.x.x)")


def names_in(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse type: names from ``choices``, comma-separated, kept in the order given."""
    known = list(choices)

    def convert(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}"
            )
        return names

    return convert


def help_text(flag: Flag) -> str:
    if flag.kind is None:
        return flag.help
    if flag.quick is None:
        return f"{flag.help} (default: {flag.default})"
    return f"{flag.help} (default: {flag.default}; --quick: {flag.quick})"


def parse(
    prog: str, description: str, flags: Sequence[Flag], argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse ``argv`` (the process's arguments when None) against ``flags``.

    A table that has flags with ``quick`` values must include the
    ``--quick`` switch; a flag not given then takes its full or quick value.
    """
    parser = OneLineParser(prog=prog, description=description)
    for flag in flags:
        names = [flag.short, flag.name] if flag.short else [flag.name]
        if flag.kind is None:
            parser.add_argument(*names, action="store_true", help=help_text(flag))
        else:
            parser.add_argument(
                *names,
                type=flag.kind,
                # Filled in below for --quick; argparse converts a text default with `kind`.
                default=None if flag.quick is not None else flag.default,
                metavar=flag.metavar,
                help=help_text(flag),
            )
    args = parser.parse_args(argv)
    for flag in flags:
        if flag.quick is not None and getattr(args, flag.dest) is None:
            setattr(args, flag.dest, flag.quick if args.quick else flag.default)
    return args


def installed(prog: str, name: str) -> str | None:
    """The path of the program ``name`` a flag gives; None, said in one line, if it is missing."""
    try:
        return find_binary(name)
    except MissingBinary as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None


def settings_from(cls: type[Fields], args: argparse.Namespace, **extra: Any) -> Fields:
    """A dataclass of settings: each field from the flag of its name, unless ``extra`` has it."""
    names = {field.name for field in dataclasses.fields(cls)} - set(extra)
    return cls(**{name: getattr(args, name) for name in names}, **extra)
