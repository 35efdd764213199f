"""Flags and `key.sub=value` overrides in any order after a command's positional argument.

argparse stops reading options at the first bare `key=value` word, so a
command that takes config overrides (`mmtune train`, `mmtune eval`) collects
everything after its positional argument with REMAINDER and sorts it out
here, in one place: a second parser with the same options reads the
remainder with `parse_intermixed_args`; a list option (`action="append"`)
given on both sides keeps both sides' values in order, any other option given
after the positional argument (a value other than its default) wins, and
what is left are the overrides. Written by hand because argparse has no
"options anywhere among free words" mode of its own.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

AddOptions = Callable[[argparse.ArgumentParser], None]


def add_options_and_overrides(parser: argparse.ArgumentParser, add_options: AddOptions, *, overrides_help: str) -> None:
    """Add the command's options, then the overrides (REMAINDER) after its positional arguments."""
    add_options(parser)
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key.sub=value", help=overrides_help)


def sort_out_remainder(args: argparse.Namespace, add_options: AddOptions, prog: str) -> argparse.Namespace:
    """Move the options that came after the positional argument from `args.overrides` into `args`.

    `args.overrides` keeps only the `key=value` overrides. Returns `args` (changed in place).
    """
    inner = argparse.ArgumentParser(prog=prog, add_help=False)
    add_options(inner)
    inner.add_argument("overrides", nargs="*")
    rest = inner.parse_intermixed_args(list(args.overrides or []))
    defaults = vars(inner.parse_args([]))
    for key, value in vars(rest).items():
        if key == "overrides":
            args.overrides = value
        elif isinstance(value, list):
            setattr(args, key, list(getattr(args, key) or []) + value)
        elif value != defaults[key]:
            setattr(args, key, value)
    return args
