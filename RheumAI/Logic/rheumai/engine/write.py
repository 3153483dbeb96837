"""Prediction outputs: per-study files and the batch tables, safe under kills and concurrent runs.

Layout of an output folder ``OUT`` (every file written atomically, every name built from data
checked by :func:`rheumai.paths.safe_child`):

``OUT/<key>_saliency[_<role>].<fmt>``  saliency volume per input role, in that series' geometry
``OUT/<key>_montage[_<role>].png``     the network's input slices with the map
``OUT/<key>.json``                     the study's full result (values, TTA, sanity, files)
``OUT/<key>.mrb``                      Slicer scene (optional)
``OUT/rows/<key>.json``                the study's table row: the record of truth for the tables
``OUT/predictions.csv`` / ``.json``    every row of ``OUT/rows``, rebuilt by :func:`merge_tables`

Single-input tasks drop the ``_<role>`` part. The tables are a view of the row files: several
processes (``--shard i/N`` or two runs by mistake) may write into one ``OUT``; each writes its own
row files and rebuilds the tables under an exclusive ``fcntl`` lock on ``OUT/.predictions.lock``,
so the last rebuild always sees every row written before it and no row is lost.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import SimpleITK as sitk

from ..atomic import atomic_path, write_json, write_text
from ..errors import InputError, RheumAIError
from ..paths import safe_child

if TYPE_CHECKING:
    from .predict import PredictionResult

ROWS = "rows"
LOCK = ".predictions.lock"
BASE_COLUMNS = ("study", "key", "task", "source_path", "series_uid", "probability", "label", "threshold",
                "model_id", "tta_mean", "tta_std", "saliency", "saliency_file", "montage_file", "result_file",
                "scene_file", "error")
VOLUME_FORMATS = ("nii.gz", "nii", "nrrd")


# ------------------------------------------------------------------------------------ per study

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


def write_study(res: "PredictionResult", out_dir: str | Path, key: str, fmt: str = "nii.gz", montage: bool = True,
                scene: bool = False, write_volume: bool = True) -> dict[str, Any]:
    """Write one study's files into ``out_dir`` (see module docstring); returns their paths.

    ``saliency_file`` / ``montage_file`` name the first role's files (the only ones for a
    single-input task); ``saliency_files`` / ``montage_files`` map every role to its file.
    """
    if fmt not in VOLUME_FORMATS:
        raise ValueError(f"volume format must be one of {VOLUME_FORMATS}, not '{fmt}'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    safe_child(out, key, what="study key")
    many = len(res.maps) > 1
    files: dict[str, Any] = {"saliency_file": None, "montage_file": None, "result_file": None, "scene_file": None,
                             "sanity_plot": None, "saliency_files": {}, "montage_files": {}}
    for role, m in res.maps.items():
        tag = f"_{role}" if many else ""
        if write_volume and m.volume is not None:
            path = safe_child(out, key, f"_saliency{tag}.{fmt}", what="study key")
            with atomic_path(path) as tmp:
                # Level 1: the maps are mostly zeros; higher levels cost time, not size.
                sitk.WriteImage(m.volume, str(tmp), useCompression=fmt != "nii", compressionLevel=1)
            files["saliency_files"][role] = str(path)
        if montage:
            from ..montage import save_montage

            head = (f"{res.study_name}: {res.values['summary']}" if res.values.get("summary")  # non-binary tasks
                    else f"{res.study_name}: p = {res.probability:.3f} (class {res.label} at {res.threshold:.3f})")
            title = f"{head}; {res.saliency_method}{' - ' + role if many else ''}"
            path = safe_child(out, key, f"_montage{tag}.png", what="study key")
            files["montage_files"][role] = str(save_montage(path, m.images, overlay=m.overlay, titles=m.titles,
                                                            suptitle=title))
    first = next(iter(res.maps), None)
    files["saliency_file"] = files["saliency_files"].get(first)
    files["montage_file"] = files["montage_files"].get(first)
    if res.sanity is not None:
        from ..sanity import save_sanity_plot

        files["sanity_plot"] = str(save_sanity_plot(safe_child(out, key, "_sanity.png"), res.sanity, title=key))
    if scene:
        writer = scene_writer()
        role = first or next(iter(res.source_images), None)
        if role is None or res.source_images.get(role) is None:
            raise ValueError("the scene needs the source image")
        volume = res.maps[role].volume if role in res.maps else None
        files["scene_file"] = str(writer(safe_child(out, key, ".mrb"), res.source_images[role], volume,
                                         dict(res.to_dict(), files=dict(files))))
    files["result_file"] = str(write_json(safe_child(out, key, ".json"), dict(res.to_dict(), files=files)))
    return files


# ------------------------------------------------------------------------------------ tables

@contextlib.contextmanager
def table_lock(out_dir: str | Path) -> Iterator[None]:
    """Exclusive advisory lock on ``out_dir/.predictions.lock`` (blocks until free; released on
    exit and by the kernel if the process dies)."""
    path = Path(out_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


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
        if self.folder.is_dir():
            for entry in os.scandir(self.folder):
                if entry.name.startswith(".") or not entry.name.endswith(".json"):
                    continue  # temporary files of atomic writes in flight
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                sig = (st.st_mtime_ns, st.st_size)
                hit = self._cache.get(entry.name)
                if hit is None or hit[0] != sig:
                    try:
                        hit = (sig, json.loads(Path(entry.path).read_text(encoding="utf-8")))
                    except (OSError, json.JSONDecodeError) as exc:
                        raise InputError(entry.path, f"unreadable result row ({exc}); delete it to predict that study again") from None
                    self._cache[entry.name] = hit
                rows.append(hit[1])
        return sorted(rows, key=lambda r: (r.get("finished", 0.0), str(r.get("key"))))


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """BASE_COLUMNS, then any other scalar field of the rows (task extras), in first-seen order."""
    cols = list(BASE_COLUMNS)
    for r in rows:
        for k, v in r.items():
            if k not in cols and k not in ("finished", "files") and not isinstance(v, (dict, list)):
                cols.append(k)
    return cols


def write_tables(out_dir: str | Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
    """``predictions.csv`` (scalar columns) and ``predictions.json`` (meta + full rows), atomically."""
    out = Path(out_dir)
    cols = _columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    write_text(out / "predictions.csv", buf.getvalue())
    write_json(out / "predictions.json", dict(meta, predictions=list(rows)))


def merge_tables(out_dir: str | Path, meta: dict[str, Any], reader: RowReader | None = None) -> list[dict[str, Any]]:
    """Rebuild the tables of ``out_dir`` from its row files under the folder's lock; returns the rows."""
    reader = reader or RowReader(out_dir)
    with table_lock(out_dir):
        rows = reader.read()
        write_tables(out_dir, rows, meta)
    return rows


def merge_folders(sources: Sequence[str | Path], out_dir: str | Path) -> list[dict[str, Any]]:
    """Merge the results of several output folders (e.g. shards) into ``out_dir``.

    Every source's row files and per-study files are copied in (a study done in several sources
    keeps the row without error, then the latest); the tables are rebuilt under the lock.
    Returns the merged rows. Sources that are ``out_dir`` itself are skipped.
    """
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
        for row in RowReader(src).read():
            dest = safe_child(out / ROWS, row["key"], ".json", what="study key")
            if dest.is_file():
                old = json.loads(dest.read_text(encoding="utf-8"))
                if (not old.get("error")) and (row.get("error") or old.get("finished", 0) >= row.get("finished", 0)):
                    continue
            for f in src.iterdir():  # the study's own files: <key>.json, <key>_saliency..., <key>.mrb
                if f.is_file() and (f.name.startswith(row["key"] + "_") or f.name.startswith(row["key"] + ".")):
                    with atomic_path(out / f.name) as tmp:
                        shutil.copyfile(f, tmp)
            put_row(out, _rebase(row, src, out))
    return merge_tables(out, meta)


def _rebase(row: dict[str, Any], src: Path, out: Path) -> dict[str, Any]:
    """The row with file paths that pointed into ``src`` pointing into ``out``."""
    s = str(src.resolve())

    def move(v: Any) -> Any:
        if isinstance(v, str) and v.startswith(s + os.sep):
            return str(out.resolve() / Path(v).relative_to(s))
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v

    return {k: move(v) for k, v in row.items()}
