"""The `simsearch` command as a user runs it: real processes, stdout/stderr and exit codes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from realdata import PIPED, needs_piped, piped_test, tiny_category

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
    assert all(-1 <= h["cosine"] <= 1 for h in hits["results"])


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


def test_index_kind_and_nprobe_are_fixed_at_creation_and_bad_values_refused(tmp_path):
    directory = tmp_path / "ix"
    simsearch("index", "add", *map(str, sorted((PIPED / "train" / "good").iterdir())[:2]), "--index-kind", "ivf-flat",
              "--nprobe", "5", index=directory)
    info = json.loads(simsearch("index", "info", "--json", index=directory).stdout)
    assert info["bank_kind"] == "ivf-flat" and info["nprobe"] == 5
    graph = tmp_path / "graph"  # for hnsw the same option sets efSearch
    simsearch("index", "add", *map(str, sorted((PIPED / "train" / "good").iterdir())[:2]), "--index-kind", "hnsw",
              "--nprobe", "40", index=graph)
    info = json.loads(simsearch("index", "info", "--json", index=graph).stdout)
    assert info["bank_kind"] == "hnsw" and info["nprobe"] == 40
    staged = tmp_path / "staged"  # the two-stage search is chosen at creation too
    simsearch("index", "add", *map(str, sorted((PIPED / "train" / "good").iterdir())[:2]), "--two-stage", "on",
              index=staged)
    assert json.loads(simsearch("index", "info", "--json", index=staged).stdout)["config"]["two_stage"] == "on"
    for option, value, message in (("--nprobe", "0", "nprobe must be >= 1"),
                                   ("--index-kind", "annoy", "index kind must be one of"),
                                   ("--two-stage", "maybe", "two stage must be auto, on or off")):
        proc = subprocess.run([sys.executable, "-m", "simsearch.cli", "eval", str(PIPED), option, value],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


# -- simsearch finetune / eval --finetune ----------------------------------------------------------------------
def test_finetune_writes_a_head_that_index_add_uses(tmp_path):
    head = tmp_path / "head.safetensors"
    goods = [str(p) for p in sorted((PIPED / "train" / "good").iterdir())[:5]]
    proc = simsearch("finetune", *goods, "--out", str(head), "--steps", "3", "--seed", "2", "--json",
                     index=tmp_path / "unused")
    record = json.loads(proc.stdout)
    assert record["out"] == str(head) and record["steps"] == 3 and record["images"] == 5
    assert head.is_file() and not (tmp_path / "unused").exists()
    directory = tmp_path / "ix"
    simsearch("index", "add", *goods[:3], "--weights", str(head), index=directory)
    info = json.loads(simsearch("index", "info", "--json", index=directory).stdout)
    assert info["config"]["head_sha256"] == record["sha256"] and info["config"]["weights"] == "embedded"
    # The frozen embedder is refused on a fine-tuned index (its own head is accepted: tests/test_engine.py).
    proc = simsearch("index", "add", str(piped_test("good")[1]), "--weights", "embedded", index=directory, check=False)
    assert proc.returncode == 1 and "without a head" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["/no/such/folder"], "no such file or folder"),
    ([str(PIPED / "train" / "good"), "--loss", "hinge"], "loss must be one of"),
    ([str(PIPED / "train" / "good"), "--defects", str(PIPED / "train" / "good")], "have no mask"),
])
def test_finetune_bad_input_fails_clearly_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out" / "head.safetensors"
    out.parent.mkdir()
    proc = simsearch("finetune", *args, "--out", str(out), "--steps", "2", index=tmp_path / "ix", check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert list(out.parent.iterdir()) == []


def test_eval_finetune_runs_end_to_end_on_a_tiny_real_subset(tmp_path):
    root = tiny_category(tmp_path / "data")
    proc = simsearch("eval", str(root), "--finetune", "--finetune-steps", "3", "--finetune-loss", "softmax",
                     "--folds", "2", "--json", index=tmp_path / "unused")
    category, mean = (json.loads(line) for line in proc.stdout.splitlines())
    assert category["category"] == "PA_BDP01_TL" and category["n_test_defect"] == 3
    assert category["finetune"]["loss"] == "softmax" and category["finetune"]["steps"] == 3
    assert category["finetune"]["images"] == 8  # trained on train/good only
    assert "finetune" in category["seconds"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= category[key] <= 1.0
    assert mean["finetune"] == {"loss": "softmax", "steps": 3, "seed": 0}


# -- every command's plain output, and file names printed as they are ------------------------------------------
ODD_NAMES = ["part[v2].bmp", "[bold]part.bmp", "[link=x]c.bmp", "a:smile:b.bmp"]


def test_every_command_prints_its_plain_output_with_file_names_as_they_are(index, tmp_path):
    """The CLI tests once ran only --json, which returned before `finetune`'s last line (a crash); rich read
    `part[v2].png` as markup and printed `part.png`, and a `[/x]` in a path was a traceback after the add had
    committed. Every command here runs without --json, on names that look like markup."""
    copy = tmp_path / "ix"
    shutil.copytree(index, copy)
    folder = tmp_path / "odd [" / "x] [bold]"  # "odd [/x] [bold]": a closing tag that opens nothing
    folder.mkdir(parents=True)
    odd = []
    for name, source in zip(ODD_NAMES, piped_test("good")[4:]):
        (folder / name).symlink_to(source)
        odd.append(str(folder / name))
    (folder / "dup [red].bmp").symlink_to(sorted((PIPED / "train" / "good").iterdir())[0])  # already in the index

    def plain(*args, expect: list[str]) -> str:
        proc = simsearch(*args, index=copy, check=False)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        for text in expect:
            assert text in proc.stdout, (args, text, proc.stdout[-2000:])
        return proc.stdout

    plain("index", "add", str(folder), expect=[f"added {len(odd)} images", f"skipped {folder / 'dup [red].bmp'}: "])
    plain("query", *odd, expect=odd)
    plain("search", odd[0], "--top-k", "2", expect=[str(PIPED / "train" / "good")])
    plain("index", "info", expect=["reference_images", str(copy)])
    plain("index", "check", expect=["consistent"])
    plain("index", "repair", expect=["nothing to repair", "consistent"])
    plain("calibrate", expect=["calibration #", "border levels: good images scored"])
    plain("index", "remove", odd[1], expect=["removed 1 images"])
    head = tmp_path / "head [x].safetensors"
    plain("finetune", *odd[:2], "--out", str(head), "--steps", "2", expect=[f"wrote {head}", f"--weights {head}"])
    root = tiny_category(tmp_path / "data")
    plain("eval", str(root), "--folds", "2", expect=["simsearch eval:", "| PA_BDP01_TL |"])
