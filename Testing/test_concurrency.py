"""Two `rheumai predict` processes on one --out lose no rows; shards merge without loss.

The reported failure: each process rewrote the whole table from its own memory, so the last writer
won and half the rows were lost, both exiting 0. Now every study has its own row file and the
tables are rebuilt from all of them under a lock.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rheumai.engine.predict import study_stem


@pytest.fixture(scope="module")
def ckpt(make_cervical_checkpoint) -> Path:
    return make_cervical_checkpoint(0, "conc")


@pytest.fixture(scope="module")
def studies(tmp_path_factory, t2_crop_path) -> list[str]:
    d = tmp_path_factory.mktemp("studies")
    out = []
    for i in range(8):
        p = d / f"s{i:02d}.nii.gz"
        shutil.copyfile(t2_crop_path, p)
        out.append(str(p))
    return out


def _cli(*args: str) -> subprocess.Popen:
    code = "import sys; from rheumai.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.Popen([sys.executable, "-c", code, "predict", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _table(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_two_processes_one_out_lose_no_rows(ckpt, studies, tmp_path):
    """Two processes, overlapping study lists, the same --out, started together."""
    out = tmp_path / "out"
    a = _cli(*studies[:5], "--model", str(ckpt), "--out", str(out), "--saliency", "none")
    b = _cli(*studies[3:], "--model", str(ckpt), "--out", str(out), "--saliency", "none")
    for p in (a, b):
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, log
    rows = _table(out)
    assert sorted(r["study"] for r in rows) == sorted(studies)  # all 8, each once
    data = json.loads((out / "predictions.json").read_text())["predictions"]
    assert sorted(r["key"] for r in data) == sorted(study_stem(s) for s in studies)
    assert all(not r["error"] and 0 <= float(r["probability"]) <= 1 for r in rows)


def test_shards_merge_without_loss(ckpt, studies, tmp_path, one_torch_thread):
    """shard=(i, N) into separate folders (a SLURM array), then the merge; merging is idempotent."""
    from rheumai.engine.predict import predict_batch
    from rheumai.engine.write import merge_folders

    for i in range(3):
        predict_batch(studies, ckpt, tmp_path / f"shard{i}", shard=(i, 3), saliency=None, montage=False,
                      show_progress=False, workers=0)
    assert [len(_table(tmp_path / f"shard{i}")) for i in range(3)] == [3, 3, 2]
    rows = merge_folders([tmp_path / f"shard{i}" for i in range(3)], tmp_path / "all")
    assert sorted(r["study"] for r in _table(tmp_path / "all")) == sorted(studies)
    for r in rows:  # files were copied along and the rows point at the copies
        assert Path(r["result_file"]).parent == (tmp_path / "all").resolve() and Path(r["result_file"]).is_file()
    assert len(merge_folders([tmp_path / "shard0"], tmp_path / "all")) == 8
    # A later run into the merged folder skips every study already there (resume across shards).
    again = predict_batch(studies, ckpt, tmp_path / "all", saliency=None, show_progress=False,
                          progress=lambda i, n, s: None)
    assert len(again) == 8 and {r["finished"] for r in again} == {r["finished"] for r in rows}
