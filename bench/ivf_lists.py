"""What an IVF-SQ8 stage 2 costs at 1M vectors for more inverted lists (issue 19): recall@1 against exact search
and the time of 80 queries (about the patches an image refines) per nprobe.

Uses the 1M tier's vectors and the cached query patches (`perf.tier_vectors`; `bench/perf.py --steps export`
makes them):

    .venv/bin/python bench/ivf_lists.py 1024 4096
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import perf  # noqa: E402  (the tier vectors and cache folder)
from simsearch.runtime import tuned_faiss  # noqa: E402
from simsearch.store.kinds import TRAIN_PER_LIST  # noqa: E402


def main() -> None:
    faiss = tuned_faiss()
    bank, _ = perf.tier_vectors("1m")
    queries = np.load(perf.CACHE / "queries.f16.npy")[:800].astype(np.float32)
    dim = bank.shape[1]
    exact = faiss.IndexFlatL2(dim)
    exact.add(bank)
    _, truth = exact.search(queries, 1)
    rng = np.random.default_rng(0)
    for nlist in [int(x) for x in sys.argv[1:]] or [1024, 4096]:
        start = time.perf_counter()
        index = faiss.index_factory(dim, f"IVF{nlist},SQ8")
        index.train(bank[rng.choice(len(bank), min(len(bank), nlist * TRAIN_PER_LIST), replace=False)])
        index.add(bank)
        print(f"nlist {nlist}: build {time.perf_counter() - start:.1f} s", flush=True)
        for nprobe in (16, 32, 64, 128, 256):
            if nprobe > nlist:
                continue
            index.nprobe = nprobe
            start = time.perf_counter()
            index.search(queries[:80], 1)
            seconds = time.perf_counter() - start
            _, found = index.search(queries, 1)  # recall over all 800, untimed
            print(f"  nprobe {nprobe:4d}: recall@1 {np.mean(found[:, 0] == truth[:, 0]):.3f}, "
                  f"80 queries {seconds * 1000:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
