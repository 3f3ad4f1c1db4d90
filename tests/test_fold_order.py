"""Threshold folds in capture order: each fold a run of neighbouring images (mostly one batch), so the
threshold is measured the way a new batch will meet it; the spread of the folds says how fragile it is."""
import numpy as np
import pytest

from simsearch import Engine
from simsearch.calibrator import capture_key, fold_of, fold_spread
from simsearch.errors import BadInput
from fakes import TinyEmbedder, write_images


def test_capture_order_compares_counters_as_numbers():
    names = ["line/b2/part_10.png", "line/b10/part_1.png", "line/b2/part_9.png", "line/b1/part_3.png"]
    assert sorted(names, key=capture_key) == ["line/b1/part_3.png", "line/b2/part_9.png", "line/b2/part_10.png",
                                             "line/b10/part_1.png"]


def test_capture_folds_are_contiguous_runs_and_interleaved_ones_are_not():
    # Stored in a shuffled order: the folds follow the names, not the storage.
    names = [f"exp{b}_num_{i}.jpg" for b in (1, 2, 3) for i in (5, 40, 300, 2000)]
    shuffled = [names[i] for i in np.random.default_rng(0).permutation(len(names))]
    fold = fold_of(shuffled, 3)
    by_name = dict(zip(shuffled, fold))
    assert [by_name[n] for n in names] == [0] * 4 + [1] * 4 + [2] * 4  # one batch per fold
    assert list(fold_of(names, 3, "interleaved")) == [0, 1, 2] * 4
    uneven = fold_of([f"{i}" for i in range(11)], 4)
    assert sorted(np.bincount(uneven)) == [2, 3, 3, 3] and (np.diff(uneven) >= 0).all()
    with pytest.raises(BadInput, match="fold order"):
        fold_of(names, 3, "random")


def test_fold_spread_reports_each_folds_own_threshold_and_false_alarms():
    scores = np.array([1.0, 2.0, 3.0, 10.0, 11.0, 12.0])
    spread = fold_spread(scores, np.array([0, 0, 0, 1, 1, 1]), threshold=10.5, target_fpr=0.01)
    assert spread["thresholds"] == [3.0, 12.0]  # too few per fold for 1%: each fold's largest
    assert spread["false_alarms"] == [0.0, pytest.approx(2 / 3)]


def test_calibrate_folds_in_capture_order_records_the_order_and_the_spread(tmp_path):
    engine = Engine.create(tmp_path / "index", embedder=TinyEmbedder())
    engine.add(write_images(tmp_path / "good", range(12)))
    cal = engine.calibrate(folds=3)
    latest = engine.latest_calibration()
    assert latest["details"]["source"]["order"] == "capture" and "capture order" in cal.method
    assert len(cal.fold_spread["thresholds"]) == 3 and len(cal.fold_spread["false_alarms"]) == 3
    refs = engine.catalog.images("reference")
    folds = fold_of([r["path"] for r in refs], 3)
    # the measures come fold by fold: the stored fold labels are those folds, each with its 4 images
    assert sorted(latest["details"]["good_folds"]) == sorted(folds.tolist())
    interleaved = engine.calibrate(folds=3, fold_order="interleaved")
    assert "interleaved order" in interleaved.method
    with pytest.raises(BadInput, match="fold order"):
        engine.calibrate(folds=3, fold_order="by-date")
    assert engine.latest_calibration()["id"] == interleaved.id  # the refused call stored nothing
    engine.close()
