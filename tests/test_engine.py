"""End-to-end behaviour of the Engine on a small slice of real data (PIPED PA_BDP01_TL)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from realdata import needs_piped, piped_mask, piped_test, piped_train
from simsearch import Engine, SimsearchError
from simsearch.engine import EmbedderMismatch
from simsearch.images import ImageError, load_image
from simsearch.errors import CatalogError

pytestmark = needs_piped


def build(directory: Path, images: list[Path], **kwargs) -> Engine:
    engine = Engine.create(directory, **kwargs)
    engine.add([str(p) for p in images], holdout=0.25)
    return engine


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Engine:
    engine = build(tmp_path_factory.mktemp("calibrated") / "index", piped_train())
    engine.calibrate(target_fpr=0.01)
    yield engine
    engine.close()


def snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.suffix in (".faiss",)}


def test_add_reports_counts_and_holds_out_a_deterministic_slice(tmp_path):
    train = piped_train()
    engine = build(tmp_path / "a", train)
    info = engine.info()
    # PA_BDP01_TL's train/good holds one byte-identical duplicate, reported as skipped.
    assert info["reference_images"] + info["calibration_images"] == len(train) - 1
    assert info["calibration_images"] == round(0.25 * (len(train) - 1))
    assert info["bank_vectors"] == info["vectors"] > 0
    held_a = {r["sha256"] for r in engine.catalog.images("calibration")}
    other = build(tmp_path / "b", list(reversed(train)))
    assert {r["sha256"] for r in other.catalog.images("calibration")} == held_a


def test_defect_is_flagged_and_map_is_higher_inside_its_mask(calibrated):
    insides, outsides, flagged = [], [], []
    for image in piped_test("impurity")[:6]:
        result = calibrated.query(str(image))
        mask = cv2.imread(str(piped_mask(image)), cv2.IMREAD_GRAYSCALE) > 127
        assert result.anomaly_map.shape == mask.shape
        insides.append(result.anomaly_map[mask].mean())
        outsides.append(result.anomaly_map[~mask].mean())
        flagged.append(result.is_anomalous)
    assert all(isinstance(f, bool) for f in flagged)
    assert sum(flagged) >= 5
    assert all(i > o for i, o in zip(insides, outsides))


def test_flagged_defect_has_regions_with_nearest_reference(calibrated):
    result = calibrated.query(str(piped_test("impurity")[0]))
    assert result.is_anomalous is True
    assert result.regions, "a flagged defect should show at least one region"
    top = result.regions[0]
    assert top.nearest is not None and Path(top.nearest.image).is_file()
    assert 0 <= top.x < 128 and 0 <= top.y < 128 and top.w > 0 and top.h > 0
    assert 0 < result.similarity < 0.5


def test_held_out_good_images_pass(calibrated):
    for row in calibrated.catalog.images("calibration"):
        result = calibrated.query(row["path"])
        assert result.is_anomalous is False
        assert result.similarity >= 0.5


def test_bank_image_scores_zero_and_search_finds_it(calibrated):
    ref = calibrated.catalog.images("reference")[3]["path"]
    assert calibrated.query(ref).score == pytest.approx(0.0, abs=1e-3)
    hits = calibrated.search(ref, k=3)
    assert hits[0]["image"] == ref
    assert hits[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 3 and hits[0]["distance"] <= hits[1]["distance"] <= hits[2]["distance"]


def test_array_input_is_rgb_and_matches_path(calibrated):
    path = str(piped_test("impurity")[1])
    rgb = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    from_path, from_array = calibrated.query(path), calibrated.query(rgb)
    assert from_array.score == pytest.approx(from_path.score, rel=1e-6)
    assert from_array.image == "<array>"
    # BGR given where RGB is expected is a different image, with a different score.
    assert calibrated.query(rgb[:, :, ::-1].copy()).score != pytest.approx(from_path.score, rel=1e-3)


def test_reopening_gives_identical_scores(calibrated):
    image = str(piped_test("impurity")[2])
    before = calibrated.query(image)
    with Engine.open(calibrated.directory) as reopened:
        after = reopened.query(image)
    assert after.score == before.score
    assert np.array_equal(after.anomaly_map, before.anomaly_map)
    assert after.threshold == before.threshold and after.calibration_id == before.calibration_id


def test_remove_takes_vectors_and_rows_and_a_remove_not_recalibrated_leaves_no_verdict(tmp_path):
    engine = build(tmp_path / "ix", piped_train())
    engine.calibrate()
    victim = engine.catalog.images("reference")[0]
    assert engine.query(victim["path"]).score == pytest.approx(0.0, abs=1e-3)
    before = engine.info()
    result = engine.remove([victim["sha256"][:10]], recalibrate=False)
    after = engine.info()
    assert result["vectors_removed"] == victim["n_vectors"]
    assert after["bank_vectors"] == after["vectors"] == before["vectors"] - victim["n_vectors"]
    assert after["generation"] == before["generation"] + 1
    query = engine.query(victim["path"])
    assert query.score > 1.0  # no longer its own neighbour
    assert query.is_anomalous is None and "calibrate" in query.warning
    # A fresh calibration on the stored held-out images restores verdicts.
    engine.calibrate()
    assert engine.query(victim["path"]).is_anomalous is not None
    with pytest.raises(SimsearchError, match="not in the index"):
        engine.remove(["/no/such/image.png"])


def test_duplicates_are_skipped_and_reported(tmp_path):
    engine = build(tmp_path / "ix", piped_train()[:8])
    generation = engine.info()["generation"]
    report = engine.add([str(p) for p in piped_train()[:4]])
    assert report.added == [] and len(report.skipped) == 4
    assert all("already in the index" in why for _, why in report.skipped)
    assert engine.info()["generation"] == generation


def test_another_backbone_is_refused(tmp_path):
    engine = build(tmp_path / "ix", piped_train()[:6])
    engine.close()
    with pytest.raises(EmbedderMismatch, match="tf_efficientnet_lite0"):
        Engine.open_or_create(tmp_path / "ix", backbone="tf_efficientnet_lite0")
    with pytest.raises(EmbedderMismatch, match="tile_size"):
        Engine.open_or_create(tmp_path / "ix", tile_size=128)
    with pytest.raises(SimsearchError, match="already holds an index"):
        Engine.create(tmp_path / "ix")


def test_a_fixed_scale_replaces_the_default_short_side_and_both_at_once_is_refused(tmp_path):
    assert Engine.create(tmp_path / "default").config.short_side == 192
    scaled = Engine.create(tmp_path / "scaled", scale=0.5)
    assert scaled.config.short_side is None and scaled.config.scale_for(400, 800) == 0.5
    with pytest.raises(ValueError, match="not both"):
        Engine.create(tmp_path / "both", scale=0.5, short_side=128)
    assert not (tmp_path / "both" / Engine.DB).exists()


@pytest.mark.parametrize("kind", ["text", "truncated_png", "truncated_bmp_as_png", "missing"])
def test_bad_input_is_a_clear_error_and_changes_nothing(tmp_path, kind):
    engine = build(tmp_path / "ix", piped_train()[:6])
    before_info, before_files = engine.info(), snapshot(engine.directory)
    bad = tmp_path / "bad.png"
    good_png = cv2.imencode(".png", cv2.imread(str(piped_train()[7])))[1].tobytes()
    if kind == "text":
        bad.write_text("not an image at all\n")
    elif kind == "truncated_png":
        bad.write_bytes(good_png[: len(good_png) // 2])
    elif kind == "truncated_bmp_as_png":
        bad.write_bytes(piped_train()[7].read_bytes()[:5000])
    with pytest.raises(ImageError, match="bad.png"):
        engine.add([str(piped_train()[8]), str(bad)])
    assert engine.info() == before_info
    assert snapshot(engine.directory) == before_files
    with pytest.raises(ImageError, match="bad.png"):
        engine.query(str(bad))


def test_unreadable_files_inside_a_folder_are_skipped(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in piped_train()[:3]:
        shutil.copy(p, folder)
    (folder / "notes.txt").write_text("hello")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    engine = Engine.create(tmp_path / "ix")
    report = engine.add([str(folder)])
    assert len(report.added) == 3
    reasons = dict(report.skipped)
    assert set(reasons) == {str(folder / "notes.txt"), str(folder / "broken.png")}


def test_calibrating_on_bank_images_is_refused(calibrated):
    ref = calibrated.catalog.images("reference")[0]["path"]
    with pytest.raises(SimsearchError, match="score zero against themselves"):
        calibrated.calibrate([ref])


def test_calibration_with_defects_reports_f1_threshold(tmp_path):
    engine = build(tmp_path / "ix", piped_train())
    cal = engine.calibrate([str(p) for p in piped_test("good")[:8]],
                           defects=[str(p) for p in piped_test("impurity")[:8]])
    assert cal.n_good == 8 and cal.n_defect == 8
    assert cal.f1 is not None and 0 < cal.f1 <= 1
    # Too few good images for a 1% target: the rule takes the largest and says what it promises.
    assert cal.expected_fpr == pytest.approx(1 / 9)
    assert "too few images" in cal.method
    # The given good images are remembered: a later plain `calibrate` re-scores them (and the held-out ones).
    again = engine.calibrate()
    assert again.n_good == 8 + engine.info()["calibration_images"] - 8


def test_weights_file_is_copied_and_fingerprint_is_the_embedded_one(tmp_path):
    from safetensors.torch import save_file

    from simsearch.backbones import embedded_weights_file, read_state_dict
    weights = tmp_path / "lite1.safetensors"
    state = read_state_dict(embedded_weights_file("tf_efficientnet_lite1"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    with Engine.create(tmp_path / "ix", backbone="tf_efficientnet_lite1", weights=str(weights)) as engine:
        stored = engine.directory / engine.config.weights
        assert stored.is_file() and stored.parent.name == "weights"
        embedded_fp = Engine.create(tmp_path / "ix2").config.fingerprint
        assert engine.config.fingerprint == embedded_fp
    # The index directory is self-contained: move it, delete the original weights, it still works.
    shutil.move(str(tmp_path / "ix"), str(tmp_path / "moved"))
    weights.unlink()
    with Engine.open(tmp_path / "moved") as moved:
        moved.add([str(p) for p in piped_train()[:2]])
        assert moved.query(str(piped_test("good")[0])).score > 0


@pytest.mark.parametrize("kind", ["ivf-flat", "hnsw"])
def test_approximate_index_kinds_give_close_scores(tmp_path, kind):
    exact = build(tmp_path / "flat", piped_train())
    approx = build(tmp_path / kind, piped_train(), index_kind=kind)
    assert approx.info()["bank_kind"] == kind
    for image in piped_test("impurity")[:3]:
        a, b = exact.query(str(image)), approx.query(str(image))
        # approximate search can only miss the true nearest neighbour: no patch distance gets smaller
        assert (b.anomaly_map >= a.anomaly_map - 1e-3).all()
        assert b.score == pytest.approx(a.score, rel=0.05)


def test_hnsw_bank_removes_an_image_by_rebuilding_and_keeps_its_kind_and_breadth(tmp_path):
    images = [str(p) for p in piped_train()[:4]]
    with Engine.create(tmp_path / "ix", index_kind="hnsw", nprobe=64) as engine:
        engine.add(images)
        info = engine.info()
        assert (info["bank_kind"], info["nprobe"]) == ("hnsw", 64)
        assert engine.query(images[0]).score == pytest.approx(0, abs=1e-3)  # a reference finds itself
        out = engine.remove([images[0]])
        assert out["vectors_removed"] > 0 and engine.info()["vectors"] == info["vectors"] - out["vectors_removed"]
        assert engine.query(images[0]).score > 0.1  # its own patches are gone from the graph
    with Engine.open(tmp_path / "ix") as reopened:
        assert (reopened.bank.kind, reopened.bank.nprobe) == ("hnsw", 64)
        assert reopened.bank.ntotal == info["vectors"] - out["vectors_removed"]
        assert reopened.query(images[1]).score == pytest.approx(0, abs=1e-3)


def test_coreset_keeps_the_requested_share_and_never_drops_existing_vectors(tmp_path):
    full = build(tmp_path / "full", piped_train())
    engine = Engine.create(tmp_path / "core")
    first = engine.add([str(p) for p in piped_train()[:12]], coreset=0.1)
    per_image = full.info()["vectors"] / full.info()["reference_images"]
    assert first.vectors_added == round(0.1 * 12 * per_image)
    before_ids = set(engine.bank.all_vectors()[0].tolist())
    second = engine.add([str(p) for p in piped_train()[12:24]], coreset=0.1)
    after_ids = set(engine.bank.all_vectors()[0].tolist())
    assert before_ids < after_ids and len(after_ids) == first.vectors_added + second.vectors_added
    # A tenth of the bank still separates a defect from a held-out-like good image.
    defect = engine.query(str(piped_test("impurity")[0])).score
    good = engine.query(str(piped_test("good")[0])).score
    assert defect > good


def test_any_timm_backbone_with_a_local_weights_file(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, str(weights))
    with Engine.create(tmp_path / "ix", backbone="resnet18", weights=str(weights)) as engine:
        assert engine.config.layers == (2, 3) and engine.config.feature_dim == 128 + 256
        assert engine.config.mean == pytest.approx((0.485, 0.456, 0.406))  # from the model's own config
        engine.add([str(p) for p in piped_train()[:3]])
        # A bank image is its own neighbour, up to the float rounding of a batched forward (random weights
        # give large activations): far below a new image's score.
        own, new = engine.query(str(piped_train()[0])).score, engine.query(str(piped_test("good")[0])).score
        assert own < 0.01 * new


def test_corrupted_faiss_file_is_a_clear_error_and_add_changes_nothing(tmp_path):
    engine = build(tmp_path / "ix", piped_train()[:6])
    generation = engine.catalog.state()["generation"]
    engine.close()
    bank = tmp_path / "ix" / f"patches.g{generation:06d}.faiss"
    bank.write_bytes(bank.read_bytes()[:1000])  # cut short, as a failing disk might leave it
    with Engine.open(tmp_path / "ix") as engine:
        counts = engine.catalog.counts()
        with pytest.raises(SimsearchError, match="index repair"):
            engine.query(str(piped_test("good")[0]))
        with pytest.raises(SimsearchError, match="index repair"):
            engine.add([str(piped_train()[8])])
        assert engine.catalog.counts() == counts
        assert not engine.check()["ok"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupted_sqlite_file_is_refused_with_the_reason(tmp_path, damage):
    engine = build(tmp_path / "ix", piped_train()[:4])
    engine.close()
    db = tmp_path / "ix" / Engine.DB
    data = db.read_bytes()
    db.write_bytes({"garbage": np.random.default_rng(0).bytes(len(data)), "truncated": data[:len(data) // 3],
                    "empty": b""}[damage])
    with pytest.raises((SimsearchError, CatalogError), match="meta.sqlite|no index|configuration"):
        Engine.open(tmp_path / "ix")


# -- streamed add (bounded memory) --------------------------------------------------------------------------

def test_streamed_add_stores_the_vectors_each_image_gives_alone_and_leaves_no_spool(tmp_path):
    from simsearch.images import load_image
    engine = Engine.create(tmp_path / "index", index_kind="flat")
    report = engine.add([str(p) for p in piped_train()[:5]])
    ids, vectors = engine.bank.all_vectors()
    order = np.argsort(ids)
    expected = np.concatenate([engine.embedder.embed(load_image(p)).features.reshape(-1, vectors.shape[1])
                               for p in report.added])
    assert len(expected) == report.vectors_added == len(ids)
    np.testing.assert_allclose(vectors[order], expected, rtol=1e-4, atol=1e-4)
    assert not list((tmp_path / "index").glob(".spool-*"))
    with pytest.raises(ImageError):
        engine.add([str(piped_train()[5]), str(tmp_path / "missing.png")])
    assert not list((tmp_path / "index").glob(".spool-*"))


def older_auto_policy(kind: str):
    """A kind policy where "auto" switches to `kind` from 1000 vectors (Ingest.kind_policy's seam)."""
    return lambda requested, n: (kind if n >= 1000 else "flat") if requested == "auto" else requested


def test_add_that_crosses_to_an_ivf_bank_builds_the_bank_from_all_vectors(tmp_path):
    import faiss

    from simsearch.store.vectors import VectorIndex
    engine = Engine.create(tmp_path / "index")
    engine.ingest.kind_policy = older_auto_policy("ivf-flat")
    engine.add([str(p) for p in piped_train()[:1]])  # 576 vectors (24 x 24 at the 192 px short side)
    assert engine.info()["bank_kind"] == "flat"
    engine.add([str(p) for p in piped_train()[1:8]])
    bank = engine.bank
    assert bank.kind == "ivf-flat" and bank.ntotal == engine.info()["vectors"] >= 1000
    ids, vectors = bank.all_vectors()
    order = np.argsort(ids)
    expected = VectorIndex.from_vectors("ivf-flat", vectors[order], ids[order])
    assert faiss.serialize_index(bank.index).tobytes() == faiss.serialize_index(expected.index).tobytes()
    assert engine.check()["ok"]


def test_nprobe_setting_reaches_the_loaded_bank_and_an_auto_ivf_bank_keeps_its_kind(tmp_path):
    from simsearch.store.vectors import default_nprobe
    # "auto" as an older policy had it: ivf-flat from 1000 vectors
    engine = Engine.create(tmp_path / "index", nprobe=3)
    engine.ingest.kind_policy = older_auto_policy("ivf-flat")
    engine.add([str(p) for p in piped_train()[:4]])
    assert engine.bank.kind == "ivf-flat" and engine.bank.nprobe == 3
    engine.close()
    with Engine.open(tmp_path / "index") as reopened:
        assert reopened.config.nprobe == 3 and reopened.bank.nprobe == 3
    # the policy changes (ivf-sq8 now): the stored ivf-flat bank grows in place instead of being rebuilt
    with Engine.open(tmp_path / "index") as reopened:
        reopened.ingest.kind_policy = older_auto_policy("ivf-sq8")
        before = reopened.bank.ntotal
        reopened.add([str(p) for p in piped_train()[4:6]])
        assert reopened.bank.kind == "ivf-flat" and reopened.bank.ntotal > before and reopened.bank.nprobe == 3
    # without a setting, a loaded bank searches the default number of lists, whatever its file says
    engine = Engine.create(tmp_path / "default")
    engine.ingest.kind_policy = older_auto_policy("ivf-sq8")
    engine.add([str(p) for p in piped_train()[:4]])
    nlist = engine.bank.nlist
    with engine.writer_lock(), engine.banks.transaction() as txn:  # a committed bank file that says nprobe 1
        txn.patches.nprobe = 1
        txn.publish()
    engine.close()
    with Engine.open(tmp_path / "default") as reopened:
        assert reopened.bank.nprobe == default_nprobe(nlist)


# -- fine-tuned heads (simsearch finetune) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def head_file(tmp_path_factory) -> Path:
    from simsearch.finetune import FinetuneSettings, finetune_files

    path = tmp_path_factory.mktemp("head") / "head.safetensors"
    finetune_files([str(p) for p in piped_train()[:6]], path,
                   settings=FinetuneSettings(steps=4, batch=2, crop=64, anchors_per_step=64))
    return path


def test_fine_tuned_index_has_its_own_fingerprint_and_vectors(tmp_path, head_file):
    images = piped_train()[:4]
    frozen = build(tmp_path / "frozen", images)
    tuned = build(tmp_path / "tuned", images, weights=str(head_file))  # told apart from backbone weights by its metadata
    assert tuned.config.head_sha256 and tuned.config.head.startswith("weights/head-")
    assert (tuned.directory / tuned.config.head).is_file()
    assert tuned.config.fingerprint != frozen.config.fingerprint
    assert tuned.config.weights == "embedded" and tuned.config.weights_sha256 == frozen.config.weights_sha256
    assert tuned.config.feature_dim == frozen.config.feature_dim
    probe = str(piped_test("impurity")[0])
    tuned_grid, frozen_grid = tuned.embedder.embed(load_image(probe)), frozen.embedder.embed(load_image(probe))
    assert tuned_grid.features.shape == frozen_grid.features.shape
    assert not np.allclose(tuned_grid.features, frozen_grid.features)
    assert tuned.query(probe).fingerprint == tuned.config.fingerprint


def test_frozen_and_fine_tuned_embedders_are_never_mixed(tmp_path, head_file):
    images = piped_train()[:3]
    frozen = build(tmp_path / "frozen", images)
    tuned = build(tmp_path / "tuned", images, head=str(head_file))
    with pytest.raises(EmbedderMismatch):
        frozen.use_embedder(tuned.embedder)
    with pytest.raises(EmbedderMismatch):
        tuned.use_embedder(frozen.embedder)
    with pytest.raises(EmbedderMismatch, match="frozen embedder"):
        Engine.open_or_create(tmp_path / "frozen", weights=str(head_file))
    with pytest.raises(EmbedderMismatch, match="without a head"):
        Engine.open_or_create(tmp_path / "tuned", weights="embedded")
    Engine.open_or_create(tmp_path / "tuned", weights=str(head_file)).close()  # its own head: fine


def test_fine_tuned_index_is_self_contained_and_checks_its_head(tmp_path, head_file):
    from simsearch.finetune import FinetuneSettings, finetune_files

    copy = tmp_path / "head.safetensors"
    shutil.copyfile(head_file, copy)
    probe = str(piped_test("good")[0])
    with Engine.create(tmp_path / "ix", weights=str(copy)) as engine:
        engine.add([str(p) for p in piped_train()[:3]])
        stored = engine.directory / engine.config.head
        expected = engine.query(probe).score
    copy.unlink()
    with Engine.open(tmp_path / "ix") as engine:  # its own copy of the head, found and checked
        assert expected > 0 and engine.query(probe).score == pytest.approx(expected, rel=1e-5)
        assert engine.query(str(piped_train()[0])).score == pytest.approx(0.0, abs=1e-3)
    other = tmp_path / "other.safetensors"
    finetune_files([str(p) for p in piped_train()[:3]], other,
                   settings=FinetuneSettings(steps=2, batch=2, crop=64, anchors_per_step=64, seed=5))
    shutil.copyfile(other, stored)  # a different head put in its place
    with Engine.open(tmp_path / "ix") as engine, pytest.raises(EmbedderMismatch, match="not the head"):
        engine.query(str(piped_test("good")[0]))


def test_head_for_another_base_is_refused(tmp_path, head_file):
    with pytest.raises(EmbedderMismatch, match="fine-tuned on tf_efficientnet_lite1"):
        Engine.create(tmp_path / "a", backbone="tf_efficientnet_lite0", head=str(head_file))
    with pytest.raises(ValueError, match="short_side 192 \\(head\\) vs 128"):
        Engine.create(tmp_path / "b", head=str(head_file), short_side=128)
    assert not Engine.exists(tmp_path / "a") and not Engine.exists(tmp_path / "b")
