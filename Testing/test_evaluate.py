"""End to end on CPU: `train` with configs/small_cpu.toml, then `evaluate` and its report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score

from rheumai.tasks.cervical_ra.train import write_toy_cohort
from rheumai.engine.evaluate import evaluate
from rheumai.cli import main

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("e2e")
    manifest = write_toy_cohort(root / "cohort", n_train=20, n_val=0, n_test=16, size=32,
                                positive_fraction=0.4, seed=7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["train", "--config", str(REPO / "configs" / "small_cpu.toml"), "--manifest", str(manifest),
                   "--out", str(root / "run"), "--epochs", "2", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return manifest, root / "run" / "model"


def test_train_cli_outputs(trained: tuple[Path, Path]) -> None:
    manifest, model = trained
    run = model.parent
    for name in ("config.toml", "history.csv", "splits.csv", "val_predictions.csv", "state/state.json",
                 "model/model.safetensors", "model/model_card.json"):
        assert (run / name).is_file(), name
    card = json.loads((model / "model_card.json").read_text())
    assert card["architecture"]["input_size"] == [64, 64]          # from the config, arrays are 32 px
    assert card["training_data"]["n_val"] == 4 and "carved" in card["training_data"]["val_source"]
    splits = pd.read_csv(run / "splits.csv")
    assert set(splits["used_as"]) == {"train", "val"} and splits["patient_id"].is_unique
    assert "epochs = 2" in (run / "config.toml").read_text()


def test_evaluate_cli_report(trained: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, model = trained
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(model), "--manifest", str(manifest), "--split", "test",
                 "--out", str(out), "--n-bootstrap", "200", "--quiet"]) == 0
    for name in ("report.md", "report.html", "metrics.csv", "metrics.json", "predictions.csv", "roc.png",
                 "confusion_matrix.png", "calibration.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"
    card = json.loads((model / "model_card.json").read_text())
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == 16 and preds["patient_id"].is_unique
    metrics = json.loads((out / "metrics.json").read_text())
    thr = card["threshold"]
    assert metrics["threshold"] == pytest.approx(thr)
    tn, fp, fn, tp = confusion_matrix(preds["label"], preds["probability"] >= thr, labels=[0, 1]).ravel()
    assert metrics["counts"] == {"tp": tp, "fn": fn, "fp": fp, "tn": tn}
    assert metrics["auc"]["value"] == pytest.approx(roc_auc_score(preds["label"], preds["probability"]))
    table = pd.read_csv(out / "metrics.csv").set_index("metric")
    assert set(table.index) == {"auc", "sensitivity", "specificity", "ppv", "npv", "accuracy", "f1", "brier"}
    assert table.loc["sensitivity", "denominator"] == tp + fn
    md = (out / "report.md").read_text()
    for text in ("ROC AUC", "95% CI", f"TP {tp}", "Brier", "from the model card", "![ROC curve](roc.png)"):
        assert text in md, text
    assert "<table>" in (out / "report.html").read_text()


def test_evaluate_threshold_rules(trained: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, model = trained
    r = evaluate(model, manifest, tmp_path / "fixed", threshold_rule="fixed:0.5", n_bootstrap=100, show_progress=False)
    preds = pd.read_csv(r["files"]["predictions"])
    p, y = preds["probability"].to_numpy(), preds["label"].to_numpy()
    assert r["threshold"] == 0.5 and r["counts"]["tp"] == int(((p >= 0.5) & (y == 1)).sum())
    s = evaluate(model, manifest, tmp_path / "sens", threshold_rule="sensitivity:0.9", n_bootstrap=100,
                 auc_ci="bootstrap", show_progress=False)
    assert s["metrics"]["sensitivity"]["value"] >= 0.9
    assert any("optimistic" in w for w in s["warnings"])
    assert "optimistic" in (tmp_path / "sens" / "report.md").read_text()


def test_evaluate_errors(trained: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    manifest, model = trained
    assert main(["evaluate", "--model", str(model), "--manifest", str(manifest), "--split", "val",
                 "--out", str(tmp_path / "x"), "--quiet"]) == 1
    assert "no rows with split == 'val'" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(model), "--manifest", str(manifest), "--out", str(tmp_path / "y"),
                 "--threshold-rule", "median"]) == 1
    assert main(["evaluate", "--model", str(tmp_path / "nothing.pt"), "--manifest", str(manifest),
                 "--out", str(tmp_path / "z")]) == 1
    assert "pickle" in capsys.readouterr().err


def test_external_validation_and_recalibrated_checkpoint(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from rheumai.metrics import logistic_calibration, recalibrate_probability

    _, model = trained
    other = write_toy_cohort(tmp_path / "site_b", n_train=30, n_val=0, n_test=30, size=32, positive_fraction=0.4,
                             seed=11)
    df = pd.read_csv(other)  # another site's readers disagree on some outcomes: no perfect separation
    flip = np.random.default_rng(0).permutation(len(df))[:12]
    df.loc[flip, "label"] = 1 - df.loc[flip, "label"]
    df.to_csv(other, index=False)
    out, recal = tmp_path / "ext", tmp_path / "recal_model"
    assert main(["evaluate", "--external", "--model", str(model), "--manifest", str(other), "--out", str(out),
                 "--recalibrate", str(recal), "--n-bootstrap", "100", "--quiet"]) == 0
    card = json.loads((model / "model_card.json").read_text())
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == 60  # --external evaluates every row of the other site
    y, p = preds["label"].to_numpy(), preds["probability"].to_numpy()
    comp = pd.read_csv(out / "comparison.csv").set_index("metric")
    assert comp.loc["auc", "external"] == pytest.approx(roc_auc_score(y, p))
    assert comp.loc["auc", "development"] == pytest.approx(card["metrics"]["validation"]["auc"]["value"])
    cal = logistic_calibration(y, p)
    assert comp.loc["calibration_slope", "external"] == pytest.approx(cal["slope"]["value"])
    assert "development vs external site" in (out / "report.md").read_text()
    # the recalibrated checkpoint: same tensors, recalibration recorded, and it is calibrated on site B
    new = json.loads((recal / "model_card.json").read_text())
    assert new["weights_sha256"] == card["weights_sha256"] == new["recalibration"]["source_weights_sha256"]
    a, b = load_file(str(model / "model.safetensors")), load_file(str(recal / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rc = new["recalibration"]
    assert rc["slope"] == pytest.approx(cal["slope"]["value"]) and rc["source_model_id"] == card["model_id"]
    r2 = evaluate(recal, other, tmp_path / "after", split="all", n_bootstrap=50, show_progress=False)
    p2 = pd.read_csv(r2["files"]["predictions"])["probability"].to_numpy()
    np.testing.assert_allclose(p2, recalibrate_probability(p, rc["intercept"], rc["slope"]), rtol=1e-6, atol=1e-9)
    after = logistic_calibration(y, p2)
    assert after["slope"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert after["intercept"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert ((p2 >= new["threshold"]) == (p >= card["threshold"])).all()  # same patients on each side
    from rheumai.tasks.cervical_ra.predict import postprocess  # prediction applies the card's recalibration

    raw = 1 / (1 + np.exp(-0.3))
    assert postprocess({"out": torch.tensor([[0.3]])}, card, None)["probability"] == pytest.approx(raw)
    assert postprocess({"out": torch.tensor([[0.3]])}, new, None)["probability"] == \
        pytest.approx(recalibrate_probability(raw, rc["intercept"], rc["slope"]))
    assert main(["evaluate", "--model", str(model), "--manifest", str(other), "--out", str(tmp_path / "bad"),
                 "--recalibrate", str(tmp_path / "x")]) == 1
