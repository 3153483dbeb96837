"""``rheumai train`` and ``rheumai evaluate`` for every task (:mod:`rheumai.engine.run`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model from a config (TOML) on a cohort manifest",
        description="The config's `task` (else --task, else cervical_ra) trains on the manifest's train rows. "
                    "Writes config.toml, history.csv, state/ (resume) and model/ (model.safetensors + "
                    "model_card.json). Multi-GPU/CPU: torchrun --nproc_per_node N $(which rheumai) train ...")
    p.add_argument("--config", required=True, type=Path, help="TOML config (configs/<task>.toml)")
    p.add_argument("--manifest", type=Path, help="the task's cohort table (default: from the config)")
    p.add_argument("--out", type=Path, help="output folder (default: runs/<config name>)")
    p.add_argument("--task", help="task when the config names none (rheumai tasks)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--epochs", type=int, help="override [train] epochs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_train)

    e = subparsers.add_parser(
        "evaluate", help="evaluate a checkpoint on a manifest split; writes a report",
        description="The task comes from the model card. Binary tasks: ROC AUC with CI, confusion matrix, "
                    "sensitivity/specificity/PPV/NPV with CIs at the operating threshold, calibration; "
                    "report.md/.html + CSV + PNG.")
    e.add_argument("--model", required=True, type=Path, help="checkpoint folder (model.safetensors + model_card.json)")
    e.add_argument("--manifest", required=True, type=Path, help="the task's cohort table")
    e.add_argument("--split", choices=["train", "val", "test", "all"],
                   help="rows to evaluate (default: test; with --external: all)")
    e.add_argument("--out", required=True, type=Path, help="report folder")
    e.add_argument("--threshold-rule", help="youden | fixed:<p> | sensitivity:<min> (default: the card's threshold)")
    e.add_argument("--auc-ci", choices=["delong", "bootstrap"])
    e.add_argument("--n-bootstrap", type=int)
    e.add_argument("--alpha", type=float, help="1 - confidence level of the intervals")
    e.add_argument("--seed", type=int)
    e.add_argument("--batch-size", type=int)
    e.add_argument("--device", choices=["auto", "cpu", "cuda"])
    e.add_argument("--external", action="store_true",
                   help="external validation: the manifest is another site's cohort; discrimination and calibration "
                        "(intercept, slope) side by side with the development figures in the model card")
    e.add_argument("--recalibrate", type=Path, metavar="DIR",
                   help="with --external: write a recalibrated checkpoint (same weights, logistic intercept / slope "
                        "fitted on this cohort, recorded in its card) into DIR")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_run_evaluate)


def _run_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig, load_config
    from .engine.run import config_task, train
    from .errors import InputError

    config = args.config
    if args.epochs is not None:
        config = load_config(args.config, task=config_task(args.config, args.task))
        if not isinstance(config, TrainConfig):
            raise InputError(args.config, "--epochs: set the epochs in this task's config")
        config.train.epochs = args.epochs
        config.validate()
    result = train(config, args.manifest, args.out or Path("runs") / args.config.stem, task=args.task,
                   resume=args.resume, show_progress=not args.quiet)
    return 0 if getattr(result, "checkpoint", None) is not None and not getattr(result, "stopped", False) else 1


def _run_evaluate(args: argparse.Namespace) -> int:
    from .engine.run import evaluate

    names = ("threshold_rule", "auc_ci", "n_bootstrap", "alpha", "seed", "batch_size", "device")
    kw = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.external or args.recalibrate:
        kw.update(external=args.external, recalibrate_out=args.recalibrate)
    evaluate(args.model, args.manifest, args.out, split=args.split or ("all" if args.external else "test"),
             show_progress=not args.quiet, **kw)
    return 0
