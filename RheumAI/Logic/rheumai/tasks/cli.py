"""`rheumai tasks`: list the registered tasks (inputs, ROI, clinical variables, head, outputs)."""

from __future__ import annotations

import argparse
import json

from . import get_task, list_tasks


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tasks", help="list the registered tasks (seed systems)",
                       description="List the tasks RheumAI knows and what each needs and produces.")
    p.add_argument("name", nargs="?", help="show one task in full")
    p.add_argument("--json", action="store_true", help="print the declarations as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tasks = [get_task(args.name)] if args.name else list_tasks()
    if args.json:
        print(json.dumps([t.describe() for t in tasks], indent=2, default=str))
        return 0
    for t in tasks:
        print(f"{t.name}: {t.title}  [{t.head}]")
        if args.name:
            print(f"  {t.description}\n  reference: {t.reference}")
        for spec in t.inputs:
            print(f"  input {spec.role}: {spec.sequence} ({spec.orientation}) - {spec.description}")
        if t.roi is not None:
            print(f"  roi: {t.roi.kind} - {t.roi.description}")
        if t.clinical:
            print(f"  clinical: {', '.join(c.name for c in t.clinical)}")
        print(f"  outputs: {', '.join(t.outputs)}")
        if t.cli_modules:
            print(f"  commands: {', '.join(t.cli_modules)}")
    return 0
