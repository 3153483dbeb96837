"""`rheumai predict`: probability, class, saliency volume (and optionally TTA, sanity, scene) per study."""

from __future__ import annotations

import argparse
from pathlib import Path

from .saliency import METHODS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="predict studies with a trained checkpoint and explain the predictions",
        description="For each study (image file or DICOM folder): the model's probability and class at the "
                    "checkpoint's threshold, into OUT/predictions.csv and .json (resumable: studies already "
                    "done are skipped; bad studies are reported and skipped), plus per study a saliency "
                    "volume in the source's geometry, a PNG montage and a JSON result.")
    p.add_argument("studies", nargs="+", metavar="STUDY", help="NIfTI/NRRD/MHA file or DICOM folder")
    p.add_argument("--model", required=True, type=Path, help="checkpoint folder (model.safetensors + model_card.json)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--saliency", choices=[*METHODS, "none"], default="gradcam",
                   help="saliency method (default gradcam: one forward pass at layer4)")
    p.add_argument("--target-layer", default=None, help="Grad-CAM target layer (default layer4; e.g. layer3)")
    p.add_argument("--tta", type=int, default=0, metavar="N", help="test-time augmentation variants (0: off)")
    p.add_argument("--sanity", action="store_true",
                   help="randomisation check and deletion/insertion curves (slow: ~45 extra forward passes)")
    p.add_argument("--scene", action="store_true", help="also write a Slicer scene (.mrb) per study")
    p.add_argument("--format", choices=["nii.gz", "nrrd"], default="nii.gz", help="saliency volume format")
    p.add_argument("--no-volumes", action="store_true", help="do not write saliency volumes")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .errors import RheumAIError
    from .predict import predict_batch

    saliency = None if args.saliency == "none" else args.saliency
    if args.sanity and saliency is None:
        raise RheumAIError("--sanity needs a saliency method (not --saliency none)")
    rows = predict_batch(args.studies, args.model, args.out, saliency=saliency, target_layer=args.target_layer,
                         tta=args.tta, sanity=args.sanity, scene=args.scene, fmt=args.format,
                         write_volumes=not args.no_volumes, device=args.device)
    wanted = {str(Path(s).resolve()) for s in args.studies}
    mine = [r for r in rows if r.get("source_path") in wanted]
    failed = [r for r in mine if r.get("error")]
    for r in mine:
        if r.get("error"):
            print(f"FAILED  {r['study']}: {r['error']}")
        else:
            print(f"{r['probability']:.4f}  class {r['label']}  {r['study']}")
    print(f"wrote {args.out / 'predictions.csv'} ({len(mine) - len(failed)} ok, {len(failed)} failed)")
    return 1 if failed else 0  # every study was tried; a failure still shows in the exit status
