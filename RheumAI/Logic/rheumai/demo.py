"""`rheumai demo` and `rheumai synth`: a task's demo and generated cohort (``api["demo"]``,
``api["synth"]`` of the registered task; default ``cervical_ra``)."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

from .errors import InputError

# Options only some tasks' entry points take (passed on when given; refused by the others).
DEMO_OPTIONS = ("epochs", "workers", "family", "compare")


def task_entry(task: str, name: str) -> Any:
    """The registered ``task``'s ``api[name]`` callable; InputError naming the tasks that have one."""
    from .tasks import get_task, list_tasks

    try:
        t = get_task(task)
    except KeyError as exc:
        raise InputError(None, f"--task {task!r}: {exc.args[0]}") from None
    if name not in t.api:
        having = ", ".join(x.name for x in list_tasks() if name in x.api)
        raise InputError(None, f"task {task!r} declares no {name}; tasks with one: {having}")
    return t.entry(name)


def _call(task: str, name: str, out: Path, extra: dict[str, Any], **kw: Any) -> Any:
    entry = task_entry(task, name)
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
    extra = {k: getattr(a, k) for k in DEMO_OPTIONS if getattr(a, k) not in (None, False)}
    run_task_demo(a.task, a.out, a.seed, a.n, **extra)
    return 0


def _synth(a: argparse.Namespace) -> int:
    extra = {k: v for k, v in vars(a).items() if k not in ("command", "func", "task", "out", "n", "seed")}
    kw = {"seed": a.seed} if a.n is None else {"seed": a.seed, "n": a.n}
    print(f"wrote {a.task} cohort to {a.out}: {_call(a.task, 'synth', a.out, extra, **kw)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate a cohort with known truth, train, evaluate, predict, explain")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--task", default="cervical_ra", help="registered task whose demo to run (default cervical_ra)")
    p.add_argument("--n", type=int, default=None, help="subjects to generate (the task's default)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("cervical_ra demo")
    g.add_argument("--epochs", type=int, default=None, help="override the demo configuration's epochs")
    g.add_argument("--workers", type=int, default=None, help="processes generating the cohort (2)")
    g.add_argument("--family", choices=["resnet", "slice_attention"], default=None,
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
    opt = dict(default=argparse.SUPPRESS)
    g = s.add_argument_group("cervical_ra generator (defaults: the paper-like cohort)")
    g.add_argument("--prevalence", type=float, help="share of positives among included (0.15)", **opt)
    g.add_argument("--p-intermediate", type=float, help="share with outcome 'intermediate' (0.05)", **opt)
    g.add_argument("--p-baseline-deformity", type=float, help="share with deformity at baseline (0.03)", **opt)
    g.add_argument("--p-short-followup", type=float, help="share with follow-up < 1000 days (0.07)", **opt)
    g.add_argument("--p-followup-series", type=float, help="share whose follow-up holds a T2 SAG series (0.5)", **opt)
    g.add_argument("--p-axial-distractor", type=float, help="share of baselines with a T2 axial series (0.5)", **opt)
    g.add_argument("--deform-mm", type=float, help="B-spline control-point std in mm (2.5)", **opt)
    g.add_argument("--lesion-scale", type=float, help="multiplies the lesion size (1.0)", **opt)
    g.add_argument("--pannus-level", type=float, nargs=2, metavar=("LO", "HI"),
                   help="pannus T2 signal as a fraction of CSF (0.42 0.58)", **opt)
    g.add_argument("--sites", nargs="+", help="site names (A B C)", **opt)
    g.add_argument("--template", dest="template_path", type=Path, help="template T2 (default: the repository's)", **opt)
    g.add_argument("--preview", type=int, metavar="N", help="PNGs of the first N subjects with a lesion", **opt)
    g = s.add_argument_group("negspa generator")
    g.add_argument("--spacing", type=float, help="T1 in-plane step in mm (1.0; T2 x1.25, STIR x1.5)", **opt)
    s.set_defaults(func=_synth)
