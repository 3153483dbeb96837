"""``rheumai train`` and ``rheumai evaluate`` sub-commands (register in rheumai.cli)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model from a config (TOML) on a cohort manifest",
        description="Train on the manifest's train rows; validation = its val rows or a stratified share of "
                    "train. Writes config.toml, history.csv, splits.csv, state/ (resume) and model/ "
                    "(model.safetensors + model_card.json). Multi-GPU/CPU: torchrun --nproc_per_node N "
                    "$(which rheumai) train ...")
    p.add_argument("--config", required=True, type=Path, help="TOML config (see configs/paper.toml)")
    p.add_argument("--manifest", type=Path, help="manifest.csv (default: [data] manifest in the config)")
    p.add_argument("--out", type=Path, help="output folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--epochs", type=int, help="override [train] epochs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_train)

    e = subparsers.add_parser(
        "evaluate", help="evaluate a checkpoint on a manifest split; writes a report",
        description="ROC AUC with CI, confusion matrix, sensitivity/specificity/PPV/NPV/accuracy/F1 with CIs at "
                    "the operating threshold, calibration; report.md/.html + CSV + PNG.")
    e.add_argument("--model", required=True, type=Path, help="checkpoint folder (model.safetensors + model_card.json)")
    e.add_argument("--manifest", required=True, type=Path, help="manifest.csv")
    e.add_argument("--split", choices=["train", "val", "test", "all"],
                   help="rows to evaluate (default: test; with --external: all)")
    e.add_argument("--out", required=True, type=Path, help="report folder")
    e.add_argument("--threshold-rule", help="youden | fixed:<p> | sensitivity:<min> (default: the card's threshold)")
    e.add_argument("--auc-ci", default="delong", choices=["delong", "bootstrap"])
    e.add_argument("--n-bootstrap", type=int, default=2000)
    e.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level of the intervals")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--external", action="store_true",
                   help="external validation: the manifest is another site's cohort; discrimination and calibration "
                        "(intercept, slope) side by side with the development figures in the model card")
    e.add_argument("--recalibrate", type=Path, metavar="DIR",
                   help="with --external: write a recalibrated checkpoint (same weights, logistic intercept / slope "
                        "fitted on this cohort, recorded in its card) into DIR")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_run_evaluate)


def _run_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config)
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
        cfg.validate()
    out = args.out or Path("runs") / args.config.stem
    result = train(cfg, args.manifest, out, resume=args.resume, show_progress=not args.quiet)
    return 0 if result.checkpoint is not None and not result.stopped else 1


def _run_evaluate(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .evaluate import evaluate, validate_external
    from .metrics import parse_threshold_rule

    if args.threshold_rule:
        try:
            parse_threshold_rule(args.threshold_rule)
        except ValueError as exc:
            raise InputError(None, f"--threshold-rule: {exc}") from None
    if args.recalibrate and not args.external:
        raise InputError(None, "--recalibrate needs --external")
    if args.external:
        if args.threshold_rule:
            raise InputError(None, "--external keeps the model card's threshold; drop --threshold-rule")
        validate_external(args.model, args.manifest, args.out, split=args.split or "all",
                          recalibrate_out=args.recalibrate, alpha=args.alpha, n_bootstrap=args.n_bootstrap,
                          seed=args.seed, batch_size=args.batch_size, device=args.device, show_progress=not args.quiet)
        return 0
    evaluate(args.model, args.manifest, args.out, split=args.split or "test", threshold_rule=args.threshold_rule,
             auc_ci=args.auc_ci, n_bootstrap=args.n_bootstrap, alpha=args.alpha, seed=args.seed,
             batch_size=args.batch_size, device=args.device, show_progress=not args.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m rheumai.train_cli train ...``, e.g. under torchrun)."""
    import sys

    from .errors import RheumAIError

    parser = argparse.ArgumentParser(prog="rheumai")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RheumAIError as exc:
        print(f"rheumai {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
