"""What a query costs beyond the search (issue 19): three measurements on real tiles, one process, 2 threads.

- blas: faiss exact search of 768 queries (one image's patches) against 10,000 vectors with faiss 1.15's default
  `distance_compute_blas_threshold` (128,000 queries) against ours (`runtime.BLAS_FROM_QUERIES`).
- floor: `Engine.query` against the embedder's tile forward alone (as `bench/perf.py`'s latency steps) with banks of
  1,000 and 10,000 real vectors: the pipeline's cost where the search costs almost nothing; each with
  onnxruntime's workers sleeping after a run (the embedder's setting) and spinning (onnxruntime's default).

Needs `bench/perf.py --steps export` first (the tier vectors):

    .venv/bin/python bench/query_floor.py        # writes bench/.cache/perf/query-floor.json
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf  # noqa: E402  (the tier vectors, image lists and cache folder)


def median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def blas(faiss, base: np.ndarray, queries: np.ndarray) -> dict:
    from simsearch.runtime import BLAS_FROM_QUERIES
    out = {}
    for threshold in (128_000, BLAS_FROM_QUERIES):
        faiss.cvar.distance_compute_blas_threshold = threshold
        out[f"threshold_{threshold}_ms"] = median_ms(lambda: faiss.knn(queries, base, 1), rounds=5)
    return out


def spinning_session(embedder):
    """A second onnxruntime session of the embedder's model with onnxruntime's default: workers spin after a run."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = embedder.session.get_session_options().intra_op_num_threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(embedder.model_file), options, providers=["CPUExecutionProvider"])


def floor(engine, vectors: np.ndarray, ids: np.ndarray) -> dict:
    from simsearch.images import load_image
    from simsearch.store.banks import BankView
    from simsearch.store.vectors import VectorIndex
    committed = engine.banks.view()
    decoded = [load_image(p).rgb for p in perf.test_images()[::29][:20]]
    emb, out = engine.embedder, {}
    engine.banks.two_stage = "off"
    sessions = {"workers_sleep": emb.session, "workers_spin": spinning_session(emb)}
    for (n, workers) in [(n, w) for n in (1_000, 10_000) for w in sessions]:
        emb.session = sessions[workers]
        engine.banks.pin(BankView(committed.generation, VectorIndex.from_vectors("flat", vectors[:n], ids[:n]),
                                  committed.images))
        engine.query(decoded[0])  # warm
        forward, query, _ = zip(*(perf.forward_then_query(engine, rgb) for rgb in decoded))
        out[f"bank_{n}_{workers}"] = {"forward_p50_ms": 1000 * float(np.median(forward)),
                            "query_p50_ms": 1000 * float(np.median(query)),
                            "ratio_p50": float(np.median(np.asarray(query) / np.asarray(forward)))}
    emb.session = sessions["workers_sleep"]
    return out


def main() -> None:
    from simsearch import Engine
    from simsearch.runtime import configure_threads, tuned_faiss
    faiss = tuned_faiss()
    tmp = tempfile.TemporaryDirectory()
    engine = Engine.create(Path(tmp.name) / "index")
    engine.add([str(perf.train_images()[0])])
    configure_threads(2)
    if engine.embedder.runtime != "onnxruntime":
        raise SystemExit("the floor with spinning workers needs the onnxruntime embedder (the default where installed)")
    vectors, ids = perf.tier_vectors("10k")
    queries = np.load(perf.CACHE / "queries.f16.npy")[:768].astype(np.float32)
    result = {"blas": blas(faiss, vectors, queries)}
    tuned_faiss()  # back to the setting the engine runs with
    result["floor"] = floor(engine, vectors, ids)
    engine.close()
    (perf.CACHE / "query-floor.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
