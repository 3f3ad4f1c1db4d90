"""Recall@1 of an index's approximate patch bank against exact search, on real query patches.

Usage: .venv/bin/python bench/ivf_recall.py INDEX_DIR 'TEST_IMAGES_GLOB' [--nprobe 16 32 64] [--kind ivf-sq8]
Embeds every 60th test image, samples 3,000 of their patch vectors, and compares the bank's answer
with faiss IndexFlatL2 over the same vectors. `--kind`: the bank's vectors rebuilt as that kind first.
"""
from __future__ import annotations

import argparse
import glob
import time

import faiss
import numpy as np

from simsearch import Engine
from simsearch.images import load_image
from simsearch.store.vectors import VectorIndex


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("index")
    parser.add_argument("images")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--kind", help="rebuild the bank's vectors as this index kind first")
    args = parser.parse_args()
    engine = Engine.open(args.index)
    bank = engine.bank
    ids, vectors = bank.all_vectors()
    if args.kind:
        bank = VectorIndex.from_vectors(args.kind, vectors, ids)
    if bank.kind == "flat":
        raise SystemExit("this bank is exact already")
    exact = faiss.IndexFlatL2(vectors.shape[1])
    exact.add(vectors)
    files = sorted(glob.glob(args.images))[::60]
    patches = np.concatenate([engine.embedder.embed(load_image(f)).features.reshape(-1, vectors.shape[1])
                              for f in files])
    pick = np.random.default_rng(0).choice(len(patches), min(args.queries, len(patches)), replace=False)
    queries = patches[pick]
    start = time.perf_counter()
    d_exact, i_exact = exact.search(queries, 1)
    t_exact = time.perf_counter() - start
    d_exact = np.sqrt(np.maximum(d_exact[:, 0], 0))
    print(f"bank {bank.ntotal} vectors, {len(queries)} query patches from {len(files)} images")
    for nprobe in args.nprobe:
        bank.nprobe = nprobe
        start = time.perf_counter()
        d_approx, i_approx = bank.search(queries, 1)
        t_approx = time.perf_counter() - start
        recall = float((ids[i_exact[:, 0]] == i_approx[:, 0]).mean())
        excess = float((d_approx[:, 0] - d_exact).mean() / d_exact.mean())
        print(f"nlist {bank.nlist} nprobe {nprobe}: recall@1 {recall:.3f}, mean distance {excess:+.2%} "
              f"vs exact, search {t_approx:.2f} s vs exact {t_exact:.2f} s")


if __name__ == "__main__":
    main()
