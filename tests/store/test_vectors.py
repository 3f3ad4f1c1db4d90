"""simsearch.store.vectors: FAISS flat and IVF indexes with stable ids."""
from __future__ import annotations

import numpy as np
import pytest

from simsearch.store.vectors import APPROX_FROM, VectorIndex, choose_kind, ivf_lists_for

DIM = 16


def _random(n, seed=0, dim=DIM):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _clustered(n, n_clusters=40, seed=0, dim=DIM):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32) * 5
    labels = rng.integers(0, n_clusters, n)
    return (centres[labels] + rng.standard_normal((n, dim)).astype(np.float32)).astype(np.float32)


def _exact(data, ids, queries, k=1):
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - data[None, :, :]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), ids[order]


@pytest.fixture(scope="module")
def clustered():
    data = _clustered(6000)
    ids = np.arange(6000, dtype=np.int64) * 3 + 100  # ids that are not positions
    queries = (data[np.random.default_rng(2).choice(6000, 300)] + 0.3 * _random(300, seed=3)).astype(np.float32)
    return data, ids, queries


def test_flat_search_returns_l2_not_squared():
    data = _random(200)
    ids = np.arange(1000, 1200, dtype=np.int64)
    index = VectorIndex.flat(DIM)
    assert index.kind == "flat" and index.nprobe is None and index.dim == DIM
    index.add(data, ids)
    assert index.ntotal == 200
    q = _random(20, seed=5)
    d, i = index.search(q, k=3)
    assert d.shape == i.shape == (20, 3) and d.dtype == np.float32 and i.dtype == np.int64
    ed, ei = _exact(data, ids, q, k=3)
    np.testing.assert_array_equal(i, ei)
    np.testing.assert_allclose(d, ed, rtol=1e-4)
    # a vector that is in the index is at distance 0 from itself, with its own id
    d0, i0 = index.search(data[17:18])
    assert i0[0, 0] == 1017 and d0[0, 0] == pytest.approx(0.0, abs=1e-3)


def test_distance_scale():
    index = VectorIndex.flat(2)
    index.add(np.array([[0, 0], [3, 4]], np.float32), np.array([7, 8]))
    d, i = index.search(np.array([[0, 0]], np.float32), k=2)
    assert i.tolist() == [[7, 8]]
    assert d.tolist() == [[0.0, 5.0]]  # 5, not 25


def test_search_more_than_held_pads_with_minus_one():
    index = VectorIndex.flat(2)
    index.add(np.array([[0, 0]], np.float32), np.array([4]))
    d, i = index.search(np.zeros((1, 2), np.float32), k=3)
    assert i.tolist() == [[4, -1, -1]]


def test_flat_remove_by_id():
    data = _random(100)
    ids = np.arange(100, dtype=np.int64) + 50
    index = VectorIndex.flat(DIM)
    index.add(data, ids)
    gone = np.array([50, 60, 149])
    assert index.remove(gone) == 3
    assert index.ntotal == 97
    assert index.remove(np.array([], dtype=np.int64)) == 0
    assert index.remove(np.array([60])) == 0  # already gone
    # searching exactly for a removed vector finds another one
    _, i = index.search(data[[0, 10, 99]], k=97)
    assert not np.isin(i, gone).any()
    assert set(i[0].tolist()) == set(ids.tolist()) - set(gone.tolist())
    # the rest still answer with their own id
    _, i1 = index.search(data[1:2])
    assert i1[0, 0] == 51


def test_empty_index_search_raises():
    with pytest.raises(ValueError, match="no vectors"):
        VectorIndex.flat(DIM).search(_random(1))


def test_wrong_dims_raise():
    index = VectorIndex.flat(DIM)
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        index.add(_random(3, dim=8), np.arange(3))
    with pytest.raises(ValueError, match=r"vectors must be \(N, 16\)"):
        index.add(_random(3)[0], np.arange(1))
    with pytest.raises(ValueError, match=r"ids must be \(3,\)"):
        index.add(_random(3), np.arange(4))
    index.add(_random(3), np.arange(3))
    with pytest.raises(ValueError, match=r"queries must be \(N, 16\)"):
        index.search(_random(2, dim=17))


def test_float64_input_is_accepted():
    index = VectorIndex.flat(DIM)
    data = _random(10).astype(np.float64)
    index.add(data, np.arange(10))
    _, i = index.search(data[3:4])
    assert i[0, 0] == 3


def test_ivf_recall_against_flat(clustered):
    data, ids, queries = clustered
    ivf = VectorIndex.ivf_flat(data)
    assert ivf.kind == "ivf-flat"
    nlist = ivf.index.nlist
    assert nlist == ivf_lists_for(len(data))
    assert 1 <= ivf.nprobe <= nlist
    ivf.add(data, ids)
    assert ivf.ntotal == len(data)
    flat = VectorIndex.flat(DIM)
    flat.add(data, ids)
    fd, fi = flat.search(queries)
    d, i = ivf.search(queries)
    recall = float((i[:, 0] == fi[:, 0]).mean())
    assert recall >= 0.9
    hit = i[:, 0] == fi[:, 0]
    np.testing.assert_allclose(d[hit, 0], fd[hit, 0], rtol=1e-4)
    # an IVF distance is a real distance to the id it names (approximate only in which one is found)
    pos = {int(v): n for n, v in enumerate(ids)}
    true = np.linalg.norm(queries - data[[pos[int(v)] for v in i[:, 0]]], axis=1)
    np.testing.assert_allclose(d[:, 0], true, rtol=1e-3)


def test_ivf_remove(clustered):
    data, ids, _ = clustered
    ivf = VectorIndex.ivf_flat(data)
    ivf.add(data, ids)
    gone = ids[:500]
    assert ivf.remove(gone) == 500
    assert ivf.ntotal == len(data) - 500
    ivf.nprobe = 10 ** 6  # clamped to nlist: exhaustive
    assert ivf.nprobe == ivf.index.nlist
    _, i = ivf.search(data[:500], k=5)
    assert not np.isin(i, gone).any()
    held_ids, _ = ivf.all_vectors()
    assert sorted(held_ids.tolist()) == sorted(ids[500:].tolist())


def test_ivf_nprobe_setter_clamps_and_flat_ignores():
    ivf = VectorIndex.ivf_flat(_clustered(2000), nlist=16)
    ivf.nprobe = 0
    assert ivf.nprobe == 1
    ivf.nprobe = 5
    assert ivf.nprobe == 5
    flat = VectorIndex.flat(DIM)
    flat.nprobe = 5
    assert flat.nprobe is None


@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_save_load_round_trip(tmp_path, clustered, kind):
    data, ids, queries = clustered
    index = VectorIndex.flat(DIM) if kind == "flat" else VectorIndex.ivf_flat(data)
    index.add(data, ids)
    index.remove(ids[::7])
    before = index.search(queries, k=4)
    path = tmp_path / "bank.faiss"
    index.save(path)
    assert path.is_file() and not (tmp_path / "bank.faiss.tmp").exists()
    loaded = VectorIndex.load(path)
    assert loaded.kind == kind and loaded.ntotal == index.ntotal and loaded.dim == DIM
    assert loaded.nprobe == index.nprobe
    after = loaded.search(queries, k=4)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    index.save(path)  # overwriting works
    assert VectorIndex.load(path).ntotal == index.ntotal


@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_all_vectors_round_trip(clustered, kind):
    data, ids, _ = clustered
    index = VectorIndex.flat(DIM) if kind == "flat" else VectorIndex.ivf_flat(data)
    index.add(data, ids)
    index.remove(ids[10:20])
    got_ids, got_vecs = index.all_vectors()
    assert got_ids.dtype == np.int64 and got_vecs.dtype == np.float32
    assert got_vecs.shape == (len(data) - 10, DIM)
    keep = np.ones(len(ids), bool)
    keep[10:20] = False
    order = np.argsort(got_ids)
    np.testing.assert_array_equal(got_ids[order], ids[keep])  # ids are increasing
    np.testing.assert_array_equal(got_vecs[order], data[keep])


def test_all_vectors_of_empty_indexes():
    ids, vecs = VectorIndex.flat(DIM).all_vectors()
    assert ids.shape == (0,) and vecs.shape == (0, DIM)
    ids, vecs = VectorIndex.ivf_flat(_clustered(2000), nlist=16).all_vectors()
    assert ids.shape == (0,) and vecs.shape == (0, DIM)


def test_rebuilt_as_keeps_all_ids(clustered):
    data, ids, queries = clustered
    flat = VectorIndex.flat(DIM)
    flat.add(data[:5000], ids[:5000])
    ivf = flat.rebuilt_as("ivf-flat", extra=(data[5000:], ids[5000:]))
    assert ivf.kind == "ivf-flat" and ivf.ntotal == len(data)
    got, vecs = ivf.all_vectors()
    order = np.argsort(got)
    np.testing.assert_array_equal(got[order], ids)
    np.testing.assert_array_equal(vecs[order], data)
    back = ivf.rebuilt_as("flat")
    assert back.kind == "flat"
    full = VectorIndex.flat(DIM)
    full.add(data, ids)
    np.testing.assert_array_equal(back.search(queries)[1], full.search(queries)[1])


def test_load_garbage_raises_value_error(tmp_path):
    path = tmp_path / "bank.faiss"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not a readable FAISS index"):
        VectorIndex.load(path)
    with pytest.raises(ValueError, match="not a readable FAISS index"):
        VectorIndex.load(tmp_path / "missing.faiss")


def test_ivf_lists_for_leaves_at_least_64_vectors_per_list():
    previous = 0
    for n in (0, 1, 63, 64, 100, 1000, 6000, 50_000, 200_000, 10 ** 6, 10 ** 7):
        nlist = ivf_lists_for(n)
        assert isinstance(nlist, int) and nlist >= 1
        assert nlist <= max(1, n // 64)
        assert nlist >= previous  # more vectors never get fewer lists
        previous = nlist
    assert ivf_lists_for(10 ** 6) > 64  # large banks are really partitioned


def test_choose_kind():
    assert choose_kind("auto", 0) == "flat"
    assert choose_kind("auto", APPROX_FROM - 1) == "flat"
    assert choose_kind("auto", APPROX_FROM) == "ivf-flat"
    assert choose_kind("flat", 10 ** 9) == "flat"
    assert choose_kind("ivf-flat", 10) == "ivf-flat"
    with pytest.raises(ValueError, match="unknown index kind"):
        choose_kind("hnsw", 10)
