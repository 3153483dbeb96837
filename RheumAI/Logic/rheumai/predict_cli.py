"""`rheumai predict`: any task's checkpoint on studies, and `rheumai predict merge` for shard folders."""

from __future__ import annotations

import argparse
from pathlib import Path

from .saliency import METHODS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="predict studies with a trained checkpoint (any task) and explain the predictions",
        description="The task comes from the checkpoint's model card. Single-input tasks (cervical_ra) take "
                    "STUDY paths (image file or DICOM folder); tasks with several inputs take one study as "
                    "--input ROLE=PATH ... --roi FILE --clinical NAME=VALUE, or many as --cohort TABLE.csv. "
                    "Writes OUT/predictions.csv and .json (resumable; bad studies reported and skipped; several "
                    "processes may share OUT), per study the saliency volume of each input in that series' "
                    "geometry, a PNG montage and a JSON result. 'rheumai predict merge DIR... --out OUT' merges "
                    "shard folders.")
    p.add_argument("studies", nargs="*", metavar="STUDY", help="NIfTI/NRRD/MHA file or DICOM folder")
    p.add_argument("--model", type=Path, help="checkpoint folder (model.safetensors + model_card.json)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--task", default=None, help="task, only for a model card that names none")
    p.add_argument("--input", action="append", default=[], metavar="ROLE=PATH",
                   help="one input series of the study by role (e.g. t1=T1.nii.gz); see 'rheumai tasks'")
    p.add_argument("--roi", default=None, help="region file when the task needs one (NegSpA: box JSON/CSV/.mrk.json)")
    p.add_argument("--clinical", action="append", default=[], metavar="NAME=VALUE",
                   help="clinical value (repeat), e.g. crp=12 inflammatory_back_pain=yes")
    p.add_argument("--id", default=None, help="study ID naming the outputs of an --input study")
    p.add_argument("--cohort", type=Path, default=None,
                   help="study table CSV: ID column (patient_id/study_id/id), one column per input role, roi, "
                        "clinical columns (or clinical.csv beside it)")
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="predict only shard i of N (0-based); 'auto': from a SLURM job array or torchrun's "
                        "RANK/WORLD_SIZE")
    p.add_argument("--workers", type=int, default=2, help="threads reading + preprocessing ahead (0: none)")
    p.add_argument("--batch-size", type=int, default=1, help="studies per forward pass (GPU)")
    p.add_argument("--saliency", choices=["default", *METHODS, "none"], default="default",
                   help="saliency method (default: the task's first: cervical gradxinput_smooth, which localises; "
                        "gradcam is coarse; NegSpA: gradcam per sequence)")
    p.add_argument("--target-layer", default=None, help="Grad-CAM target layer (default: the task's, layer4)")
    p.add_argument("--tta", type=int, default=0, metavar="N", help="test-time augmentation variants (0: off)")
    p.add_argument("--sanity", action="store_true",
                   help="randomisation check and deletion/insertion curves (slow: ~45 extra forward passes)")
    p.add_argument("--scene", action="store_true", help="also write a Slicer scene (.mrb) per study")
    p.add_argument("--format", choices=["nii.gz", "nrrd"], default="nii.gz", help="saliency volume format")
    p.add_argument("--no-volumes", action="store_true", help="do not write saliency volumes")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .engine.batch import inputs_from_args, read_study_table
    from .engine.predict import parse_shard, predict_batch, select_shard, study_key, task_of
    from .engine.write import merge_folders
    from .errors import InputError, RheumAIError

    if args.studies[:1] == ["merge"] and not Path("merge").exists():
        if len(args.studies) < 2:
            raise InputError(None, "rheumai predict merge needs the folders to merge: rheumai predict merge DIR... "
                                   "--out OUT")
        rows = merge_folders(args.studies[1:], args.out)
        bad = sum(bool(r.get("error")) for r in rows)
        print(f"merged {len(args.studies) - 1} folders into {args.out / 'predictions.csv'}: {len(rows)} studies "
              f"({bad} failed)")
        return 1 if bad else 0
    if args.model is None:
        raise InputError(None, "--model is required (a checkpoint folder)")
    saliency = None if args.saliency == "none" else args.saliency
    if args.sanity and saliency is None:
        raise RheumAIError("--sanity needs a saliency method (not --saliency none)")
    task = task_of(args.model, args.task)
    if sum([bool(args.studies), bool(args.input), args.cohort is not None]) != 1:
        raise InputError(None, "give the studies one way: STUDY paths, --input ROLE=PATH ..., or --cohort TABLE.csv")
    if len(task.roles) != 1 and args.studies:
        raise InputError(None, f"task {task.name} has several inputs ({', '.join(task.roles)}): "
                               "give them as --input ROLE=PATH (one study) or --cohort TABLE.csv")
    if args.cohort is not None:
        studies = read_study_table(args.cohort, task)
    elif args.input:
        studies = [inputs_from_args(task, args.input, args.roi, args.clinical, args.id)]
    else:
        studies = [inputs_from_args(task, [f"{task.roles[0]}={s}"], args.roi, args.clinical)
                   for s in args.studies]
    shard = parse_shard(args.shard)
    rows = predict_batch(studies, args.model, args.out, saliency=saliency, target_layer=args.target_layer,
                         tta=args.tta, sanity=args.sanity, scene=args.scene, fmt=args.format,
                         write_volumes=not args.no_volumes, device=args.device, task=args.task,
                         shard=shard, workers=args.workers, batch_size=args.batch_size)
    keys = set()  # this run's studies among all rows of OUT
    for s in select_shard(studies, shard):
        try:
            keys.add(study_key(s, task.roles))
        except InputError:
            pass
    mine = [r for r in rows if r.get("key") in keys or str(r.get("key", "")).startswith("invalid_")]
    failed = [r for r in mine if r.get("error")]
    for r in mine:
        print(f"FAILED  {r['study']}: {r['error']}" if r.get("error")
              else f"{r['summary']}  {r['study']}" if r.get("summary") and r.get("probability") is None
              else f"{r['probability']:.4f}  class {r['label']}  {r['study']}")
    print(f"wrote {args.out / 'predictions.csv'} ({len(mine) - len(failed)} ok, {len(failed)} failed)")
    return 1 if failed else 0  # every study was tried; a failure still shows in the exit status
