"""The ``moekit`` command line: ``moekit <command> [options]`` (also ``python -m moekit``).

Each command lives in its own module, which provides ``add_parser(subparsers) -> ArgumentParser`` and sets
``func(args) -> int`` as the parser's default. To add a command (``bench``, ``check``, ...), write the module
and list it in ``COMMAND_MODULES``; modules are imported only when the parser is built.

What the commands share lives here too: one-line usage errors (``Parser``), help that shows every option's default
(``HelpFormatter``), a rich console that never cuts a table off when the output is not a terminal (``console``),
and plain progress lines where a progress bar would not show (``PlainProgress``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence

from .. import __version__, options

# Module (relative to this package) of each subcommand, in the order `moekit --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (".demo", ".bench", ".check", ".quantize")

# The width of a console that is not a terminal: wider than any table the commands print, so a table prints at its
# natural width and a message stays on one line (rich cuts both to 80 columns by default).
UNLIMITED_WIDTH = 10_000


class Parser(argparse.ArgumentParser):
    """argparse with every usage error on one line: the error, naming the argument and (for a choice) the valid
    values, without the usage block above it."""

    def error(self, message: str):
        commands = getattr(self, "commands", None)
        if commands and "COMMAND" in message:
            message += f" (choose from {', '.join(commands)})"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default: argparse's "(default: X)" where the help does not say it already.
    An option whose default is None (it depends on the machine, or there is none) must say it in its help; an on/off
    flag is off by default and says nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "no default" in text or action.default is None or isinstance(action.default, bool):
            return text
        return super()._get_help_string(action)


def is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: stdout) is a terminal."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def console():
    """A rich console on stdout: the terminal's width on a terminal; elsewhere (a pipe, a file, a CI log) unlimited,
    so tables print whole at their natural width."""
    from rich.console import Console

    return Console() if is_terminal() else Console(width=UNLIMITED_WIDTH)


class PlainProgress:
    """Progress as plain lines, for output that is not a terminal (where a progress bar shows nothing or
    garbage): ``update()`` counts one item done and every ``every``-th (and the last) prints
    ``"<desc>: <done>/<total> <postfix> (<elapsed> s)"`` through ``write`` and flushes."""

    def __init__(self, total: int, desc: str, every: int = 1, write=None):
        self.total, self.desc, self.every, self.done = total, desc, max(1, every), 0
        self.write = write or (lambda line: print(line, flush=True))
        self.start = time.perf_counter()

    def update(self, postfix: str = "") -> None:
        self.done += 1
        if self.done % self.every == 0 or self.done == self.total:
            elapsed = time.perf_counter() - self.start
            self.write(f"{self.desc}: {self.done}/{self.total}{' ' + postfix if postfix else ''} ({elapsed:.1f} s)")


# argparse types: a bad value is one line, "ARG: must be ..., got VALUE"
def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moekit",
        description="Fast, correct Mixture-of-Experts expert layers for Hugging Face transformers.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name, __package__).add_parser(subparsers)
    parser.commands = list(subparsers.choices)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``moekit`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Usage errors, and a MOEKIT_* environment variable moekit does not know, print one line and return 2;
    ``--help``/``--version`` return 0.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exit_:  # argparse exits on --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else 1
    try:
        options.check_environment()  # a bad MOEKIT_BACKEND fails here, before any work
        return int(args.func(args))
    except options.OptionsError as error:
        print(f"moekit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moekit: interrupted", file=sys.stderr)
        return 130
