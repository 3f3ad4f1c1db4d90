"""The eval report on a tiny real PIPED slice: per-defect rows, confusion counts, images.csv, and report.html as
headless Chromium shows it (every image loads).

Set SIMSEARCH_REPORT_SCREENSHOT=FILE.png to keep the page's screenshot (the test always saves one under tmp_path)."""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest

from browser import headless_chromium, needs_chromium
from realdata import needs_piped, tiny_category
from simsearch.evaluation import metrics
from simsearch.evaluation.datasets import load_category
from simsearch.evaluation.report_page import write_eval_report
from simsearch.evaluation.runner import evaluate_category, mean_row, per_defect_metrics

pytestmark = needs_piped


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(result, report directory) of patchcore on 8 train, 2 good, 3 'impurity' and 2 'spot' test images."""
    root = tiny_category(tmp_path_factory.mktemp("data"), extra_defects={"spot": slice(10, 12)})
    result = evaluate_category(load_category(root, "PA_BDP01_TL"), folds=2)
    directory = tmp_path_factory.mktemp("report")
    write_eval_report([result], mean_row([result]), directory, "tiny eval")
    return result, directory


def test_per_defect_rows_score_each_type_against_the_good_images(evaluated):
    result, _ = evaluated
    assert {k: v["count"] for k, v in result.per_defect.items()} == {"impurity": 3, "spot": 2}
    scores = {c.path: c.score for c in result.cases}
    good = [scores[c.path] for c in result.cases if c.label == 0]
    for kind, row in result.per_defect.items():
        mine = [c.score for c in result.cases if c.defect_type == kind]
        assert row["image_auroc"] == pytest.approx(metrics.image_auroc([0] * len(good) + [1] * len(mine), good + mine))
        assert 0.0 <= row["pixel_auroc"] <= 1.0 and 0.0 <= row["aupro"] <= 1.0
    assert result.pixel_threshold is not None and result.pixel_threshold > 0 and result.min_region_area >= 1


def test_confusion_counts_are_the_verdicts_at_the_calibrated_threshold(evaluated):
    result, _ = evaluated
    flagged = np.array([c.score > result.threshold for c in result.cases])
    defect = np.array([c.label == 1 for c in result.cases])
    assert result.confusion == {"tp": int((flagged & defect).sum()), "fp": int((flagged & ~defect).sum()),
                                "tn": int((~flagged & ~defect).sum()), "fn": int((~flagged & defect).sum())}
    assert "cases" not in result.to_dict() and result.to_dict()["per_defect"] == result.per_defect


def test_per_defect_metrics_on_hand_made_scores():
    kinds = ["good", "good", "good", "scratch", "scratch", "dent"]
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.15])  # scratches above every good image, the dent among them
    rows = per_defect_metrics(kinds, scores, [], [])
    assert rows["scratch"] == {"count": 2, "image_auroc": 1.0, "pixel_auroc": None, "aupro": None}
    assert rows["dent"]["image_auroc"] == pytest.approx(metrics.image_auroc([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.15]))


def test_images_csv_has_a_row_per_test_image_with_its_verdict(evaluated):
    result, directory = evaluated
    with open(directory / "images.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [c.path for c in result.cases] and len(rows) == 7
    for row, case in zip(rows, result.cases):
        assert row["defect_type"] == case.defect_type and int(row["label"]) == case.label
        assert row["verdict"] == ("ANOMALOUS" if case.score > result.threshold else "ok")
        assert int(row["regions"]) == len(case.regions)
        assert 0.0 < float(row["similarity"]) <= 1.0
        assert int(row["missed_pixels"]) <= int(row["defect_pixels"])
        assert (int(row["defect_pixels"]) > 0) == (case.label == 1)


def test_report_html_is_self_contained_and_names_files_that_exist(evaluated):
    _, directory = evaluated
    page = (directory / "report.html").read_text()
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # nothing from the network
    sources = re.findall(r"<img src='([^']+)'", page)
    for name in ("roc.png", "scores.png", "pro.png"):
        assert any(s.endswith("/" + name) for s in sources)
    assert sum("__" in s for s in sources) >= 4  # overlays: good images, defects, missed pixels
    for source in sources:
        assert (directory / source).is_file(), source
    assert "spot" in page and "impurity" in page and "FN " in page


@needs_chromium
def test_every_image_of_report_html_loads_in_headless_chromium(evaluated, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    _, directory = evaluated
    driver = headless_chromium(1280, 1400)
    try:
        driver.get((Path(directory) / "report.html").resolve().as_uri())
        all_done = "return [...document.images].every(i => i.complete)"
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(all_done))
        widths = driver.execute_script("return [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])")
        assert len(widths) >= 7
        assert all(width > 0 for _, width in widths), [src for src, width in widths if not width]
        shot = os.environ.get("SIMSEARCH_REPORT_SCREENSHOT") or str(tmp_path / "report.png")
        driver.save_screenshot(shot)
        assert Path(shot).stat().st_size > 0
    finally:
        driver.quit()


def test_metric_bars_draw_every_method_of_every_dataset(tmp_path):
    import cv2

    from simsearch.evaluation.plots import metric_bars

    path = metric_bars({"piped": {"a": 0.9, "b": None}, "mt": {"a": 0.8, "b": 0.7}}, "image AUROC",
                       tmp_path / "bars.png", "image AUROC")
    image = cv2.imread(path)
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 300
