"""The Extensions Index screenshot: a prediction scene on the repository's real cervical T2,
written by RheumAI and rendered off-screen (:mod:`rheumai_mrml.render`).

    python -m rheumai_mrml.screenshot RheumAI/Resources/Screenshots/RheumAI_screenshot01.png [--model DIR]

With ``--model`` (e.g. the checkpoint ``make demo`` trains) the scene shows that model's
prediction; without it, a seeded untrained ResNet-18 (its model id says so), which shows what
the module displays, not a meaningful saliency.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Sequence

T2 = Path(__file__).resolve().parents[2] / "Testing" / "Data" / "cervical_t2_sag" / "t2.nii.gz"


def untrained_model(folder: Path) -> Path:
    """A seeded, untrained cervical checkpoint (ResNet-18, 6 slices at 2 mm, 128 x 128)."""
    import torch

    from rheumai.checkpoint import save_checkpoint
    from rheumai.tasks.cervical_ra.model import build_model, default_architecture
    from rheumai.tasks.cervical_ra.slices import SliceParams

    torch.manual_seed(0)
    arch = default_architecture(18, 6, (128, 128))
    card = {"task": "cervical_ra", "architecture": arch, "threshold": 0.5, "threshold_rule": "fixed",
            "preprocessing": SliceParams(size=(128, 128), spacing_mm=2.0).to_dict(), "training_data": {},
            "metrics": {}, "model_id": "untrained-resnet18-seed0"}
    return save_checkpoint(folder / "model", build_model(arch), card)


def make_screenshot(out_png: str | Path, model: str | Path | None = None, study: str | Path = T2,
                    scene_path: str | Path | None = None) -> Path:
    """Predict ``study`` with Grad-CAM, write the scene (.mrb), render it to ``out_png``."""
    from .logic import RheumAIConsoleLogic
    from .render import render_scene_png
    from .scene import new_scene, save_scene

    with tempfile.TemporaryDirectory(prefix="rheumai-screenshot-") as tmp:
        model = Path(model) if model else untrained_model(Path(tmp))
        ctx = new_scene()
        try:
            logic = RheumAIConsoleLogic(ctx.scene)
            logic.predict(logic.loadVolume(study), model, createNodes=True, saliency="gradcam", opacity=0.5)
            scene = save_scene(ctx.scene, Path(scene_path) if scene_path else Path(tmp) / "screenshot.mrb")
        finally:
            ctx.close()
        return render_scene_png(scene, out_png)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rheumai_mrml.screenshot", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="PNG to write")
    ap.add_argument("--model", help="checkpoint folder (default: a seeded untrained ResNet-18)")
    ap.add_argument("--scene", help="also keep the rendered scene here (.mrb or .mrml)")
    a = ap.parse_args(argv)
    print(make_screenshot(a.out, a.model, scene_path=a.scene))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
