"""Image AUROC of one fit on all train/good at a larger training budget than the default (no threshold folds):
is the budget why vae and ganomaly fail where they fail? `.venv/bin/python bench/baseline_budget.py` (JSON lines)."""
import json
from pathlib import Path

import numpy as np

from simsearch.evaluation import metrics
from simsearch.evaluation.baselines import BASELINES
from simsearch.evaluation.datasets import load_category

root = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "piped"
for method, steps, cats in (("vae", 400, ["PA_FVN01_TL", "PA_BTN01_RL"]), ("ganomaly", 250, ["PA_FVN01_TL", "PA_BDP01_TL"])):
    for name in cats:
        cat = load_category(root, name)
        d = BASELINES[method](steps=steps)
        d.fit(cat.train)
        labels = np.array([s.label for s in cat.test])
        scores = np.array([d.score(s.path)[0] for s in cat.test])
        print(json.dumps({"method": method, "steps": steps, "category": name, "fit_seconds": round(d.fit_seconds, 1),
                          "image_auroc": metrics.image_auroc(labels, scores)}), flush=True)
