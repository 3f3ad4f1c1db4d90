"""Fine-tuning: the head, the losses, batch sampling, training and the head file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from realdata import needs_piped, piped_train
from simsearch.config import IndexConfig
from simsearch.errors import HeadError
from simsearch.finetune import (FinetuneSettings, cell_coverage, finetune_files, nuisance, sample_batch, softmax_loss,
                                triplet_loss)
from simsearch.headfile import check_base, is_head_file, read_head_info
from simsearch.heads import ProjectionHead, load_head

TINY = dict(steps=3, batch=2, crop=64, anchors_per_step=64)


def test_untrained_head_is_the_identity_and_checks_its_input():
    head = ProjectionHead(12, 20, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 5, 12)
    torch.testing.assert_close(head(x), x, rtol=0, atol=0)
    assert (head.in_dim, head.hidden, head.out_dim) == (12, 20, 12)
    with pytest.raises(ValueError, match="12 dims"):
        head(torch.randn(4, 11))


def test_head_tensors_round_trip_and_hash():
    head = ProjectionHead(8, 4, torch.Generator().manual_seed(1))
    with torch.no_grad():
        head.w2.normal_()
    again = ProjectionHead.from_tensors(head.tensors())
    x = torch.randn(5, 8)
    torch.testing.assert_close(again(x), head(x))
    assert again.sha256() == head.sha256()
    with pytest.raises(HeadError, match="shape"):
        ProjectionHead.from_tensors({**head.tensors(), "b1": torch.zeros(3)})


def test_triplet_loss_zero_when_separated_positive_when_a_negative_sits_on_an_anchor():
    anchors = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    far = torch.tensor([[50.0, 50.0]])
    assert float(triplet_loss(anchors, anchors.clone(), far, margin=0.5)) == 0.0
    on_anchor = torch.tensor([[0.0, 0.0]])
    assert float(triplet_loss(anchors, anchors.clone(), on_anchor, margin=0.5)) > 0.1


def test_triplet_loss_mines_the_hardest_negative_and_ignores_scale():
    g = torch.Generator().manual_seed(0)
    anchors, positives = torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)
    near, far = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g) + 100
    only_near = triplet_loss(anchors, positives, near, 1.0)
    torch.testing.assert_close(triplet_loss(anchors, positives, torch.cat([far, near]), 1.0), only_near)
    torch.testing.assert_close(triplet_loss(7 * anchors, 7 * positives, 7 * near, 1.0), only_near)
    with pytest.raises(ValueError):
        triplet_loss(anchors, positives[:3], near, 1.0)


def test_softmax_loss_is_low_when_the_classes_point_at_their_weights():
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    good, defect = torch.tensor([[3.0, 0.1]] * 4), torch.tensor([[0.1, 2.0]] * 2)
    right = float(softmax_loss(good, defect, weights, 16.0))
    wrong = float(softmax_loss(defect, good, weights, 16.0))
    assert right < 0.01 < 5 < wrong


def test_cell_coverage():
    mask = np.zeros((16, 24), bool)
    mask[0:8, 0:4] = True
    mask[8:16, 16:24] = True
    np.testing.assert_allclose(cell_coverage(mask, 8), [[0.5, 0, 0], [0, 0, 1.0]])
    with pytest.raises(ValueError):
        cell_coverage(mask[:15], 8)


def test_nuisance_keeps_shape_and_is_seeded():
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 32, 40, 3), dtype=np.uint8))
    a = nuisance(tiles, torch.Generator().manual_seed(5))
    b = nuisance(tiles, torch.Generator().manual_seed(5))
    assert a.shape == tiles.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, tiles)
    # Harmless changes: the tiles stay close to what they were.
    assert (a.float() - tiles.float()).abs().mean() < 40
    with pytest.raises(ValueError):
        nuisance(tiles.float(), torch.Generator())


def test_sample_batch_negatives_lie_inside_defects_and_shifts_stay_small():
    rng = np.random.default_rng(0)
    goods = [np.random.default_rng(i).integers(0, 256, (100, 120, 3), dtype=np.uint8) for i in range(3)]
    batch = sample_batch(goods, rng, batch=5, crop=64, cell=8, max_shift=0, border=2, negative_coverage=0.1)
    assert batch.anchors.shape == batch.positives.shape == batch.defects.shape == (5, 64, 64, 3)
    assert batch.negative_cells.shape == (5, 8, 8)
    np.testing.assert_array_equal(batch.anchors, batch.positives)  # no shift: the same crop
    assert batch.negative_cells.any(axis=(1, 2)).all()  # every defect crop gives negatives...
    assert not batch.negative_cells[:, :2].any() and not batch.negative_cells[:, :, -2:].any()  # ...off the border
    shifted = sample_batch(goods, np.random.default_rng(0), batch=5, crop=64, cell=8, max_shift=3, border=2,
                           negative_coverage=0.1)
    assert not np.array_equal(shifted.anchors, shifted.positives)


def test_real_defects_give_negatives_inside_their_mask():
    goods = [np.full((96, 96, 3), 128, np.uint8)]
    defect = np.full((96, 96, 3), 128, np.uint8)
    mask = np.zeros((96, 96), bool)
    mask[40:56, 40:56] = True
    defect[mask] = 0
    batch = sample_batch(goods, np.random.default_rng(1), batch=6, crop=64, cell=8, max_shift=0, border=0,
                         negative_coverage=0.5, real_defects=[(defect, mask)], real_share=1.0)
    assert batch.kinds == ["real"] * 6
    for crop, cells in zip(batch.defects, batch.negative_cells):
        dark = cell_coverage(np.all(crop == 0, axis=-1), 8) >= 0.5
        np.testing.assert_array_equal(cells, dark)


@pytest.mark.parametrize("bad", [dict(loss="hinge"), dict(crop=100), dict(max_shift=4), dict(steps=0),
                                 dict(kinds=("blob",))])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        FinetuneSettings(**bad)


# -- on real images with the real backbone ------------------------------------------------------------------
@pytest.fixture(scope="module")
def piped_scaled():
    from simsearch.images import load_image
    from simsearch.tiling import resize_to_scale

    config = IndexConfig()
    images = [load_image(p).rgb for p in piped_train()[:6]]
    return [resize_to_scale(rgb, config.scale_for(*rgb.shape[:2]), config.interpolation) for rgb in images]


@pytest.fixture(scope="module")
def frozen_features(lite1_backbone):
    from simsearch.features import Embedder

    config = IndexConfig(feature_dim=sum(lite1_backbone.channels), weights_sha256=lite1_backbone.weights_sha256)
    embedder = Embedder(config, lite1_backbone)
    return lambda tiles: torch.from_numpy(embedder.embed_tiles(tiles))


@needs_piped
def test_triplet_loss_falls_when_the_head_trains_on_a_batch(piped_scaled, frozen_features):
    batch = sample_batch(piped_scaled, np.random.default_rng(0), batch=4, crop=128, cell=8, max_shift=3,
                         border=2, negative_coverage=0.1)
    feats = frozen_features(np.concatenate([batch.anchors, batch.positives, batch.defects]))
    dim = feats.shape[-1]
    anchors, positives = feats[:4, 2:-2, 2:-2].reshape(-1, dim), feats[4:8, 2:-2, 2:-2].reshape(-1, dim)
    negatives = feats[8:][torch.from_numpy(batch.negative_cells)]
    head = ProjectionHead(dim, dim, torch.Generator().manual_seed(0))
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = triplet_loss(head(anchors), head(positives), head(negatives), margin=1.0)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[0] > 0
    assert losses[-1] < 0.5 * losses[0]


@needs_piped
def test_training_loss_falls_on_a_tiny_run(tmp_path):
    settings = FinetuneSettings(loss="softmax", steps=24, batch=4, anchors_per_step=128)
    _, trained = finetune_files([str(p) for p in piped_train()[:6]], tmp_path / "h.safetensors", settings=settings)
    assert len(trained.losses) == 24
    assert np.mean(trained.losses[-8:]) < 0.7 * np.mean(trained.losses[:8])
    assert sum(trained.kinds_seen.values()) == 24 * 4


@needs_piped
def test_same_seed_same_head_bytes_other_seed_other_head(tmp_path):
    goods = [str(p) for p in piped_train()[:4]]
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"]
    for path, seed in zip(paths, (3, 3, 4)):
        finetune_files(goods, path, settings=FinetuneSettings(seed=seed, **TINY))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert load_file(str(paths[0]))["w2"].abs().sum() > 0  # it trained: no longer the identity
    assert not torch.equal(load_file(str(paths[0]))["w1"], load_file(str(paths[2]))["w1"])


@needs_piped
def test_head_file_round_trips_with_its_metadata(tmp_path, lite1_backbone):
    path = tmp_path / "head.safetensors"
    info, trained = finetune_files([str(p) for p in piped_train()[:4]], path,
                                   settings=FinetuneSettings(loss="softmax", seed=11, **TINY))
    head, again = load_head(path)
    assert again == info == read_head_info(path)
    assert head.sha256() == info.sha256 == trained.head.sha256()
    x = torch.randn(7, head.in_dim)
    torch.testing.assert_close(head(x), trained.head(x))
    assert info.base["backbone"] == "tf_efficientnet_lite1" and info.base_weights == "embedded"
    assert info.base["weights_sha256"] == lite1_backbone.weights_sha256
    assert info.base["short_side"] == 192 and info.base["layers"] == [2, 3]
    assert (info.in_dim, info.hidden) == (152, 152)
    assert info.training["loss"] == "softmax" and info.training["seed"] == 11 and info.training["steps"] == 3
    assert info.training["images"] == 4 and info.base_fingerprint == IndexConfig(
        weights_sha256=lite1_backbone.weights_sha256, feature_dim=152).fingerprint
    assert is_head_file(path)
    assert not list(tmp_path.glob("*.partial"))


def test_backbone_weights_are_not_taken_for_a_head(tmp_path):
    plain = tmp_path / "w.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(plain))
    foreign = tmp_path / "x.safetensors"
    save_file({"w1": torch.zeros(2, 2)}, str(foreign), metadata={"simsearch_kind": "something-else"})
    junk = tmp_path / "j.safetensors"
    junk.write_bytes(b"not safetensors at all")
    pth = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.zeros(1)}, pth)
    for path in (plain, foreign, junk, pth, tmp_path / "missing.safetensors"):
        assert not is_head_file(path)
    with pytest.raises(HeadError, match="not a simsearch projection head"):
        read_head_info(plain)


@needs_piped
def test_edited_head_and_wrong_base_are_refused(tmp_path):
    path = tmp_path / "head.safetensors"
    info, _ = finetune_files([str(p) for p in piped_train()[:4]], path, settings=FinetuneSettings(**TINY))
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edited = tmp_path / "edited.safetensors"
    save_file({**tensors, "b2": tensors["b2"] + 1}, str(edited), metadata=metadata)
    with pytest.raises(HeadError, match="do not match the hash"):
        load_head(edited)
    base = IndexConfig(weights_sha256=info.base["weights_sha256"], feature_dim=152)
    check_base(info, base)  # its own base passes
    with pytest.raises(HeadError, match="backbone 'tf_efficientnet_lite1' \\(head\\) vs 'tf_efficientnet_lite0'"):
        check_base(info, base.replace(backbone="tf_efficientnet_lite0"))
    with pytest.raises(HeadError, match="weights hash"):
        check_base(info, base.replace(weights_sha256="0" * 64))
    with pytest.raises(HeadError, match="short_side"):
        check_base(info, base.replace(short_side=128))
    assert json.loads(metadata["base_config"]) == info.base


def test_bad_inputs_write_nothing(tmp_path):
    out = tmp_path / "h.safetensors"
    with pytest.raises(HeadError, match="no good images"):
        finetune_files([str(tmp_path)], out)
    with pytest.raises(HeadError, match=".safetensors"):
        finetune_files([str(tmp_path)], tmp_path / "h.pt")
    with pytest.raises(HeadError, match="no such folder"):
        finetune_files([str(tmp_path)], tmp_path / "nowhere" / "h.safetensors")
    assert list(tmp_path.iterdir()) == []
