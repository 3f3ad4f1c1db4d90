"""A live line (issue 17): no blind spots after an add, calibration without a holdout, the foreign-image check,
drift. The engine on the tiny embedder (tests/fakes.py), then the command line on real data."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from fakes import TinyEmbedder, texture, write_images
from realdata import DATASETS, PIPED, needs_piped, piped_test, piped_train
from simsearch import drift
from simsearch.engine import Engine
from simsearch.errors import BadInput, IndexNotReady


@pytest.fixture
def calibrated(tmp_path):
    """10 good images, 3 held out, calibrated."""
    engine = Engine.create(tmp_path / "index", embedder=TinyEmbedder())
    engine.add(write_images(tmp_path / "good", range(10)), holdout=0.3)
    engine.calibrate()
    yield engine, tmp_path
    engine.close()


def grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


# -- 1. no blind spot after an add --------------------------------------------------------------------------
def test_an_add_recalibrates_in_its_own_commit(calibrated):
    engine, tmp = calibrated
    first = engine.latest_calibration()
    report = engine.add(write_images(tmp / "more", range(50, 52)))
    latest = engine.latest_calibration()
    assert report.calibration is None and latest["id"] != first["id"]
    assert latest["generation"] == report.generation == engine.generation  # committed with the new generation
    assert latest["n_good"] == first["n_good"] and latest["target_fpr"] == first["target_fpr"]
    result = engine.query(texture(300))
    assert isinstance(result.is_anomalous, bool) and result.warning is None
    assert result.calibration_generation == result.generation


def test_an_add_not_recalibrated_keeps_verdicts_marked_as_predating_it(calibrated):
    engine, tmp = calibrated
    measured_on = engine.generation
    first = engine.add(write_images(tmp / "more", [50]), recalibrate=False)
    second = engine.add(write_images(tmp / "more2", [51]), recalibrate=False)
    assert "predating" in first.calibration and "predating" in second.calibration
    result = engine.query(texture(300))
    assert isinstance(result.is_anomalous, bool)
    assert result.calibration_generation == measured_on < result.generation  # still the first measurement
    assert "before the adds since" in result.warning
    info = engine.info()
    assert info["verdicts"] is True and info["calibration_fresh"] is False
    assert info["calibration_generation"] == measured_on


def test_a_remove_not_recalibrated_leaves_no_verdict_and_one_recalibrated_gives_them_back(calibrated):
    engine, _tmp = calibrated
    refs = engine.images("reference")
    result = engine.remove([refs[0]["path"]], recalibrate=False)
    assert "null" in result["calibration"]
    assert engine.query(texture(300)).is_anomalous is None
    result = engine.remove([refs[1]["path"]])
    assert result["calibration"] is None and isinstance(engine.query(texture(300)).is_anomalous, bool)


def test_an_add_that_rebuilds_the_bank_as_another_kind_is_not_carried_over(calibrated):
    engine, tmp = calibrated
    engine.ingest.kind_policy = lambda kind, n: "hnsw"  # approximate search: scores may rise
    report = engine.add(write_images(tmp / "more", [50]), recalibrate=False)
    assert engine.bank.kind == "hnsw" and "null" in report.calibration
    assert engine.query(texture(300)).is_anomalous is None


def test_a_recalibration_that_cannot_read_its_images_leaves_the_add_with_a_note(calibrated):
    engine, tmp = calibrated
    for row in engine.images("calibration"):
        os.remove(row["path"])
    report = engine.add(write_images(tmp / "more", [50]))
    assert report.added and "not recalibrated" in report.calibration and "predating" in report.calibration
    assert isinstance(engine.query(texture(300)).is_anomalous, bool)


def test_a_failing_recalibration_fails_the_whole_add(calibrated, monkeypatch):
    """The recalibration runs inside the add's transaction: a bug there commits nothing."""
    engine, tmp = calibrated
    before = engine.info()

    def broken(*_args):
        raise RuntimeError("bug")
    monkeypatch.setattr(engine.calibrations, "_recalibration", broken)
    with pytest.raises(RuntimeError):
        engine.add(write_images(tmp / "more", [50]))
    after = engine.info()
    assert after["generation"] == before["generation"] and after["reference_images"] == before["reference_images"]
    assert engine.latest_calibration()["id"] == before["calibration"]["id"] and engine.check()["ok"]


# -- 2. calibration without a separate holdout --------------------------------------------------------------
def test_folds_calibrate_an_index_built_without_a_holdout_and_recalibrate_after_an_add(tmp_path):
    engine = Engine.create(tmp_path / "index", embedder=TinyEmbedder())
    engine.add(write_images(tmp_path / "good", range(12)))
    with pytest.raises(IndexNotReady, match="--folds"):
        engine.calibrate()
    with pytest.raises(BadInput):
        engine.calibrate(folds=1)
    cal = engine.calibrate(folds=4)
    assert cal.n_good == 12 and "4 folds" in cal.method and cal.generation == engine.generation
    assert engine.query(texture(300)).is_anomalous is False
    assert engine.query(texture(301, defect=True)).is_anomalous is True
    engine.add(write_images(tmp_path / "more", [50]))
    latest = engine.latest_calibration()
    assert latest["details"]["source"] == {"kind": "folds", "folds": 4, "order": "capture"}
    assert latest["n_good"] == 13 and sorted(set(latest["details"]["good_folds"])) == [0, 1, 2, 3]
    assert latest["generation"] == engine.generation
    engine.close()


def test_holdout_moves_bank_images_into_the_calibration_set(tmp_path):
    engine = Engine.create(tmp_path / "index", embedder=TinyEmbedder())
    goods = write_images(tmp_path / "good", range(8))
    engine.add(goods)
    vectors = engine.info()["bank_vectors"]
    result = engine.hold_out(goods[:3])
    info = engine.info()
    assert result["held_out"] and info["reference_images"] == 5 and info["calibration_images"] == 3
    assert info["bank_vectors"] < vectors and engine.check()["ok"]
    assert engine.calibrate().n_good == 3
    assert "already in the index (calibration" in engine.add(goods[:1]).skipped[0][1]
    with pytest.raises(BadInput, match="calibration images already"):
        engine.hold_out(goods[:1])
    with pytest.raises(BadInput, match="bank empty"):
        engine.hold_out(goods[3:])
    with pytest.raises(BadInput, match="not in the index"):
        engine.hold_out(["/no/such.png"])
    assert engine.info()["reference_images"] == 5
    engine.close()


def test_an_add_of_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    engine = Engine.create(tmp_path / "index", embedder=TinyEmbedder())
    with pytest.raises(BadInput, match="no image files"):
        engine.add([str(tmp_path / "empty")])
    assert engine.info()["generation"] == 0
    engine.close()


# -- 3. images that do not belong to the bank --------------------------------------------------------------
def test_grey_copies_and_odd_shapes_are_not_comparable_and_get_no_verdict(calibrated):
    engine, _tmp = calibrated
    good = engine.query(texture(300))
    assert good.comparable is True and good.is_anomalous is False
    bad = engine.query(texture(301, defect=True))
    assert bad.comparable is True and bad.is_anomalous is True  # a defect is not a foreign image
    for foreign, why in ((grey(texture(300)), "grey image"), (np.tile(texture(300), (1, 2, 1)), "aspect ratio")):
        result = engine.query(foreign)
        assert result.comparable is False and result.is_anomalous is None and not result.regions
        assert why in result.warning


def test_a_colour_image_against_a_grey_bank_is_not_comparable(tmp_path):
    engine = Engine.create(tmp_path / "index", embedder=TinyEmbedder())
    folder = tmp_path / "grey"
    folder.mkdir()
    paths = []
    for seed in range(8):
        paths.append(str(folder / f"g{seed}.png"))
        cv2.imwrite(paths[-1], cv2.cvtColor(texture(seed), cv2.COLOR_RGB2GRAY))
    engine.add(paths, holdout=0.3)
    engine.calibrate()
    assert engine.query(grey(texture(300))).comparable is True
    result = engine.query(texture(300))
    assert result.comparable is False and "colour image" in result.warning
    engine.close()


# -- 4. drift ------------------------------------------------------------------------------------------------
def test_the_beta_binomial_tail_is_the_exact_rank_count():
    """The count of n new exchangeable scores above the k-th largest of N old ones, by enumerating every
    equally likely ordering of the N + n scores (small cases), against drift.beta_binomial_upper_tail."""
    from itertools import combinations
    for n_cal, n, k in ((3, 2, 1), (5, 4, 2), (6, 5, 1)):
        counts = np.zeros(n + 1)
        for new_ranks in combinations(range(n_cal + n), n):  # positions of the new scores, 0 = the largest
            old = [r for r in range(n_cal + n) if r not in new_ranks]
            counts[sum(r < old[k - 1] for r in new_ranks)] += 1
        pmf = counts / counts.sum()
        for x in range(n + 2):
            assert drift.beta_binomial_upper_tail(x, n, k, n_cal) == pytest.approx(pmf[x:].sum(), abs=1e-12)


def test_drift_is_quiet_on_good_parts_and_loud_when_every_part_scores_high(tmp_path):
    engine = Engine.create(tmp_path / "index", embedder=TinyEmbedder())
    engine.add(write_images(tmp_path / "good", range(40)), holdout=0.5)  # 20 to calibrate on: drift can speak
    engine.calibrate()
    assert engine.drift()["queries"] == 0 and engine.drift()["drifting"] is None
    engine.query_many([texture(400 + i) for i in range(drift.MIN_QUERIES)])
    quiet = engine.drift()
    assert quiet["queries"] == drift.MIN_QUERIES and quiet["drifting"] is False and quiet["p_value"] > drift.ALPHA
    engine.query_many([texture(500 + i, defect=True) for i in range(drift.MIN_QUERIES)])
    loud = engine.info()["drift"]
    assert loud["drifting"] is True and loud["share"] >= 0.5
    engine.query_many([grey(texture(600))])  # a foreign image says nothing about drift
    assert engine.drift()["queries"] == loud["queries"]


def test_queries_need_no_writable_log(calibrated):
    engine, _tmp = calibrated
    engine.query_log.path = Path("/proc/no/such/folder/queries.sqlite")
    assert isinstance(engine.query(texture(300)).is_anomalous, bool)
    assert engine.drift()["queries"] == 0


# -- the command line on real data (the "done when", on PIPED PA_BDP01_TL) ----------------------------
def simsearch(*args: str, index: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "simsearch.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, SIMSEARCH_INDEX=str(index)), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"simsearch {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def json_lines(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


@needs_piped
def test_the_line_engineer_s_day_from_the_command_line(tmp_path):
    index = tmp_path / "index"
    train = [str(p) for p in piped_train()]
    simsearch("index", "add", *train[:-2], index=index)
    refused = simsearch("calibrate", index=index, check=False)
    assert refused.returncode == 1 and "--folds" in refused.stderr
    simsearch("calibrate", "--folds", "5", index=index)
    added = json.loads(simsearch("index", "add", *train[-2:], "--json", index=index).stdout)
    assert len(added["added"]) == 2 and added["calibration"] is None  # recalibrated with the add
    goods = json_lines(simsearch("query", str(PIPED / "test" / "good"), "--json", index=index))
    assert len(goods) == len(piped_test("good"))  # a folder is taken
    assert all(r["comparable"] is True and isinstance(r["is_anomalous"], bool) for r in goods)
    tile = sorted((DATASETS / "magnetic_tile" / "magnetic_tile" / "test" / "good").iterdir())[0]
    foreign = simsearch("query", str(tile), index=index)
    assert foreign.stdout.splitlines()[1].startswith("FOREIGN") and "not comparable" in foreign.stderr
    record = json_lines(simsearch("query", str(tile), "--json", index=index))[0]
    assert record["comparable"] is False and record["is_anomalous"] is None
    info = json.loads(simsearch("index", "info", "--json", index=index).stdout)
    assert info["calibration_fresh"] is True and info["drift"]["queries"] == len(goods)
    assert simsearch("--version", index=index).stdout.startswith("simsearch ")
    assert "<bool>" not in simsearch("query", "--help", index=index).stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = simsearch("index", "add", str(empty), index=tmp_path / "new", check=False)
    assert proc.returncode == 1 and "no image files" in proc.stderr and not (tmp_path / "new").exists()
