"""``prunekit3d demo``: argument parsing, then the Python API.

The command is ``(help line, add_arguments(parser), run(args) -> exit code)`` as :data:`prunekit3d.cli.COMMANDS`
holds it. Bad input raises ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` with one line naming the
problem and the fix; ``prunekit3d.cli.main`` prints it and exits 2.
"""

from __future__ import annotations

import argparse

__all__ = ["COMMAND", "add_demo_arguments", "run_demo"]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="prunekit3d-demo", metavar="DIR", help="output directory (prunekit3d-demo)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run_demo(args: argparse.Namespace) -> int:
    from prunekit3d.recipes.demo import run_demo as demo

    demo(args.out, device=args.device, overwrite=args.overwrite)
    return 0


COMMAND = ("compress a DynUNet on the bundled sample CT and show before / after", add_demo_arguments, run_demo)
