"""`rheumai` command line. Each area registers its own sub-commands.

A sub-command module exposes ``register(subparsers) -> None`` and sets ``func`` on its parser
(``parser.set_defaults(func=...)``); ``func(args) -> int`` returns the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import RheumAIError

# Sub-command modules, in help order.
COMMAND_MODULES = [
    "rheumai.demo",
    "rheumai.slices_cli",
    "rheumai.dataset.cli",
    "rheumai.train_cli",
    "rheumai.predict_cli",
    "rheumai.synth.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rheumai", description="Rheumatology imaging AI toolkit")
    parser.add_argument("--version", action="version", version=f"rheumai {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RheumAIError as exc:
        print(f"rheumai {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rheumai {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
