"""`rheumai` command line. Each area registers its own sub-commands.

A sub-command module exposes ``register(subparsers) -> None`` and sets ``func`` on its parser
(``parser.set_defaults(func=...)``); ``func(args) -> int`` returns the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import RheumAIError

# Commands that belong to no single task (predict reads the task from the model card); each task
# in the registry adds its own (Task.cli_modules), so a new task adds commands without editing this file.
GENERAL_MODULES = ["rheumai.demo", "rheumai.tasks.cli", "rheumai.predict_cli", "rheumai.train_cli"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .tasks import list_tasks

    parser = argparse.ArgumentParser(prog="rheumai", description="Rheumatology imaging AI toolkit")
    parser.add_argument("--version", action="version", version=f"rheumai {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in dict.fromkeys([*GENERAL_MODULES, *(m for task in list_tasks() for m in task.cli_modules)]):
        importlib.import_module(name).register(sub)
    return parser


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
