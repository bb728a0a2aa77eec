"""Command line: a thin layer that parses arguments and calls the Python API.

Each sub-command lives in its own module (``prunekit3d/cli/<command>.py``) and is registered in ``COMMANDS``;
the work itself is done by the library modules so that the CLI and Python users share one code path.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from prunekit3d import __version__

__all__ = ["main", "build_parser"]

#: name -> (help line, function adding the arguments, function running the command)
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _commands() -> dict[str, Command]:
    # The command modules import heavy libraries (MONAI, fvcore) only when a command runs.
    from prunekit3d.cli import compress, demo, predict, quantize, report, train

    return {"demo": demo.COMMAND, "compress": compress.COMMAND, "quantize": quantize.COMMAND,
            "predict": predict.COMMAND, "report": report.COMMAND, "train": train.COMMAND}


COMMANDS: dict[str, Command] = _commands()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunekit3d",
        description="Make 3-D segmentation networks small and fast: wrap, prune progressively, slim.",
    )
    parser.add_argument("--version", action="version", version=f"prunekit3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_line, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_line, description=help_line))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command][2](args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, TypeError) as err:
        print(f"prunekit3d {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
