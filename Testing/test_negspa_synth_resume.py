"""A resumed NegSpA cohort generation gives byte-identical outputs to a fresh run."""

from __future__ import annotations

import shutil
from pathlib import Path

from rheumai.tasks.negspa.synth import make_cohort


def _contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_matches_fresh_run(tmp_path: Path) -> None:
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    make_cohort(fresh, n=4, seed=2, spacing=4.0, show_progress=False)
    make_cohort(resumed, n=4, seed=2, spacing=4.0, show_progress=False)
    kept = resumed / "SPA0000" / "t1.nii.gz"
    mtime = kept.stat().st_mtime_ns
    # interrupted run: one subject gone, one half written, no CSVs yet
    shutil.rmtree(resumed / "SPA0001")
    (resumed / "SPA0002" / "truth_oedema.nii.gz").unlink()
    for name in ("clinical.csv", "cohort.csv"):
        (resumed / name).unlink()
    make_cohort(resumed, n=4, seed=2, spacing=4.0, show_progress=False)
    assert kept.stat().st_mtime_ns == mtime  # complete subjects are kept, not rewritten
    got, want = _contents(resumed), _contents(fresh)
    assert got.keys() == want.keys()
    assert [name for name in want if got[name] != want[name]] == []
