"""NegSpA-AI (Lu et al., QIMS 2024): HLA-B27-negative axial SpA from sacroiliac MRI + clinical features.

Console API (works in Slicer's Python console)::

    from rheumai import api
    from rheumai.dataset import build_image_dataset
    from rheumai.tasks.negspa.synth import make_cohort
    cohort = make_cohort("/tmp/spa", n=24)                          # generated cohort with truth
    manifest = build_image_dataset(cohort, "/tmp/spa/ds", params={"size": (64, 64)}, task="negspa",
                                   clinical_csv="/tmp/spa/clinical.csv").manifest
    run = api.train("configs/negspa.toml", manifest, "/tmp/spa/run")  # two stages on the engine
    api.evaluate(run.checkpoint, manifest, "/tmp/spa/eval")
    res = api.predict(run.checkpoint, {"t1": ..., "t2": ..., "stir": ..., "roi": "box.json",
                                       "clinical": {"crp": 12, "inflammatory_back_pain": "yes"}}, "/tmp/spa/pred")

Modules: preprocess (box, half grids), clinical (variables, missing-value encoding), model
(tri-input ResNet + fusion), mixcut, train (the engine recipe: config sections, two stages),
predict (the engine's predict hooks), synth (generated cohort), task (declaration).
"""
