"""Prediction: study -> task input -> model -> probability, class, saliency volume.

``Predictor`` loads a checkpoint (safetensors + model card, never pickle) once and predicts any
number of studies; ``predict_batch`` runs a list of studies into one folder with resumable,
atomically written ``predictions.csv`` / ``predictions.json``.

The network input is the selection array passed through the card's inference transform
(``input_transform``: optional fixed centre crop, resize to the architecture's ``input_size``; the
identity when those match the selection). The probability is sigmoid(logit) of the card's one-output network; the class is
``probability >= threshold`` with the card's threshold. Saliency maps are computed on the
selection grid (C, H, W) = (slices right -> left, superior -> inferior, anterior -> posterior)
and sent back into the source image's exact grid (LPS) by the imaging core's inverse
(:meth:`SliceSelection.to_source`). See :mod:`rheumai.saliency` for the methods and their limits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .atomic import atomic_path, write_json, write_text
from .checkpoint import load_checkpoint
from .errors import InputError, RheumAIError
from .io import Study, read_study
from .slices import SliceParams, SliceSelection, select_slices

CSV_COLUMNS = ("study", "source_path", "series_uid", "probability", "label", "threshold", "model_id",
               "tta_mean", "tta_std", "saliency", "saliency_file", "montage_file", "result_file",
               "scene_file", "error")


@dataclass
class PredictionResult:
    """One study's prediction. Arrays are on the selection grid; ``saliency_volume`` is in the source grid."""

    probability: float
    label: int
    threshold: float
    model_id: str
    series_uid: str | None
    source_path: str | None
    selection: SliceSelection
    saliency_method: str | None = None
    target_layer: str | None = None
    saliency_grid: np.ndarray | None = None  # float32 (C, H, W) in [0, 1]
    saliency_volume: sitk.Image | None = None  # source geometry (LPS), float32 in [0, 1]
    tta_mean: float | None = None
    tta_std: float | None = None
    tta: dict[str, Any] | None = None  # summary + per-variant probabilities
    sanity: dict[str, Any] | None = None
    source_image: sitk.Image | None = field(default=None, repr=False)
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no arrays or images)."""
        return {"source_path": self.source_path, "series_uid": self.series_uid,
                "probability": self.probability, "label": self.label, "threshold": self.threshold,
                "model_id": self.model_id, "saliency": self.saliency_method, "target_layer": self.target_layer,
                "saliency_note": None if self.saliency_method in (None, "gradxinput") else
                "one in-plane map for the 6-slice input, repeated on every slice (slices are channels)",
                "tta_mean": self.tta_mean, "tta_std": self.tta_std, "tta": self.tta, "sanity": self.sanity,
                "selection": {"grid": self.selection.grid.to_dict(), "params": self.selection.params.to_dict()},
                "timings_s": self.timings_s}


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RheumAIError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return dev


class Predictor:
    """A loaded model with its card; ``predict`` runs one study.

    checkpoint_dir: a RheumAI checkpoint folder (``model.safetensors`` + ``model_card.json``).
    Pickled checkpoints (``.pt``, ``.pth``, ``.ckpt``...) are refused with an InputError.
    """

    def __init__(self, checkpoint_dir: str | Path, device: str | torch.device = "cpu"):
        self.device = _resolve_device(device)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.model, self.card = load_checkpoint(checkpoint_dir, device=self.device)
        self.model.eval()
        self.params = SliceParams.from_dict(self.card["preprocessing"])
        self.threshold = float(self.card["threshold"])
        self.model_id = str(self.card.get("model_id", "unknown"))
        self._to_input, self._from_input = _input_transform(self.card, self.params)

    def select(self, source: str | Path | Study | sitk.Image, series_uid: str | None = None) -> tuple[SliceSelection, sitk.Image]:
        """The task input of ``source`` (file / DICOM folder / Study / LPS image) and its source image."""
        if isinstance(source, (str, Path)):
            source = read_study(source, series_uid=series_uid)
        image = source.image if isinstance(source, Study) else source
        return select_slices(source, self.params), image

    def predict(self, source: str | Path | Study | sitk.Image, saliency: str | None = "gradcam",
                target_layer: str | None = None, tta: int = 0, sanity: bool = False,
                series_uid: str | None = None, saliency_on_grid: bool = False,
                **saliency_options: Any) -> PredictionResult:
        """Predict one study; see :class:`PredictionResult`.

        saliency: "gradcam" (default; one forward pass at the default layer), "gradcampp",
        "occlusion", "gradxinput" or None. tta: number of test-time variants (0: none).
        sanity: run the randomisation and deletion/insertion checks (needs a saliency method).
        saliency_on_grid: return ``saliency_volume`` on the 1 mm selection grid instead of the source grid.
        """
        from .saliency import compute_saliency, saliency_volume

        t = {"start": time.perf_counter()}
        sel, image = self.select(source, series_uid)
        t["slices"] = time.perf_counter()
        x = self._to_input(sel.array)[None].to(self.device)
        grid_map = input_map = None
        if saliency:
            logits, maps = compute_saliency(self.model, x, saliency, target_layer, **saliency_options)
            input_map = maps[0]
            grid_map = self._from_input(input_map) * sel.mask
        else:
            with torch.inference_mode():
                logits = self.model(x)
        prob = float(torch.sigmoid(logits[0, 0]).item())
        t["model"] = time.perf_counter()
        volume = None
        if grid_map is not None:
            volume = saliency_volume(sel, grid_map, on_grid=saliency_on_grid)
        t["volume"] = time.perf_counter()
        res = PredictionResult(
            probability=prob, label=int(prob >= self.threshold), threshold=self.threshold, model_id=self.model_id,
            series_uid=sel.provenance.get("series_uid"), source_path=sel.provenance.get("source_path"),
            selection=sel, saliency_method=saliency or None,
            target_layer=(target_layer or _default_layer(self.model)) if saliency in ("gradcam", "gradcampp") else None,
            saliency_grid=grid_map, saliency_volume=volume, source_image=image)
        if tta:
            from .tta import tta_probabilities, tta_summary

            probs = tta_probabilities(self.model, x, int(tta))
            summary = tta_summary(probs)
            res.tta_mean, res.tta_std = summary["mean"], summary["std"]
            res.tta = dict(summary, probabilities=probs.tolist())
        t["tta"] = time.perf_counter()
        if sanity:
            if grid_map is None:
                raise ValueError("sanity checks need a saliency method")
            from .sanity import run_sanity

            res.sanity = run_sanity(self.model, x, input_map, saliency, target_layer, **saliency_options)
        t["sanity"] = time.perf_counter()
        keys = list(t)
        res.timings_s = {k: round(t[k] - t[p], 4) for p, k in zip(keys, keys[1:])}
        return res


def _input_transform(card: dict[str, Any], params: SliceParams) -> tuple[Callable[[np.ndarray], torch.Tensor],
                                                                         Callable[[np.ndarray], np.ndarray]]:
    """The card's inference transform (selection array -> network input) and its inverse for maps.

    When the network input is the selection itself (no crop, same size) both are the identity.
    Otherwise the training area's ``eval_transform_from_card`` (fixed centre crop, bilinear resize
    to ``input_size``) is applied, and maps (C, h, w) on the network input are resized back
    (bilinear) into the crop box of the (C, H, W) selection grid, zero outside it. The crop box is
    found by sending an index image through the same crop, so it is MONAI's, not a re-derivation.
    """
    arch_size = tuple(int(v) for v in card.get("architecture", {}).get("input_size") or params.size)
    frac = float(card.get("input_transform", {}).get("center_crop_fraction", 1.0))
    if arch_size == tuple(params.size) and frac >= 1.0:
        return (lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))), (lambda m: m)
    from .data import eval_transform_from_card

    tf = eval_transform_from_card(card)
    h, w = params.size
    if frac < 1.0:
        from monai.transforms import CenterScaleCrop

        idx = np.asarray(CenterScaleCrop(roi_scale=frac)(np.arange(h * w, dtype=np.int64).reshape(1, h, w)))
        r0, c0 = divmod(int(idx.min()), w)
        r1, c1 = divmod(int(idx.max()), w)
    else:
        r0, c0, r1, c1 = 0, 0, h - 1, w - 1

    def forward(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(tf(np.ascontiguousarray(a, dtype=np.float32))), dtype=torch.float32)

    def inverse(m: np.ndarray) -> np.ndarray:
        from .saliency import upsample

        box = upsample(torch.as_tensor(m, dtype=torch.float32)[None], (r1 - r0 + 1, c1 - c0 + 1))[0]
        out = np.zeros((m.shape[0], h, w), np.float32)
        out[:, r0:r1 + 1, c0:c1 + 1] = box.clamp(0, 1).numpy()
        return out

    return forward, inverse


def _default_layer(model: torch.nn.Module) -> str:
    from .saliency import default_target_layer

    return default_target_layer(model)


# ------------------------------------------------------------------------------------------ outputs

def study_stem(path: str | Path) -> str:
    """A file-name-safe, collision-free stem for a study: its name plus a hash of its resolved path."""
    p = Path(path)
    name = p.name
    for suf in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
            break
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "study"
    digest = hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]
    return f"{name}_{digest}"


def scene_writer() -> Callable[..., Path]:
    """``rheumai_mrml.scene.write_result_scene``, imported lazily; a clear error without slicer-core."""
    try:
        import slicer  # noqa: F401  (slicer-core: Slicer's MRML without Qt)
    except ImportError:
        raise RheumAIError("writing a Slicer scene needs Slicer's MRML libraries: pip install rheumai[mrml]") from None
    try:
        from rheumai_mrml.scene import write_result_scene
    except ImportError as exc:
        raise RheumAIError(f"the scene writer (rheumai_mrml.scene) is not available: {exc}") from None
    return write_result_scene


def write_outputs(res: PredictionResult, out_dir: str | Path, stem: str, fmt: str = "nii.gz",
                  montage: bool = True, scene: bool = False, write_volume: bool = True) -> dict[str, str | None]:
    """Write one study's files into ``out_dir``, each atomically; returns their paths (or None).

    ``<stem>_saliency.<fmt>`` (source geometry), ``<stem>_montage.png`` (the six slices with the
    map), ``<stem>.json`` (the result, with TTA and sanity figures), ``<stem>_sanity.png`` (curves,
    when sanity ran) and ``<stem>.mrb`` (Slicer scene, with ``scene``).
    """
    if fmt not in ("nii.gz", "nrrd", "nii"):
        raise ValueError(f"volume format must be nii.gz, nii or nrrd, not '{fmt}'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str | None] = {"saliency_file": None, "montage_file": None, "result_file": None,
                                    "scene_file": None, "sanity_plot": None}
    if res.saliency_volume is not None and write_volume:
        path = out / f"{stem}_saliency.{fmt}"
        with atomic_path(path) as tmp:
            sitk.WriteImage(res.saliency_volume, str(tmp), useCompression=fmt != "nii")
        files["saliency_file"] = str(path)
    if montage:
        from .montage import save_montage

        title = (f"{Path(res.source_path or stem).name}: p = {res.probability:.3f} "
                 f"(class {res.label} at {res.threshold:.3f}); {res.saliency_method or 'no saliency'}")
        files["montage_file"] = str(save_montage(out / f"{stem}_montage.png", res.selection.array,
                                                 overlay=res.saliency_grid, suptitle=title))
    if res.sanity is not None:
        from .sanity import save_sanity_plot

        files["sanity_plot"] = str(save_sanity_plot(out / f"{stem}_sanity.png", res.sanity, title=stem))
    if scene:
        writer = scene_writer()
        if res.source_image is None:
            raise ValueError("the scene needs the source image")
        files["scene_file"] = str(writer(out / f"{stem}.mrb", res.source_image, res.saliency_volume,
                                         dict(res.to_dict(), files=dict(files))))
    files["result_file"] = str(write_json(out / f"{stem}.json", dict(res.to_dict(), files=files)))
    return files


# ------------------------------------------------------------------------------------------ batches

def _read_previous(out: Path) -> list[dict[str, Any]]:
    path = out / "predictions.json"
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data["predictions"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(path, f"cannot resume: previous results unreadable ({exc}); move the file away") from None
    return list(rows)


def _write_tables(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    write_text(out / "predictions.csv", buf.getvalue())
    write_json(out / "predictions.json", dict(meta, predictions=rows))


def predict_batch(studies: Sequence[str | Path], checkpoint_dir: str | Path, out_dir: str | Path,
                  progress: Callable[[int, int, str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None, saliency: str | None = "gradcam",
                  write_volumes: bool = True, target_layer: str | None = None, tta: int = 0,
                  sanity: bool = False, scene: bool = False, fmt: str = "nii.gz", device: str = "cpu",
                  show_progress: bool = True, predictor: Predictor | None = None) -> list[dict[str, Any]]:
    """Predict many studies (files or DICOM folders) with the model loaded once.

    After every study ``out_dir/predictions.csv`` and ``predictions.json`` are rewritten atomically,
    so an interrupted run leaves consistent files. Studies already predicted by the same model
    (same resolved path and model_id, no error) are skipped; a study that fails is recorded with
    its ``error`` and the batch goes on (it is retried on the next run). ``progress(i, n, study)``
    is called after each study; ``should_stop()`` is checked before each one (cancel).
    Returns all rows (previous and new).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if scene:
        scene_writer()  # fail before the batch, not once per study
    pred = predictor or Predictor(checkpoint_dir, device=device)
    meta = {"model_id": pred.model_id, "checkpoint": str(Path(checkpoint_dir).resolve()),
            "threshold": pred.threshold, "task": pred.card.get("task")}
    rows = _read_previous(out)
    done = {(r.get("source_path"), r.get("model_id")) for r in rows if not r.get("error")}
    from tqdm.auto import tqdm

    todo = list(studies)
    bar = tqdm(todo, desc="predict", unit="study", disable=not show_progress)
    for i, study in enumerate(bar):
        if should_stop is not None and should_stop():
            tqdm.write("predict: stopped on request")
            break
        key = (str(Path(study).resolve()), pred.model_id)
        if key in done:
            if progress:
                progress(i + 1, len(todo), str(study))
            continue
        row: dict[str, Any] = {"study": str(study), "source_path": key[0], "model_id": pred.model_id,
                               "threshold": pred.threshold, "saliency": saliency}
        try:
            res = pred.predict(study, saliency=saliency, target_layer=target_layer, tta=tta, sanity=sanity)
            files = write_outputs(res, out, study_stem(study), fmt=fmt, scene=scene, write_volume=write_volumes)
            row.update(series_uid=res.series_uid, probability=res.probability, label=res.label,
                       tta_mean=res.tta_mean, tta_std=res.tta_std, error=None,
                       **{k: v for k, v in files.items() if k in CSV_COLUMNS})
        except Exception as exc:  # noqa: BLE001  a bad study is reported and skipped, never fatal
            row["error"] = f"{type(exc).__name__}: {exc}"
            tqdm.write(f"predict: skipped {study}: {row['error']}")
        rows = [r for r in rows if (r.get("source_path"), r.get("model_id")) != key] + [row]
        if not row.get("error"):
            done.add(key)
        _write_tables(out, rows, meta)
        if progress:
            progress(i + 1, len(todo), str(study))
    bar.close()
    if not (out / "predictions.json").exists():
        _write_tables(out, rows, meta)
    return rows
