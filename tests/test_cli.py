"""The `simsearch` command as a user runs it: real processes, stdout/stderr and exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from realdata import PIPED, needs_piped, piped_test

pytestmark = needs_piped
QUERY_KEYS = {"image", "score", "threshold", "is_anomalous", "similarity", "regions", "heatmap", "generation",
              "calibration_id", "fingerprint"}


def simsearch(*args: str, index: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, SIMSEARCH_INDEX=str(index))
    proc = subprocess.run([sys.executable, "-m", "simsearch.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"simsearch {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "index"
    added = simsearch("index", "add", str(PIPED / "train" / "good"), "--holdout", "0.25", "--json", index=directory)
    report = json.loads(added.stdout)
    assert len(report["added"]) == 23 and len(report["held_out"]) == 8 and len(report["skipped"]) == 1
    simsearch("calibrate", index=directory)
    return directory


def test_query_json_lines_have_the_documented_keys(index, tmp_path):
    images = [str(p) for p in piped_test("good")[:3] + piped_test("impurity")[:3]]
    heatmaps = tmp_path / "heat"
    proc = simsearch("query", *images, "--json", "--heatmap-dir", str(heatmaps), index=index)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in lines] == images  # the paths exactly as given, in order
    for record in lines:
        assert QUERY_KEYS <= set(record)
        assert isinstance(record["is_anomalous"], bool)
        assert 0.0 <= record["similarity"] <= 1.0
        assert Path(record["heatmap"]).is_file()
        for region in record["regions"]:
            assert {"x", "y", "w", "h", "score", "nearest"} <= set(region)
            assert {"image", "x", "y", "distance"} <= set(region["nearest"])
    assert sum(r["is_anomalous"] for r in lines[3:]) >= 2  # defects are flagged...
    assert proc.returncode == 0  # ...and an anomaly is not an error
    assert len(list(heatmaps.iterdir())) == 6


def test_query_with_a_missing_file_reports_it_and_fails_but_answers_the_rest(index):
    good = str(piped_test("good")[0])
    proc = simsearch("query", good, "/no/such/file.png", "--json", index=index, check=False)
    assert proc.returncode == 1
    assert "/no/such/file.png" in proc.stderr
    assert [json.loads(line)["image"] for line in proc.stdout.splitlines()] == [good]


def test_info_and_search(index):
    info = json.loads(simsearch("index", "info", "--json", index=index).stdout)
    assert info["reference_images"] == 23 and info["calibration_fresh"] is True
    assert info["config"]["backbone"] == "tf_efficientnet_lite1"
    hits = json.loads(simsearch("search", str(piped_test("good")[0]), "--top-k", "4", "--json", index=index).stdout)
    assert len(hits["results"]) == 4
    assert all(0 <= h["similarity"] <= 1 for h in hits["results"])


def test_uncalibrated_query_says_so_and_has_null_verdict(tmp_path):
    directory = tmp_path / "ix"
    simsearch("index", "add", *[str(p) for p in sorted((PIPED / "train" / "good").iterdir())[:4]], index=directory)
    proc = simsearch("query", str(piped_test("good")[0]), "--json", index=directory)
    record = json.loads(proc.stdout)
    assert record["is_anomalous"] is None and record["threshold"] is None and record["similarity"] is None
    assert "calibrate" in proc.stderr


def test_errors_are_one_clear_line(tmp_path):
    proc = simsearch("query", str(piped_test("good")[0]), index=tmp_path / "nothing", check=False)
    assert proc.returncode == 1
    assert "no index in" in proc.stderr and "Traceback" not in proc.stderr
    proc = simsearch("index", "add", str(piped_test("good")[0]), "--backbone", "no_such_model_xyz",
                     index=tmp_path / "ix", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "no_such_model_xyz" in proc.stderr


def test_a_failed_first_add_leaves_no_index_behind(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    directory = tmp_path / "ix"
    proc = simsearch("index", "add", str(bad), index=directory, check=False)
    assert proc.returncode == 1 and "bad.png" in proc.stderr
    assert not directory.exists()
