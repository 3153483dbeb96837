"""Off-screen rendering of a written result scene (the Extensions Index screenshot path)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install rheumai[mrml])")

from rheumai_mrml.render import render_scene_png  # noqa: E402
from rheumai_mrml.scene import write_result_scene  # noqa: E402


def test_rendered_scene_shows_study_overlay_and_result(tmp_path, t2_crop_path):
    src = sitk.ReadImage(str(t2_crop_path), sitk.sitkFloat32)
    shape = sitk.GetArrayFromImage(src).shape
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    sal = sitk.GetImageFromArray(np.clip(1 - (j**2 + i**2), 0, 1).astype(np.float32))
    sal.CopyInformation(src)
    result = {"source_path": "t2.nii.gz", "probability": 0.8125, "label": 1, "threshold": 0.4, "model_id": "m"}
    with_sal = write_result_scene(tmp_path / "a.mrb", src, sal, result, opacity=1.0)
    without = write_result_scene(tmp_path / "b.mrb", src, None, result)
    try:
        png_a = render_scene_png(with_sal, tmp_path / "a.png", view_size=(160, 120))
        png_b = render_scene_png(without, tmp_path / "b.png", view_size=(160, 120))
    except RuntimeError as exc:  # no off-screen OpenGL on this machine
        pytest.skip(f"no off-screen rendering: {exc}")
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(png_a)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(png_b)))
    assert a.shape[:2] == (120 + 70, 2 * 160)
    views_a, views_b = a[70:].astype(int), b[70:].astype(int)
    assert views_b.std() > 5  # the study is there
    # the inferno overlay adds colour (red > blue) where the grey study had none
    assert (views_a[..., 0] - views_a[..., 2]).mean() > (views_b[..., 0] - views_b[..., 2]).mean() + 5
