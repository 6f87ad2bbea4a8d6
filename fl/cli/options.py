"""What every ``fl`` command's options share: help that shows each default, and other spellings
(NVIDIA FLARE's, or fl's older names) that parse to the same option without cluttering ``--help``."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["CommandParser", "HelpFormatter", "add_alias"]


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: ...)`` to an option's help unless the help already names its default,
    or the default is "nothing" (None, False, an empty string or list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            text
            and text is not argparse.SUPPRESS
            and "default" not in text
            and default is not argparse.SUPPRESS
            and default not in (None, False, "", [])
            and (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))
        ):
            # "... (env X)" becomes "... (env X; default: Y)"
            text = text[:-1] + "; default: %(default)s)" if text.endswith(")") else text + " (default: %(default)s)"
        return text


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; its subcommands' parsers are CommandParsers too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_alias(parser: argparse.ArgumentParser, option: argparse.Action, *flags: str) -> None:
    """Accept ``flags`` as other spellings of ``option`` (which takes a value), hidden from --help;
    the option's own help should name them."""
    same: dict[str, Any] = {"type": option.type} if option.type is not None else {}
    parser.add_argument(
        *flags,
        dest=option.dest,
        choices=option.choices,
        metavar=option.metavar,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
        **same,
    )
