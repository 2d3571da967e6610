"""The ``moekit`` command line: ``moekit <command> [options]`` (also ``python -m moekit``).

Each command lives in its own module, which provides ``add_parser(subparsers) -> ArgumentParser`` and sets
``func(args) -> int`` as the parser's default. To add a command (``bench``, ``check``, ...), write the module
and list it in ``COMMAND_MODULES``; modules are imported only when the parser is built.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__

# Module (relative to this package) of each subcommand, in the order `moekit --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (".demo", ".bench", ".check")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit",
        description="Fast, correct Mixture-of-Experts expert layers for Hugging Face transformers.",
    )
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name, __package__).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``moekit`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Usage errors print argparse's message and return 2; ``--help``/``--version`` return 0.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exit_:  # argparse exits on --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else 1
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("moekit: interrupted", file=sys.stderr)
        return 130
