"""simsearch.runtime: one thread count for torch and faiss."""
from __future__ import annotations

import os
import subprocess
import sys

import faiss
import pytest
import torch

from simsearch.runtime import configure_threads, thread_count


@pytest.fixture()
def restore_threads():
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


def test_torch_and_faiss_get_the_same_count(restore_threads, monkeypatch):
    monkeypatch.delenv("SIMSEARCH_THREADS", raising=False)
    torch.set_num_threads(1)
    n = configure_threads()  # torch's setting (the caller's choice) is kept
    assert n == torch.get_num_threads() == faiss.omp_get_max_threads()
    monkeypatch.setenv("SIMSEARCH_THREADS", "2")
    assert thread_count() == 2 and configure_threads() == 2
    assert torch.get_num_threads() == faiss.omp_get_max_threads() == 2
    monkeypatch.setenv("SIMSEARCH_THREADS", "0")
    with pytest.raises(ValueError, match="SIMSEARCH_THREADS"):
        thread_count()


def test_importing_simsearch_sets_a_passive_wait_policy_unless_told_otherwise():
    code = "import os, simsearch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


def test_loading_the_index_code_turns_on_faiss_exact_search_blas_path():
    # faiss 1.15 defaults to its per-query loop below 128,000 queries; a fresh process shows what ours sets
    code = ("import faiss; before = faiss.cvar.distance_compute_blas_threshold; import simsearch.store.vectors; "
            "from simsearch.runtime import BLAS_FROM_QUERIES as b; "
            "print(before, faiss.cvar.distance_compute_blas_threshold, b)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, wanted = map(int, out.stdout.split())
    assert after == wanted < before
