"""simsearch.config: the index configuration, its validation and its fingerprint."""
from __future__ import annotations

import dataclasses
import json

import pytest

from simsearch.config import PIPELINE_VERSION, IndexConfig


def test_json_round_trip_keeps_config_and_fingerprint():
    config = IndexConfig(tile_size=128, tile_stride=96, dims=64, layers=(1, 2, 3), weights_sha256="ab" * 32,
                         mean=(0.1, 0.2, 0.3), extra={"note": "x"})
    again = IndexConfig.from_json(config.to_json())
    assert again == config
    assert isinstance(again.layers, tuple) and isinstance(again.mean, tuple) and isinstance(again.std, tuple)
    assert again.fingerprint == config.fingerprint
    assert len(config.fingerprint) == 16 and int(config.fingerprint, 16) >= 0
    assert IndexConfig().fingerprint == IndexConfig().fingerprint


def test_to_json_is_plain_json():
    d = json.loads(IndexConfig().to_json())
    assert d["layers"] == [2, 3] and d["mean"] == [0.5, 0.5, 0.5]
    assert d["pipeline_version"] == PIPELINE_VERSION
    assert IndexConfig.from_dict(d) == IndexConfig()


@pytest.mark.parametrize("change", [
    {"tile_size": 128, "tile_stride": 96},
    {"tile_stride": 128},
    {"backbone": "tf_efficientnet_lite0"},
    {"weights_sha256": "0" * 64},
    {"short_side": None, "scale": 0.5},
    {"short_side": 128},
    {"layers": (1, 2)},
    {"neighbourhood": 5},
    {"dims": 100},
    {"mean": (0.4, 0.5, 0.5)},
    {"interpolation": "bilinear"},
    {"pipeline_version": PIPELINE_VERSION + 1},
    {"feature_dim": 152},
])
def test_fingerprint_changes_with_embedder_settings(change):
    assert IndexConfig().replace(**change).fingerprint != IndexConfig().fingerprint


@pytest.mark.parametrize("change", [
    {"k_neighbours": 5},
    {"blur_sigma": 0.0},
    {"index_kind": "ivf-flat"},
    {"index_kind": "flat"},
    {"nprobe": 64},
    {"weights": "hub"},
    {"weights": "my_weights.safetensors"},
    {"extra": {"anything": 1}},
])
def test_fingerprint_ignores_search_and_scoring_settings(change):
    assert IndexConfig().replace(**change).fingerprint == IndexConfig().fingerprint


def test_embedder_fields():
    fields = IndexConfig().embedder_fields()
    for key in ("index_kind", "nprobe", "k_neighbours", "blur_sigma", "extra", "weights"):
        assert key not in fields
    for key in ("backbone", "weights_sha256", "tile_size", "tile_stride", "scale", "layers", "patch_stride"):
        assert key in fields


@pytest.mark.parametrize("bad", [
    {"scale": 0},
    {"scale": -1.0},
    {"scale": 0.5},  # a fixed scale with the default short side: which one?
    {"tile_size": 100},
    {"tile_size": 0},
    {"tile_stride": 0},
    {"tile_stride": 512},  # larger than the tile
    {"tile_stride": 100},  # not a multiple of the patch stride
    {"neighbourhood": 0},
    {"neighbourhood": 2},
    {"dims": 0},
    {"index_kind": "annoy"},
    {"nprobe": 0},
    {"k_neighbours": 0},
    {"two_stage": "sometimes"},
    {"border_discount": -1.0},
])
def test_invalid_values_raise(bad):
    with pytest.raises(ValueError):
        IndexConfig(**bad)
    with pytest.raises(ValueError):
        IndexConfig().replace(**bad)


def test_unknown_field_in_from_dict_raises():
    d = IndexConfig().to_dict()
    d["colour_space"] = "lab"
    with pytest.raises(ValueError, match="colour_space"):
        IndexConfig.from_dict(d)


def test_from_dict_fills_missing_fields_with_defaults_or_their_legacy_values():
    # short_side and image_top_k came later: a stored configuration without them meant "native scale, max";
    # one without border_discount, an image score not divided at the borders.
    assert IndexConfig.from_dict({"tile_size": 128, "tile_stride": 64}) == IndexConfig(
        tile_size=128, tile_stride=64, short_side=None, image_top_k=1, sparse_discount=0.0, two_stage="off",
        border_discount=0.0)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        IndexConfig().tile_size = 128  # type: ignore[misc]


def test_a_field_added_later_keeps_old_fingerprints_and_meaning():
    config = IndexConfig(short_side=None, image_top_k=1)  # what the fields' legacy values mean
    stored = config.to_dict()
    stored.pop("short_side")  # as written before the field existed
    old = IndexConfig.from_dict(stored)
    assert old.short_side is None and old.fingerprint == config.fingerprint
    assert IndexConfig(short_side=128).fingerprint != config.fingerprint


def test_short_side_sets_each_images_scale():
    config = IndexConfig(short_side=128)
    assert config.scale_for(256, 512) == 0.5 and config.scale_for(512, 64) == 2.0
    assert IndexConfig().scale_for(96, 400) == 2.0  # the default short side, 192 px
    assert IndexConfig(short_side=None, scale=0.5).scale_for(256, 512) == 0.5
    with pytest.raises(ValueError, match="not both"):
        IndexConfig(short_side=128, scale=3.0)
    with pytest.raises(ValueError, match="short side"):
        IndexConfig(short_side=16)


def test_a_fine_tuned_head_changes_the_fingerprint_by_its_hash_not_its_file_name():
    frozen = IndexConfig()
    tuned = frozen.replace(head="weights/head-ab.safetensors", head_sha256="ab" * 32)
    assert tuned.fingerprint != frozen.fingerprint
    assert tuned.replace(head="weights/elsewhere.safetensors").fingerprint == tuned.fingerprint
    assert tuned.replace(head_sha256="cd" * 32).fingerprint != tuned.fingerprint
    # The frozen configuration's fields are unchanged, so fingerprints of existing indexes still match.
    assert "head" not in frozen.embedder_fields() and "head_sha256" not in frozen.embedder_fields()
    assert IndexConfig.from_json(tuned.to_json()) == tuned


def test_a_configuration_pickles_and_copies_with_its_fingerprint():
    import copy
    import pickle
    config = IndexConfig(short_side=128, k_neighbours=3, layers=(1, 2))
    fingerprint = config.fingerprint
    for again in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config)):
        assert again == config and again.fingerprint == fingerprint and again.layers == (1, 2)
    changed = config.replace(short_side=160)
    assert changed.fingerprint != fingerprint and config.fingerprint == fingerprint
    assert changed.fingerprint == IndexConfig(short_side=160, k_neighbours=3, layers=(1, 2)).fingerprint
