"""The Ray code paths (simsearch/distributed/) on a local two-CPU Ray cluster, one per module (its
start-up costs seconds): an add through Ray builds what a local add builds, a sharded bank answers as
one bank, the categories of an eval fan out as tasks, a worker lost mid-add has its batch run again, and a
driver killed mid-add leaves the index whole."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from fakes import TinyEmbedder, write_images  # noqa: E402
from simsearch.distributed.ray_ingest import RayEmbedding  # noqa: E402
from simsearch.engine import Engine  # noqa: E402
from simsearch.errors import ImageError  # noqa: E402

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(scope="module")
def cluster():
    # The actors import simsearch and the tests' fakes: a local cluster's workers inherit this environment.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(TESTS), saved) if p)
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield context.address_info["address"]
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def stored(engine: Engine) -> tuple[list[tuple], np.ndarray, np.ndarray]:
    """The catalog rows that must agree (added_at aside), and the bank's ids and vectors in id order."""
    rows = [(r["path"], r["sha256"], r["role"], r["width"], r["height"], r["n_vectors"]) for r in engine.images()]
    ids, vectors = engine.bank.all_vectors()
    order = np.argsort(ids)
    return rows, ids[order], vectors[order]


def test_ray_add_builds_the_bank_a_local_add_builds_even_when_a_worker_is_lost(tmp_path, cluster):
    from ray_driver import RecordingPids

    good = tmp_path / "good"
    paths = write_images(good, range(9))
    (good / "broken.png").write_bytes(b"not an image")  # inside a folder: skipped by both, for the same reason
    probes = write_images(tmp_path / "probe", [50]) + write_images(tmp_path / "probe", [51], defect=True)
    pids = tmp_path / "pids"
    pids.mkdir()
    killed = []

    def lose_a_worker(stage, done, total):  # once the first image is back, SIGKILL one of the two actors
        if stage == "embedding" and done == 1 and not killed:
            killed.append(int(sorted(pids.iterdir())[0].name))
            os.kill(killed[0], signal.SIGKILL)

    reports, contents, scores = [], [], []
    ray_embedding = RayEmbedding(RecordingPids(str(pids)), None, actors=2, batch_images=2)
    for name, embedding, progress in (("local", None, None), ("ray", ray_embedding, lose_a_worker)):
        with Engine.create(tmp_path / name, embedder=TinyEmbedder(), index_kind="flat") as engine:
            reports.append(engine.add([str(good)], holdout=0.25, embedding=embedding, progress=progress))
            contents.append(stored(engine))
            scores.append(np.array([engine.query(p).score for p in probes]))
            assert engine.check()["ok"]
    local, remote = reports
    assert remote.added == local.added and remote.held_out == local.held_out and local.held_out
    assert remote.skipped == local.skipped and [p for p, _ in local.skipped] == [str(good / "broken.png")]
    assert remote.vectors_added == local.vectors_added > 0
    (rows_l, ids_l, vec_l), (rows_r, ids_r, vec_r) = contents
    assert rows_r == rows_l and len(rows_l) == len(paths)
    assert np.array_equal(ids_r, ids_l)
    np.testing.assert_allclose(vec_r, vec_l, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-4)
    assert scores[0][1] > scores[0][0]  # the probes tell good from defective: the scores compared mean something
    # A worker was lost mid-add and the bank is still whole (above). Whether Ray Data starts a third actor for the
    # lost one's blocks or the survivor takes them depends on timing (under load the survivor had finished first).
    assert killed and killed[0] in {int(p.name) for p in pids.iterdir()}


def test_ray_add_of_an_unreadable_named_file_changes_nothing(tmp_path, cluster):
    paths = write_images(tmp_path / "good", range(3))
    bad = tmp_path / "named.png"
    bad.write_bytes(b"\x89PNG broken")
    with Engine.create(tmp_path / "index", embedder=TinyEmbedder(), index_kind="flat") as engine:
        engine.add(paths[:1])
        before = stored(engine)
        with pytest.raises(ImageError, match="named.png"):
            engine.add([*paths[1:], str(bad)], embedding=RayEmbedding(TinyEmbedder, None, actors=1))
        after = stored(engine)
        assert after[0] == before[0] and np.array_equal(after[1], before[1]) and engine.generation == 1


def test_sharded_bank_answers_as_one_bank(cluster):
    from simsearch.distributed.sharded import ShardedBank
    from simsearch.store.vectors import VectorIndex

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 16)).astype(np.float32)
    ids = rng.permutation(10_000)[:3000].astype(np.int64)  # global ids, not positions
    queries = rng.normal(size=(64, 16)).astype(np.float32)
    single = VectorIndex.from_vectors("flat", vectors, ids)
    sharded = ShardedBank.of_bank(single, 2)
    try:
        assert sharded.ntotal == 3000
        assert all(n > 0 for n in ray.get([s.ntotal.remote() for s in sharded.shards]))  # both shards hold some
        for k in (1, 5):
            d_one, i_one = single.search(queries, k)
            d_sharded, i_sharded = sharded.search(queries, k)
            np.testing.assert_allclose(d_sharded, d_one, rtol=1e-6)
            assert np.array_equal(i_sharded, i_one)
    finally:
        sharded.close()


def test_eval_categories_as_ray_tasks_give_the_local_results(tmp_path, cluster):
    from simsearch.distributed.ray_eval import evaluate_on_ray
    from simsearch.evaluation.datasets import load_category
    from simsearch.evaluation.runner import evaluate_category

    for name, seed in (("alpha", 0), ("beta", 100)):
        write_images(tmp_path / name / "train" / "good", range(seed, seed + 6))
        write_images(tmp_path / name / "test" / "good", range(seed + 50, seed + 53))
        write_images(tmp_path / name / "test" / "dark", range(seed + 60, seed + 63), defect=True)
    categories = [load_category(tmp_path, name) for name in ("alpha", "beta")]
    options = dict(method="histogram-iforest", folds=2, target_fpr=0.1)
    local = [evaluate_category(c, **options).to_dict() for c in categories]
    remote = [r.to_dict() for r in evaluate_on_ray(None, categories, **options)]
    keys = ("category", "n_train", "n_test_good", "n_test_defect", "image_auroc", "threshold", "f1_at_threshold")
    assert [{k: r[k] for k in keys} for r in remote] == [{k: r[k] for k in keys} for r in local]


def test_driver_killed_mid_add_leaves_the_index_as_it_was(tmp_path, cluster):
    first = write_images(tmp_path / "first", range(3))
    more = write_images(tmp_path / "more", range(10, 22))
    index = tmp_path / "index"
    with Engine.create(index, embedder=TinyEmbedder(), index_kind="flat") as engine:
        engine.add(first)
        before = stored(engine)
    files_before = sorted(p.name for p in index.iterdir())
    proc = subprocess.Popen([sys.executable, str(TESTS / "ray_driver.py"), cluster, str(index), str(tmp_path / "more")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # killed once the driver has received some of the images, not all
            if line.startswith("embedding 1 "):
                break
        else:
            pytest.fail("the driver ended before embedding: " + proc.stderr.read()[-2000:])
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    check = subprocess.run([sys.executable, "-m", "simsearch", "index", "check", "--index", str(index), "--json"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert check.returncode == 0, check.stdout + check.stderr
    with Engine.open(index) as engine:
        after = stored(engine)
        assert after[0] == before[0] and np.array_equal(after[1], before[1]) and engine.generation == 1
    # Nothing half-written: only the dead writer's spool folder is new, and the next writer deletes it.
    new = set(sorted(p.name for p in index.iterdir())) - set(files_before)
    assert all(name.startswith(".spool-") for name in new), new
    with Engine.open(index) as engine:
        engine.use_embedder(TinyEmbedder())
        report = engine.add(more)
        assert len(report.added) == len(more) and engine.check()["ok"]
    assert sorted(p.name for p in index.iterdir() if p.name.startswith(".spool-")) == []
