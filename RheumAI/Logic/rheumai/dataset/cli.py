"""`rheumai dataset index | build` sub-commands (registered by rheumai.cli)."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dataset", help="build a training dataset from a DICOM export and a label sheet",
                              description="Index a DICOM export (or take a table of images), then build a dataset "
                                          "(cohort, flow, split, cache, manifest).")
    sub = p.add_subparsers(dest="dataset_command", metavar="STEP")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    pi = sub.add_parser("index", help="index DICOM headers under a folder (incremental)")
    pi.add_argument("root", type=Path, help="archive folder (any nesting, any file names)")
    pi.add_argument("--out", type=Path, required=True, help="index file (SQLite), created or updated")
    pi.add_argument("--oblique-deg", type=float, default=30.0,
                    help="max angle (deg) between slice normal and an axis still called sagittal/coronal/axial")
    pi.add_argument("--unreadable-csv", type=Path, help="write every unreadable file with its reason here")
    pi.set_defaults(func=_index)

    pd_ = sub.add_parser("make-demo", help="write a synthetic export + label sheet from a real DICOM series",
                         description="Re-identified copies of SOURCE (a DICOM series folder) as a nested export of "
                                     "N patients with a label sheet whose inclusion flow is known "
                                     "(rheumai.dataset.archive_tools.DEMO_SCENARIOS).")
    pd_.add_argument("source", type=Path, help="DICOM series folder to copy (e.g. Testing/Data/dicom_t1_sag_HFS)")
    pd_.add_argument("root", type=Path, help="export folder to write")
    pd_.add_argument("--labels", type=Path, required=True, help="label sheet CSV to write")
    pd_.add_argument("--patients", type=int, default=44)
    pd_.add_argument("--downsample", type=int, default=2, help="in-plane stride (smaller files)")
    pd_.add_argument("--seed", type=int, default=0)
    pd_.set_defaults(func=_make_demo)

    pb = sub.add_parser("build", help="labels -> cohort -> flow report -> split -> cache -> manifest")
    pb.add_argument("--index", type=Path, help="index from `rheumai dataset index` (with --labels)")
    pb.add_argument("--labels", type=Path, help="label sheet CSV (see rheumai.dataset.labels)")
    pb.add_argument("--images", type=Path, metavar="TABLE",
                    help="instead of --index/--labels: a CSV of patient_id, one column per input role of the task "
                         "(or image), its ROI, outcome or label [, site, split, followup_days, clinical columns]")
    pb.add_argument("--out", type=Path, required=True, help="output folder")
    g = pb.add_argument_group("cohort rules")
    g.add_argument("--min-followup-days", type=int, default=1000)
    g.add_argument("--intermediate", choices=("exclude", "negative", "positive"), default="exclude")
    g.add_argument("--keep-baseline-deformity", action="store_true", help="do not exclude deformity at baseline")
    g.add_argument("--min-slices", type=int, default=8, help="fewest slices for the baseline series")
    g.add_argument("--date-tolerance-days", type=int, default=0, help="baseline study date tolerance (days)")
    g.add_argument("--allow-fat-suppressed", action="store_true")
    g.add_argument("--regions", nargs="+", default=["cervical"], help="accepted regions (unknown is accepted too)")
    s = pb.add_argument_group("split")
    s.add_argument("--split", type=float, default=0.6, help="train fraction, rest is test (default 0.6)")
    s.add_argument("--val", type=float, default=0.0, help="fraction of train moved to val")
    s.add_argument("--kfold", type=int, default=0, help="k folds over the train part")
    s.add_argument("--test-site", action="append", default=[], help="external-site split: test site (repeatable)")
    s.add_argument("--seed", type=int, default=0)
    c = pb.add_argument_group("task and its input")
    c.add_argument("--task", default="cervical_ra",
                   help="registered task (`rheumai tasks`); --index builds cervical_ra")
    c.add_argument("--clinical", type=Path, help="with --images: a CSV of clinical columns keyed by patient_id")
    c.add_argument("--slices", type=int, help="slices per input (n_slices; cervical 6)")
    c.add_argument("--spacing", type=float, help="cervical: sampling step in mm (1.0)")
    c.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input pixels (cervical 512 512)")
    c.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any preprocessing parameter of the task, value as JSON (e.g. slice_spacing_mm=4)")
    c.add_argument("--workers", type=int, default=1, help="processes computing the cache")
    c.add_argument("--flow-only", action="store_true", help="validate, report the flow and split; no cache/manifest")
    pb.set_defaults(func=_build)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM ends the command like an error (exit 143): pool workers are stopped and the
    staging folder is removed on the way out, so ``out`` stays as it was."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield
        return
    old = signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _index(args: argparse.Namespace) -> int:
    from ..atomic import write_text
    from .index import index_archive

    summary = index_archive(args.root, args.out, oblique_deg=args.oblique_deg)
    print(summary.text())
    if args.unreadable_csv:
        from .flow import csv_text

        write_text(args.unreadable_csv, csv_text(["path", "reason"], [list(r) for r in summary.unreadable]))
    return 0


def _make_demo(args: argparse.Namespace) -> int:
    from .archive_tools import write_demo_archive

    d = write_demo_archive(args.source, args.root, args.labels, n_patients=args.patients,
                           downsample=args.downsample, seed=args.seed)
    print(f"wrote {len(d.scenarios)} patients under {d.root} and the label sheet {d.labels_csv}")
    return 0


def _params(args: argparse.Namespace) -> dict[str, object]:
    """Preprocessing overrides from --slices / --spacing / --size / --param; ValueError on unknown keys."""
    from ..engine.batch import parse_pairs
    from .build import task_params

    out: dict[str, object] = {k: v for k, v in (("n_slices", args.slices), ("spacing_mm", args.spacing),
                                                ("size", args.size)) if v is not None}
    for key, value in parse_pairs(args.param, "--param").items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    known = task_params(args.task, None)
    unknown = sorted(set(out) - set(known))
    if unknown:
        raise ValueError(f"task {args.task} has no preprocessing parameter(s) {', '.join(unknown)} "
                         f"(it has: {', '.join(known)})")
    return out


def _build(args: argparse.Namespace) -> int:
    from .build import build_dataset, build_image_dataset
    from .cohort import CohortRules, ImageRules
    from .split import SplitConfig

    dicom = args.images is None and args.index is not None and args.labels is not None
    table = args.images is not None and args.index is None and args.labels is None
    try:
        if not (dicom or table):
            raise ValueError("give either --images TABLE, or both --index and --labels")
        if dicom and (args.task != "cervical_ra" or args.clinical):
            raise ValueError("--index / --labels build the cervical_ra task; for another task or "
                             "--clinical give --images TABLE")
        image_rules = ImageRules(min_followup_days=args.min_followup_days, intermediate=args.intermediate,
                                 exclude_baseline_deformity=not args.keep_baseline_deformity)
        rules = CohortRules(**image_rules.to_dict(), min_slices=args.min_slices,
                            baseline_date_tolerance_days=args.date_tolerance_days,
                            allow_fat_suppressed=args.allow_fat_suppressed, regions=tuple(args.regions))
        split = SplitConfig(train_fraction=args.split, val_fraction=args.val, kfold=args.kfold,
                            test_sites=tuple(args.test_site), seed=args.seed)
        params = _params(args)
        if args.task == "cervical_ra":
            from ..tasks.cervical_ra.slices import SliceParams

            SliceParams.from_dict({**SliceParams().to_dict(), **params})  # validates
    except (ValueError, KeyError) as exc:
        print(f"rheumai dataset build: error: {exc}", file=sys.stderr)
        return 2
    with _sigterm_as_exit():
        if table:
            res = build_image_dataset(args.images, args.out, image_rules, split, params, workers=args.workers,
                                      compute_cache=not args.flow_only, task=args.task, clinical_csv=args.clinical)
        else:
            res = build_dataset(args.index, args.labels, args.out, rules, split, params, workers=args.workers,
                                compute_cache=not args.flow_only)
    print(res.paths["txt"].read_text(), end="")
    if (c := res.cache) is not None:
        print(f"\ncache: {len(c.computed)} computed, {len(c.reused)} reused, {len(c.failed)} failed")
        print(f"manifest: {res.manifest} ({res.n_included} patients)")
    return 0
