"""`simsearch eval` on a real PIPED category: no test leakage, real metrics, a report a person can read."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from realdata import DATASETS, PIPED, needs_piped
from simsearch import Engine
from simsearch.calibration import threshold_for_fpr
from simsearch.evaluation.datasets import load_category
from simsearch.evaluation.runner import evaluate_category

pytestmark = needs_piped


def test_fold_calibration_never_scores_an_image_against_itself(tmp_path):
    """eval's threshold comes from `calibrate --folds`: each bank image against the bank without its fold."""
    category = load_category(PIPED.parent, PIPED.name)
    engine = Engine.create(tmp_path / "ix")
    engine.add([str(p) for p in category.train[:12]])
    engine.calibrate(folds=3)
    scores = np.asarray(engine.latest_calibration()["details"]["good_scores"])
    assert scores.shape == (12,)
    # Scored against its own bank every image would score 0; against the other folds it cannot.
    assert (scores > 1.0).all()
    own = [engine.query(row["path"]).score for row in engine.catalog.images("reference")[:3]]
    assert max(own) < 1e-3


def test_evaluate_category_with_a_coreset(tmp_path):
    full = load_category(PIPED.parent, PIPED.name)
    category = dataclasses.replace(full, train=full.train[:12], test=full.test[::4])  # 4 good, 12 defective
    result = evaluate_category(category, folds=3, workdir=tmp_path, coreset=0.1)
    assert result.n_test_good == 4 and result.image_auroc >= 0.9 and result.threshold > 0
    with pytest.raises(ValueError, match="coreset"):
        evaluate_category(category, method="histogram-iforest", coreset=0.1)


def test_evaluate_category_on_piped(tmp_path):
    category = load_category(PIPED.parent, PIPED.name)
    result = evaluate_category(category, folds=3, workdir=tmp_path)
    assert result.n_test_good == 16 and result.n_test_defect == 48
    assert result.image_auroc >= 0.95
    assert 0.5 < result.pixel_auroc <= 1.0 and 0.0 < result.aupro <= 1.0
    assert set(result.seconds) == {"build", "threshold", "test", "metrics"}
    assert result.threshold > 0 and result.expected_fpr == pytest.approx(1 / 32)  # 31 train images, k = 1
    assert result.pixel_threshold > 0 and result.min_region_area > 0  # from the same cross-scores
    # capture-order folds: PIPED's names run sheet by sheet, so each fold holds whole sheets
    assert result.fold_order == "capture" and len(result.fold_spread["thresholds"]) == 3
    assert max(result.fold_spread["thresholds"]) >= result.threshold
    labels = np.array([c.label for c in result.cases])
    scores = np.array([c.score for c in result.cases])
    assert result.fpr_good == pytest.approx(((scores > result.threshold) & (labels == 0)).sum() / 16)
    assert list(tmp_path.iterdir()) == []  # the temporary index is gone


def test_eval_cli_json_and_report(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "simsearch.cli", "eval", str(DATASETS / "piped"),
                           "--category", PIPED.name, "--folds", "3", "--json", "--report", str(tmp_path / "rep")],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["category"] for r in lines] == [PIPED.name, "mean"]
    assert lines[0]["image_auroc"] == lines[1]["image_auroc"] >= 0.95
    assert "cases" not in lines[0]
    profile = lines[0]["border_profile"]  # what the calibration learned of the edges, at least 1 a ring
    assert len(profile) == 8 and min(profile) >= 1.0 and profile[0] > 1.0
    assert lines[0]["per_defect"]["impurity"]["count"] == 48
    assert sum(lines[0]["confusion"].values()) == 64
    report = (tmp_path / "rep" / "report.md").read_text()
    assert PIPED.name in report and "image AUROC" in report
    with open(tmp_path / "rep" / "images.csv") as f:
        assert sum(1 for _ in f) == 1 + 64  # the header and the 64 test images
    page = (tmp_path / "rep" / "report.html").read_text()
    for plot in ("roc.png", "scores.png", "pro.png"):
        assert f"{PIPED.name}/{plot}" in page and (tmp_path / "rep" / PIPED.name / plot).is_file()


def test_eval_refuses_unknown_category():
    proc = subprocess.run([sys.executable, "-m", "simsearch.cli", "eval", str(DATASETS / "piped"),
                           "--category", "NO_SUCH"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "NO_SUCH" in proc.stderr and "Traceback" not in proc.stderr
