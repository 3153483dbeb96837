"""Dataset building under failure: a failed or killed build changes nothing, a successful one
replaces the set as a whole, pool workers die with their parent, stale staging folders go away,
and a build that includes no patient says so."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rheumai.atomic import clean_stale_staging, replace_dir, staging_dir
from rheumai.dataset import CohortRules, SplitConfig, build_dataset, index_archive
from rheumai.dataset.archive_tools import write_demo_archive
from rheumai.errors import InputError
from rheumai.tasks.cervical_ra.slices import SliceParams

PARAMS = SliceParams(n_slices=4, spacing_mm=2.0, size=(32, 32))
QUIET = lambda *a: None  # noqa: E731


@pytest.fixture(scope="module")
def archive(tmp_path_factory, dicom_t1_dir):
    base = tmp_path_factory.mktemp("rel")
    d = write_demo_archive(dicom_t1_dir, base / "export", base / "labels.csv", n_patients=17, downsample=4)
    index_archive(d.root, base / "index.sqlite", progress=QUIET)
    return d, base


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (relative path -> content, inode)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_ino)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_failed_rebuild_changes_nothing_and_success_replaces_the_set(archive, tmp_path):
    d, base = archive
    out = tmp_path / "ds"
    first = build_dataset(base / "index.sqlite", d.labels_csv, out, CohortRules(), SplitConfig(), PARAMS, progress=QUIET)
    (out / "notes.txt").write_text("mine")  # a file that is not part of the set is kept
    before = _snapshot(out)
    # Fails after the label check, the cohort rules and the cache: split on a site nobody has.
    with pytest.raises(InputError, match="no included patient from test site") as err:
        build_dataset(base / "index.sqlite", d.labels_csv, out, CohortRules(min_followup_days=500),
                      SplitConfig(test_sites=("Z",)), SliceParams(n_slices=3, spacing_mm=2.0, size=(32, 32)),
                      progress=QUIET)
    assert "nothing was written" in str(err.value) and "Follow-up >= 500 days" in str(err.value)
    assert _snapshot(out) == before and _siblings(out) == []
    # A successful re-build with other rules replaces every file of the set together.
    again = build_dataset(base / "index.sqlite", d.labels_csv, out, CohortRules(min_followup_days=500), SplitConfig(),
                          PARAMS, progress=QUIET)
    assert "Follow-up >= 500 days" in (out / "flow.txt").read_text()
    assert '"min_followup_days": 500' in (out / "dataset.json").read_text()
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == again.n_included > first.n_included
    assert all((out / (r["cache_file"] + ".npy")).is_file() for r in rows)
    assert again.cache.reused == sorted(first.split)  # old entries carried into the new set
    assert (out / "notes.txt").read_text() == "mine" and _siblings(out) == []
    # A folder holding other folders (an archive, training runs) is refused before anything is written.
    (out / "run").mkdir()
    with pytest.raises(InputError, match=r"holds folders that are not part of a dataset \(run\)"):
        build_dataset(base / "index.sqlite", d.labels_csv, out, CohortRules(), SplitConfig(), PARAMS, progress=QUIET)
    (out / "run").rmdir()
    # A flow-only dry run would replace the set with a flow report alone: refused, nothing changed.
    kept = _snapshot(out)
    with pytest.raises(InputError, match="holds a built dataset"):
        build_dataset(base / "index.sqlite", d.labels_csv, out, CohortRules(), SplitConfig(), PARAMS,
                      compute_cache=False)
    assert _snapshot(out) == kept and _siblings(out) == []


def test_build_that_includes_no_patient_says_so(archive, tmp_path):
    d, base = archive
    with pytest.raises(InputError, match="no patient is included in the dataset, so nothing was written") as err:
        build_dataset(base / "index.sqlite", d.labels_csv, tmp_path / "none", CohortRules(min_followup_days=99999),
                      SplitConfig(), PARAMS, progress=QUIET)
    assert "Follow-up >= 99999 days" in str(err.value) and "P001" in str(err.value)
    assert not (tmp_path / "none").exists()
    cmd = [sys.executable, "-m", "rheumai.cli", "dataset", "build", "--index", str(base / "index.sqlite"),
           "--labels", str(d.labels_csv), "--out", str(tmp_path / "none"), "--min-followup-days", "99999"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 1 and "no patient is included" in res.stderr and "Traceback" not in res.stderr


def test_staging_folder_lock_and_swap(tmp_path):
    target = tmp_path / "set"
    target.mkdir()
    (target / "a").write_text("old")
    with staging_dir(target) as stage:
        (stage / "a").write_text("new")
        # A live staging folder (lock held) survives another run's clean-up.
        assert clean_stale_staging(target) == [] and stage.is_dir()
        replace_dir(stage, target)
    assert (target / "a").read_text() == "new" and _siblings(target) == []
    # A staging folder whose lock nobody holds (its run was killed) is removed.
    stale = tmp_path / ".set.staging-1-dead"
    stale.mkdir()
    (stale / "x").write_text("x")
    (tmp_path / ".set.staging-1-dead.lock").write_text("")
    assert clean_stale_staging(target) == [stale] and _siblings(target) == []
    with pytest.raises(RuntimeError):
        with staging_dir(target) as stage:
            (stage / "a").write_text("half")
            raise RuntimeError("failed mid-way")
    assert (target / "a").read_text() == "new" and _siblings(target) == []


def _children(pid: int) -> list[int]:
    kids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(p.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _workers(pid: int) -> list[int]:
    out = []
    for k in _children(pid):
        try:
            cmd = Path(f"/proc/{k}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            out.append(k)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_build_leaves_no_workers_and_no_change(archive, tmp_path, sig):
    d, base = archive
    out = tmp_path / "ds"
    build_dataset(base / "index.sqlite", d.labels_csv, out, CohortRules(), SplitConfig(), PARAMS, compute_cache=False)
    before = _snapshot(out)
    cmd = [sys.executable, "-m", "rheumai.cli", "dataset", "build", "--index", str(base / "index.sqlite"),
           "--labels", str(d.labels_csv), "--out", str(out), "--workers", "2", "--size", "384", "384",
           "--slices", "12", "--spacing", "0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        workers: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:
            workers = _workers(proc.pid)
            if len(workers) == 2:
                break
            time.sleep(0.05)
        assert len(workers) == 2, f"no pool workers seen (exit {proc.poll()}): {proc.stderr.read().decode()[-2000:]}"
        assert proc.poll() is None, "the build ended before it could be killed"
        assert any(n.startswith(".ds.staging-") for n in _siblings(out))
        descendants = workers + [c for w in workers for c in _children(w)]
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10  # a worker still starting up ends at its initializer
        while time.monotonic() < deadline and any(_alive(p) for p in descendants):
            time.sleep(0.1)
        assert not [p for p in descendants if _alive(p)], "pool workers outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143
        assert _siblings(out) == []  # cleaned on the way out
    else:
        assert any(n.startswith(".ds.staging-") for n in _siblings(out))  # a kill -9 cannot clean up
    assert _snapshot(out) == before  # the previous set is untouched either way
    # The next run removes what a killed run left behind.
    build_dataset(base / "index.sqlite", d.labels_csv, out, CohortRules(), SplitConfig(), PARAMS, compute_cache=False)
    assert _siblings(out) == []


def test_concurrent_builds_into_one_folder_leave_one_whole_set(archive, tmp_path):
    """Two builds with different rules race into the same folder: the result is one build's set,
    never a mix (flow, dataset.json and manifest agree), and no staging folder is left."""
    from concurrent.futures import ThreadPoolExecutor

    d, base = archive
    out = tmp_path / "ds"
    build_dataset(base / "index.sqlite", d.labels_csv, out, CohortRules(), SplitConfig(), PARAMS, progress=QUIET)

    def run(days: int):
        return build_dataset(base / "index.sqlite", d.labels_csv, out, CohortRules(min_followup_days=days),
                             SplitConfig(), PARAMS, progress=QUIET)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, [1000, 500]))
    meta = (out / "dataset.json").read_text()
    days = 500 if '"min_followup_days": 500' in meta else 1000
    winner = results[[1000, 500].index(days)]
    assert f"Follow-up >= {days} days" in (out / "flow.txt").read_text()
    assert len(list(csv.DictReader(open(out / "manifest.csv")))) == winner.n_included
    assert f'"included": {winner.n_included}' in meta and _siblings(out) == []
