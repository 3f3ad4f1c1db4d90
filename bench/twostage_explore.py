"""One-off exploration of the two-stage search on the 1M tier (issue 19): stage-1 cost and refined patches per
image for 4 / 8 / 16 retrieved reference images, stage-1 / exact distance ratios, image-score differences and top-16
overlap against exact (flat) search, on the 20 images of latency-1m. Needs `bench/perf.py --steps export` first:

    PYTHONPATH=. nice -n 10 .venv/bin/python bench/twostage_explore.py
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.argv = sys.argv[:1]
import numpy as np
import perf  # noqa: E402
from simsearch.runtime import configure_threads
from simsearch.store.vectors import VectorIndex
from simsearch.store.spreads import SpreadTable
from simsearch.store.twostage import TwoStageBank, image_groups
from simsearch.scoring import two_stage_neighbours, patch_scores, score_vectors
from simsearch.config import SearchConfig
from simsearch.images import load_image
configure_threads(2)
vectors, ids = perf.tier_vectors("1m")
owners, images = perf.tier_two_stage_parts("1m", ids)
t = time.time(); bank = VectorIndex.from_vectors("flat", vectors, ids); print("flat build", time.time() - t, flush=True)
t = time.time(); table = SpreadTable.computed(bank); print("spreads", time.time() - t, flush=True)
groups = image_groups(owners)
emb = perf.default_embedder()
paths = perf.test_images()[::29][:20]
grids = [g.features.reshape(-1, 152) for g in emb.embed_many(load_image(p) for p in paths)]
search = SearchConfig()
exact_typical = None
res = {}
for R in (4, 8, 16):
    ts = TwoStageBank(bank, images, groups, table, images_per_query=R)
    rows = []
    for q in grids:
        t = time.perf_counter(); d1, i1 = ts.coarse_search(q, 1); c = time.perf_counter() - t
        d, i, refined = two_stage_neighbours(ts, q, search)
        rows.append((c, refined.sum(), d1[:, 0], d[:, 0]))
    res[R] = rows
    print("R", R, "coarse ms p50", 1000 * np.median([r[0] for r in rows]), "refined p50/max", np.median([r[1] for r in rows]), max(r[1] for r in rows), flush=True)
# exact per image
t = time.time()
ex = [bank.search(q, 1) for q in grids]; print("exact", time.time() - t, flush=True)
typ = bank.typical_spread(); print("typical exact", typ, "table", table.typical, flush=True)
for R, rows in res.items():
    ratios = np.concatenate([r[2] / np.maximum(e[0][:, 0], 1e-6) for r, e in zip(rows, ex)])
    fin = np.concatenate([r[3] / np.maximum(e[0][:, 0], 1e-6) for r, e in zip(rows, ex)])
    print("R", R, "stage1/exact p50 %.3f p90 %.3f p99 %.3f; within 1%%: %.3f; final p50 %.3f p90 %.3f within1%% %.3f" % (
        np.median(ratios), np.percentile(ratios, 90), np.percentile(ratios, 99), (ratios < 1.01).mean(),
        np.median(fin), np.percentile(fin, 90), (fin < 1.01).mean()), flush=True)
# image scores exact vs two-stage, top-16 overlap
for R in (4, 8, 16):
    ts = TwoStageBank(bank, images, groups, table, images_per_query=R)
    diffs, overlaps = [], []
    for q in grids:
        a = score_vectors(bank, q, search); b = score_vectors(ts, q, search)
        diffs.append(b.image_score / a.image_score - 1)
        overlaps.append(len(set(np.argsort(a.scores)[-16:]) & set(np.argsort(b.scores)[-16:])) / 16)
    print("R", R, "image score rel diff max %.4f mean %.4f; top16 plain overlap mean %.3f" % (np.max(np.abs(diffs)), np.mean(diffs), np.mean(overlaps)), flush=True)
