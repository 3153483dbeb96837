"""Plain baselines against the trainer, on the same cached inputs and the same patient split.

1. logistic regression on pooled pixels: every slice of the cached (6, H, W) input average-pooled
   to 16 x 16, the 6 x 16 x 16 values standardised, L2-penalised logistic regression with the
   penalty chosen by 5-fold cross-validation on the training patients (scikit-learn);
2. a small CNN: MONAI ``Classifier`` (3 strided residual stages, 8/16/32 channels, instance norm) on
   the inputs resized to 64 x 64, BCE + Adam, a fixed number of epochs, no augmentation, no
   selection on the test patients;
3. the trainer: the checkpoint's held-out test AUC (``rheumai.api.evaluate``), when one is given.

Train = the manifest's train + val rows (the trainer's validation patients are training data for
the baselines); test = its test rows. AUCs with DeLong 95% CIs. The table ends with whether the
trainer beats both baselines.

Usage:
  python benchmarks/bench_baselines.py --manifest demo_out/dataset/manifest.csv --checkpoint demo_out/run/model
  python benchmarks/bench_baselines.py --quick     # a small generated cohort, no checkpoint (smoke run)
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rheumai.engine.train import read_manifest
from rheumai.tasks.cervical_ra.train import load_array
from rheumai.metrics import auc_ci


def _arrays(df: Any) -> np.ndarray:
    return np.stack([np.asarray(load_array(p)) for p in df["array_path"]]).astype(np.float32)


def logistic_on_pooled_pixels(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, seed: int = 0) -> np.ndarray:
    """Test probabilities of an L2 logistic regression on 16 x 16 average-pooled slices."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def pool(x: np.ndarray) -> np.ndarray:
        return F.adaptive_avg_pool2d(torch.from_numpy(x), 16).reshape(len(x), -1).numpy()

    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=5, max_iter=2000, scoring="roc_auc",
                                                               random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's notice about LogisticRegressionCV attributes
        clf.fit(pool(xtr), ytr)
    return clf.predict_proba(pool(xte))[:, 1]


def small_cnn(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, epochs: int = 30, seed: int = 0,
              size: int = 64) -> np.ndarray:
    """Test probabilities of a small MONAI Classifier trained on the inputs resized to ``size``."""
    from monai.networks.nets import Classifier

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    def resize(x: np.ndarray) -> torch.Tensor:
        return F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False)

    xt, yt, xe = resize(xtr), torch.from_numpy(ytr.astype(np.float32)), resize(xte)
    net = Classifier(in_shape=(xt.shape[1], size, size), classes=1, channels=(8, 16, 32), strides=(2, 2, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        net.train()
        order = rng.permutation(len(xt))
        for i in range(0, len(order), 8):
            b = order[i:i + 8]
            loss = F.binary_cross_entropy_with_logits(net(xt[b])[:, 0], yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return torch.sigmoid(net(xe)[:, 0]).numpy()


def run(manifest: Path, checkpoint: Path | None = None, cnn_epochs: int = 30, seed: int = 0) -> list[dict[str, Any]]:
    df = read_manifest(manifest)
    tr, te = df[df["split"] != "test"], df[df["split"] == "test"]
    xtr, xte = _arrays(tr), _arrays(te)
    ytr, yte = tr["label"].to_numpy(int), te["label"].to_numpy(int)
    rows = []
    for name, fn in (("logistic regression, pooled pixels (16 x 16 per slice)", logistic_on_pooled_pixels),
                     (f"small CNN (MONAI Classifier, 64 x 64, {cnn_epochs} epochs)",
                      lambda a, b, c: small_cnn(a, b, c, epochs=cnn_epochs, seed=seed))):
        t = time.perf_counter()
        p = fn(xtr, ytr, xte)
        a = auc_ci(yte, p, method="delong")
        rows.append({"method": name, "auc": a["value"], "lo": a["lo"], "hi": a["hi"], "s": time.perf_counter() - t})
    if checkpoint is not None:
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            from rheumai.api import evaluate

            rep = evaluate(checkpoint, manifest, Path(tmp), split="test")["auc"]
        rows.append({"method": f"RheumAI trainer ({checkpoint})", "auc": rep["value"], "lo": rep["lo"],
                     "hi": rep["hi"], "s": time.perf_counter() - t})
    return rows


def _quick_manifest(tmp: Path) -> Path:
    """A small generated cohort (24 subjects, prevalence 0.5) with its cached inputs."""
    from rheumai.dataset.build import build_dataset
    from rheumai.dataset.index import index_archive
    from rheumai.dataset.split import SplitConfig
    from rheumai.tasks.cervical_ra.slices import SliceParams
    from rheumai.tasks.cervical_ra.synth import generate_cohort

    c = generate_cohort(tmp / "cohort", n=24, prevalence=0.5, seed=11, lesion_scale=1.25, progress=False)
    index_archive(c.dicom_dir, tmp / "index.sqlite")
    ds = build_dataset(tmp / "index.sqlite", c.labels_csv, tmp / "dataset", split_cfg=SplitConfig(seed=11),
                       slice_params=SliceParams(n_slices=6, spacing_mm=2.0, size=(128, 128)))
    return ds.manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", type=Path, help="dataset manifest.csv (e.g. demo_out/dataset/manifest.csv)")
    ap.add_argument("--checkpoint", type=Path, help="the trainer's checkpoint (e.g. demo_out/run/model)")
    ap.add_argument("--cnn-epochs", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="small generated cohort, 5 CNN epochs (smoke run)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = a.manifest or (_quick_manifest(Path(tmp)) if a.quick else None)
        if manifest is None:
            ap.error("--manifest is required (or --quick)")
        rows = run(manifest, a.checkpoint, 5 if a.quick else a.cnn_epochs)
    print(f"\nheld-out test patients of {manifest}\n")
    print("| method | test AUC | 95% CI (DeLong) | s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['auc']:.3f} | {r['lo']:.3f} to {r['hi']:.3f} | {r['s']:.0f} |")
    if a.checkpoint is not None:
        beats = all(rows[-1]["auc"] > r["auc"] for r in rows[:-1])
        print(f"\ntrainer beats both baselines: {'yes' if beats else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
