"""bench/accuracy.py rewrites docs/benchmarks.md from its cache without dropping the rows the cache lacks."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import accuracy  # noqa: E402

DOC = """# Benchmarks

intro

## piped

| method | categories | image AUROC | pixel AUROC | AUPRO@0.3 | F1@thr | best F1 | FPR good (target 0.01) | run time |
|---|---|---|---|---|---|---|---|---|
| patchcore | 2 | 0.9900 | 0.9700 | 0.8100 | 0.9500 | 0.9900 | 0.0300 | 3.1 min |
| autoencoder | 2 | 0.9800 | 0.9790 | 0.8790 | 0.8700 | 0.9800 | 0.0300 | 31.6 min |

Image AUROC per category:

| category | patchcore | autoencoder |
|---|---|---|
| A | 1.0000 | 0.9700 |
| B | 0.9800 | 0.9900 |

Ablation on piped from the engine's defaults, then the changes named (`bench/accuracy.py --ablation VARIANT...`; variants in `ABLATION` there):

| variant | categories | image AUROC | pixel AUROC | AUPRO@0.3 | run time |
|---|---|---|---|---|---|
| patchcore | 2 | 0.9900 | 0.9700 | 0.8100 | 3.1 min |
| patchcore:top1 | 2 | 0.9800 | 0.9700 | 0.8100 | 2.0 min |

## Serving

| measure | value |
|---|---|
| p50 | 1 ms |
"""


def test_kept_tables_reads_the_dataset_sections_only():
    kept = accuracy.kept_tables(DOC)
    assert set(kept) == {"piped"}
    assert set(kept["piped"]["methods"]) == {"patchcore", "autoencoder"}
    assert kept["piped"]["per_category"]["autoencoder"] == {"A": "0.9700", "B": "0.9900"}
    assert set(kept["piped"]["ablation"]) == {"patchcore", "patchcore:top1"}


@pytest.fixture
def bench_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "OUT", tmp_path / "benchmarks.md")
    monkeypatch.setattr(accuracy, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(accuracy, "ROOT", tmp_path)  # no anomalib cache either
    (tmp_path / "benchmarks.md").write_text(DOC)
    return tmp_path


def test_a_rewrite_from_an_empty_cache_keeps_every_row(bench_dir):
    accuracy.write_markdown()
    text = (bench_dir / "benchmarks.md").read_text()
    for line in DOC.splitlines():
        if line.startswith("|"):
            assert line in text
    assert "## Serving" in text and text.count("## piped") == 1


def test_a_new_method_is_added_beside_the_kept_ones(bench_dir):
    for category, auroc in (("A", 0.5), ("B", 0.7)):
        path = accuracy.cache_file("vae", "piped", category)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"dataset": "piped", "category": category, "method": "vae", "image_auroc": auroc,
                                    "pixel_auroc": 0.9, "aupro": 0.6, "f1_at_threshold": 0.5, "best_f1": 0.8,
                                    "fpr_good": 0.0, "wall_seconds": 60.0}))
    accuracy.write_markdown()
    text = (bench_dir / "benchmarks.md").read_text()
    assert "| vae | 2 | 0.6000 | 0.9000 | 0.6000 | 0.5000 | 0.8000 | 0.0000 | 2.0 min |" in text
    assert "| category | patchcore | autoencoder | vae |" in text
    assert "| A | 1.0000 | 0.9700 | 0.5000 |" in text and "| B | 0.9800 | 0.9900 | 0.7000 |" in text
    assert "| patchcore:top1 | 2 | 0.9800 | 0.9700 | 0.8100 | 2.0 min |" in text
    assert (bench_dir / "accuracy_image_auroc.png").is_file()
