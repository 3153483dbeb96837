"""Prediction outputs: per-study files and the batch tables, safe under kills and concurrent runs.

Layout of an output folder ``OUT`` (every file written atomically, every name built from data
checked by :func:`rheumai.paths.safe_child`):

``OUT/<key>_saliency[_<role>].<fmt>``  saliency volume per input role, in that series' geometry
``OUT/<key>_montage[_<role>].png``     the network's input slices with the map
``OUT/<key>.json``                     the study's full result (values, TTA, sanity, files)
``OUT/<key>.mrb``                      Slicer scene (optional)
``OUT/rows/<key>.json``                the study's table row: the record of truth for the tables
``OUT/predictions.csv`` / ``.json``    every row of ``OUT/rows``, rebuilt by :func:`merge_tables`

Single-input tasks drop the ``_<role>`` part. Several processes (``--shard i/N``, or two runs by
mistake) may share ``OUT``: each writes its own row files and rebuilds the tables under an
exclusive ``fcntl`` lock on ``OUT/.predictions.lock``, so the last rebuild sees every row.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import SimpleITK as sitk
from isal import igzip

from ..atomic import atomic_path, write_json, write_text
from ..errors import InputError, RheumAIError
from ..montage import save_montage
from ..paths import safe_child

if TYPE_CHECKING:
    from .predict import PredictionResult

ROWS = "rows"
BASE_COLUMNS = ("study", "key", "task", "source_path", "series_uid", "probability", "label", "threshold",
                "model_id", "tta_mean", "tta_std", "saliency", "saliency_file", "montage_file", "result_file",
                "scene_file", "error")
VOLUME_FORMATS = ("nii.gz", "nii", "nrrd")


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


def save_volume(image: sitk.Image, path: Path, fmt: str) -> None:
    """Atomic write. ``nii.gz``: ITK writes plain NIfTI and ISA-L's igzip compresses it at level 1
    (the maps are mostly zeros: higher levels cost time, not size; ITK's zlib took 5x longer)."""
    with atomic_path(path) as tmp:
        if fmt != "nii.gz":
            sitk.WriteImage(image, str(tmp), useCompression=fmt == "nrrd", compressionLevel=1)
            return
        raw = tmp.with_name(tmp.name[:-3])
        try:
            sitk.WriteImage(image, str(raw), useCompression=False)
            with open(raw, "rb") as src, igzip.open(tmp, "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        finally:
            raw.unlink(missing_ok=True)


def write_study(res: "PredictionResult", out_dir: str | Path, key: str, fmt: str = "nii.gz", montage: bool = True,
                scene: bool = False, write_volume: bool = True) -> dict[str, Any]:
    """Write one study's files into ``out_dir`` (see module docstring); returns their paths:
    ``saliency_files`` / ``montage_files`` by role, ``saliency_file`` / ``montage_file`` the first role's."""
    if fmt not in VOLUME_FORMATS:
        raise ValueError(f"volume format must be one of {VOLUME_FORMATS}, not '{fmt}'")
    out = Path(out_dir)
    safe_child(out, key, what="study key")
    out.mkdir(parents=True, exist_ok=True)
    many = len(res.maps) > 1
    files: dict[str, Any] = {"sanity_plot": None, "scene_file": None, "saliency_files": {}, "montage_files": {}}
    for role, m in res.maps.items():
        tag = f"_{role}" if many else ""
        if write_volume and m.volume is not None:
            path = safe_child(out, key, f"_saliency{tag}.{fmt}", what="study key")
            save_volume(m.volume, path, fmt)
            files["saliency_files"][role] = str(path)
        if montage:
            name = res.study_id or Path(res.source_path or "image").name
            head = (f"{name}: {res.values['summary']}" if res.values.get("summary")  # non-binary tasks
                    else f"{name}: p = {res.probability:.3f} (class {res.label} at {res.threshold:.3f})")
            path = safe_child(out, key, f"_montage{tag}.png", what="study key")
            title = f"{head}; {res.saliency_method}{' - ' + role if many else ''}"
            files["montage_files"][role] = str(save_montage(path, m.images, overlay=m.overlay, titles=m.titles,
                                                            suptitle=title))
    first = next(iter(res.maps), None)
    files["saliency_file"] = files["saliency_files"].get(first)
    files["montage_file"] = files["montage_files"].get(first)
    if res.sanity is not None:
        from ..sanity import save_sanity_plot

        files["sanity_plot"] = str(save_sanity_plot(safe_child(out, key, "_sanity.png"), res.sanity, title=key))
    if scene:
        role = first or next(iter(res.source_images), None)
        if res.source_images.get(role) is None:
            raise ValueError("the scene needs the source image")
        volume = res.maps[role].volume if role in res.maps else None
        files["scene_file"] = str(scene_writer()(safe_child(out, key, ".mrb"), res.source_images[role], volume,
                                                 dict(res.to_dict(), files=dict(files))))
    files["result_file"] = str(write_json(safe_child(out, key, ".json"), dict(res.to_dict(), files=files)))
    return files


def put_row(out_dir: str | Path, row: dict[str, Any]) -> Path:
    """Write one study's row to ``out_dir/rows/<row['key']>.json`` (atomic)."""
    return write_json(safe_child(Path(out_dir) / ROWS, row["key"], ".json", what="study key"), row)


class RowReader:
    """Reads ``out_dir/rows/*.json``, re-parsing only files that changed since the last call."""

    def __init__(self, out_dir: str | Path):
        self.folder = Path(out_dir) / ROWS
        self._cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}

    def read(self) -> list[dict[str, Any]]:
        """All rows, in the order they were finished (``finished`` time, then key)."""
        rows = []
        for entry in os.scandir(self.folder) if self.folder.is_dir() else ():
            if entry.name.startswith(".") or not entry.name.endswith(".json"):
                continue  # temporary files of atomic writes in flight
            try:
                sig = (entry.stat().st_mtime_ns, entry.stat().st_size)
            except FileNotFoundError:
                continue
            hit = self._cache.get(entry.name)
            if hit is None or hit[0] != sig:
                try:
                    hit = self._cache[entry.name] = (sig, json.loads(Path(entry.path).read_text(encoding="utf-8")))
                except (OSError, json.JSONDecodeError) as exc:
                    raise InputError(entry.path, f"unreadable result row ({exc}); delete it to predict that "
                                                 "study again") from None
            rows.append(hit[1])
        return sorted(rows, key=lambda r: (r.get("finished", 0.0), str(r.get("key"))))


def merge_tables(out_dir: str | Path, meta: dict[str, Any], reader: RowReader | None = None) -> list[dict[str, Any]]:
    """Rebuild ``predictions.csv`` (BASE_COLUMNS, then the rows' other scalar fields in first-seen
    order) and ``predictions.json`` (meta + full rows) from the row files, under the folder's lock
    (released by the kernel if the process dies). Returns the rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".predictions.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        rows = (reader or RowReader(out)).read()
        cols = list(BASE_COLUMNS)
        cols += dict.fromkeys(k for r in rows for k, v in r.items() if k not in cols and k not in ("finished", "files")
                              and not isinstance(v, (dict, list)))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in cols} for r in rows)
        write_text(out / "predictions.csv", buf.getvalue())
        write_json(out / "predictions.json", dict(meta, predictions=rows))
    return rows


def merge_folders(sources: Sequence[str | Path], out_dir: str | Path) -> list[dict[str, Any]]:
    """Merge output folders (e.g. shards) into ``out_dir``: every source's row files and per-study
    files are copied in (a study in several sources keeps the row without error, then the latest;
    file paths in the rows are moved into ``out_dir``), the tables rebuilt. Returns the rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {}
    for src in map(Path, sources):
        if not (src / ROWS).is_dir():
            raise InputError(src, f"no {ROWS}/ folder: not a rheumai predict output folder")
        if src.resolve() == out.resolve():
            continue
        try:
            meta = {k: v for k, v in json.loads((src / "predictions.json").read_text(encoding="utf-8")).items()
                    if k != "predictions"} or meta
        except (OSError, json.JSONDecodeError):
            pass
        s = str(src.resolve()) + os.sep

        def move(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: move(x) for k, x in v.items()}
            return str(out.resolve() / v[len(s):]) if isinstance(v, str) and v.startswith(s) else v

        for row in RowReader(src).read():
            dest = safe_child(out / ROWS, row["key"], ".json", what="study key")
            if dest.is_file():
                old = json.loads(dest.read_text(encoding="utf-8"))
                if (not old.get("error")) and (row.get("error") or old.get("finished", 0) >= row.get("finished", 0)):
                    continue
            for f in src.iterdir():  # the study's own files: <key>.json, <key>_saliency..., <key>.mrb
                if f.is_file() and f.name.startswith((row["key"] + "_", row["key"] + ".")):
                    with atomic_path(out / f.name) as tmp:
                        shutil.copyfile(f, tmp)
            put_row(out, move(row))
    return merge_tables(out, meta)
