"""`rheumai demo` and `rheumai synth`: a task's demo and generated cohort (``api["demo"]``,
``api["synth"]`` of the registered task; default ``cervical_ra``)."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

from .errors import InputError

# Arguments every task's entry point takes; the task-specific options (parsed only when given) are the rest.
COMMON = ("command", "func", "task", "out", "n", "seed")


def _call(task: str, name: str, out: Path, extra: dict[str, Any], **kw: Any) -> Any:
    """Run the registered ``task``'s ``api[name]`` as ``entry(out, **kw, **extra)``; InputError naming the
    tasks that have one, or the ``extra`` options it does not take."""
    from .tasks import get_task, list_tasks

    try:
        t = get_task(task)
    except KeyError as exc:
        raise InputError(None, f"--task {task!r}: {exc.args[0]}") from None
    if name not in t.api:
        having = ", ".join(x.name for x in list_tasks() if name in x.api)
        raise InputError(None, f"task {task!r} declares no {name}; tasks with one: {having}")
    entry = t.entry(name)
    try:
        inspect.signature(entry).bind(out, **kw, **extra)
    except TypeError:
        raise InputError(None, f"options {', '.join('--' + k.replace('_', '-') for k in extra)} do not apply to "
                               f"the {task} {name}") from None
    return entry(out, **kw, **extra)


def run_task_demo(task: str, out: Path, seed: int, n: int | None, progress: bool = True, **extra: Any) -> Any:
    """Run ``task``'s declared ``demo`` entry point: ``demo(out, seed=, n=, progress=, **extra)``."""
    return _call(task, "demo", out, extra, seed=seed, n=n, progress=progress)


def _demo(a: argparse.Namespace) -> int:
    run_task_demo(a.task, a.out, a.seed, a.n, **{k: v for k, v in vars(a).items() if k not in COMMON})
    return 0


def _synth(a: argparse.Namespace) -> int:
    extra = {k: v for k, v in vars(a).items() if k not in COMMON}
    kw = {"seed": a.seed} if a.n is None else {"seed": a.seed, "n": a.n}
    print(f"wrote {a.task} cohort to {a.out}: {_call(a.task, 'synth', a.out, extra, **kw)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate a cohort with known truth, train, evaluate, predict, explain")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--task", default="cervical_ra", help="registered task whose demo to run (default cervical_ra)")
    p.add_argument("--n", type=int, default=None, help="subjects to generate (the task's default)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("cervical_ra demo", argument_default=argparse.SUPPRESS)
    g.add_argument("--epochs", type=int, help="override the demo configuration's epochs")
    g.add_argument("--workers", type=int, help="processes generating the cohort (2)")
    g.add_argument("--family", choices=["resnet", "slice_attention"],
                   help="network design: resnet (the paper's, slices as channels) or slice_attention")
    g.add_argument("--compare", action="store_true",
                   help="also train the other design on the same cohort and split; print AUC and hit rate side by side")
    p.set_defaults(func=_demo)

    s = sub.add_parser("synth", help="generate a task's cohort with known truth",
                       description="Write a generated cohort (images + label sheet + truth) of a registered task. "
                                   "Same seed, same cohort.")
    s.add_argument("--task", default="cervical_ra", help="registered task (default cervical_ra)")
    s.add_argument("--out", required=True, type=Path, help="output folder")
    s.add_argument("--n", type=int, default=None, help="subjects (the task's default)")
    s.add_argument("--seed", type=int, default=0)
    g = s.add_argument_group("cervical_ra generator (defaults: the paper-like cohort)",
                             argument_default=argparse.SUPPRESS)
    g.add_argument("--prevalence", type=float, help="share of positives among included (0.15)")
    g.add_argument("--p-intermediate", type=float, help="share with outcome 'intermediate' (0.05)")
    g.add_argument("--p-baseline-deformity", type=float, help="share with deformity at baseline (0.03)")
    g.add_argument("--p-short-followup", type=float, help="share with follow-up < 1000 days (0.07)")
    g.add_argument("--p-followup-series", type=float, help="share whose follow-up holds a T2 SAG series (0.5)")
    g.add_argument("--p-axial-distractor", type=float, help="share of baselines with a T2 axial series (0.5)")
    g.add_argument("--deform-mm", type=float, help="B-spline control-point std in mm (2.5)")
    g.add_argument("--lesion-scale", type=float, help="multiplies the lesion size (1.0)")
    g.add_argument("--pannus-level", type=float, nargs=2, metavar=("LO", "HI"),
                   help="pannus T2 signal as a fraction of CSF (0.42 0.58)")
    g.add_argument("--sites", nargs="+", help="site names (A B C)")
    g.add_argument("--template", dest="template_path", type=Path, help="template T2 (default: the repository's)")
    g.add_argument("--preview", type=int, metavar="N", help="PNGs of the first N subjects with a lesion")
    g = s.add_argument_group("negspa generator", argument_default=argparse.SUPPRESS)
    g.add_argument("--spacing", type=float, help="T1 in-plane step in mm (1.0; T2 x1.25, STIR x1.5)")
    s.set_defaults(func=_synth)
