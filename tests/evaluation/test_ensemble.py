"""bench/ensemble.py: members are put on one scale by their banks' typical spread before they are combined."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import ensemble  # noqa: E402


def save_member(grids: Path, label: str, scale: float, rng, labels, masks) -> None:
    scores = (labels + rng.normal(0, 0.6, len(labels))) * scale
    maps = [(m + rng.normal(0, 0.5, m.shape)) * scale for m in masks]
    path = grids / "toy" / "cat" / f"{label}.0123abcd.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, labels=labels, scores=scores.astype(np.float32), typical=np.float32(scale),
                        **{f"map{i}": m.astype(np.float16) for i, m in enumerate(maps)},
                        **{f"mask{i}": m.astype(np.uint8) for i, m in enumerate(masks)})


@pytest.fixture
def grids(tmp_path, monkeypatch):
    monkeypatch.setattr(ensemble, "GRIDS", tmp_path)
    rng = np.random.default_rng(0)
    labels = np.array([0] * 12 + [1] * 12)
    masks = [np.zeros((16, 16)) for _ in labels]
    for mask, y in zip(masks, labels):
        if y:
            mask[4:9, 5:11] = 1
    for label, scale in (("small", 1.0), ("big", 50.0), ("big+more", 7.0)):
        save_member(tmp_path, label, scale, np.random.default_rng(1 if label == "small" else 2), labels, masks)
    return tmp_path


def test_a_member_on_another_scale_weighs_the_same(grids):
    """'big' is 'small''s noise pattern times 50 with a typical spread 50 times larger: had the raw values been
    averaged, 'big' alone would decide; scaled, the mean of two members is the mean of both on one scale."""
    both = ensemble.evaluate("toy", ["small", "big"], "mean")["per_category"]["cat"]
    members = [ensemble.load(ensemble.member_files("toy", name)["cat"]) for name in ("small", "big")]
    expected = (members[0]["scores"] / 1.0 + members[1]["scores"] / 50.0) / 2
    scores, maps = ensemble.combine(members, "mean")
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert maps[0].shape == (16, 16)
    big_alone = ensemble.evaluate("toy", ["big"], "mean")["per_category"]["cat"]
    assert both["image_auroc"] != pytest.approx(big_alone["image_auroc"])
    assert 0.5 < both["pixel_auroc"] <= 1.0


def test_a_label_matches_whole_names_only(grids):
    assert set(ensemble.member_files("toy", "big")) == {"cat"}
    assert ensemble.member_files("toy", "big")["cat"].name.startswith("big.")
    assert ensemble.member_files("toy", "bi") == {}


def test_members_of_other_test_images_are_refused(grids):
    path = ensemble.member_files("toy", "small")["cat"]
    data = dict(np.load(path))
    data["labels"] = data["labels"][::-1].copy()
    np.savez_compressed(path, **data)
    with pytest.raises(SystemExit, match="different test images"):
        ensemble.evaluate("toy", ["small", "big"], "mean")


def test_weights_make_a_weighted_mean_of_the_scaled_members(grids):
    members = [ensemble.load(ensemble.member_files("toy", name)["cat"]) for name in ("small", "big")]
    scores, maps = ensemble.combine(members, "mean", [3.0, 1.0])
    np.testing.assert_allclose(scores, 0.75 * members[0]["scores"] + 0.25 * members[1]["scores"] / 50.0, rtol=1e-6)
    np.testing.assert_allclose(maps[0], 0.75 * members[0]["maps"][0] + 0.25 * members[1]["maps"][0] / 50.0,
                               rtol=1e-5)
    only_first = ensemble.combine(members, "mean", [1.0, 0.0])[0]
    np.testing.assert_allclose(only_first, members[0]["scores"], rtol=1e-6)


def test_centering_removes_a_per_image_offset(grids):
    """Lift every defective image's map by a constant: plain pixel AUROC gains from it, centred maps do not."""
    for path in ensemble.member_files("toy", "small").values():
        data = dict(np.load(path))
        for i, y in enumerate(data["labels"]):
            data[f"map{i}"] = (data[f"map{i}"].astype(np.float32) + 5.0 * y).astype(np.float16)
        np.savez_compressed(path, **data)
    plain = ensemble.evaluate("toy", ["small"], "mean")["mean"]["pixel_auroc"]
    centred = ensemble.evaluate("toy", ["small"], "mean", center=True)["mean"]["pixel_auroc"]
    assert plain > centred + 0.05
