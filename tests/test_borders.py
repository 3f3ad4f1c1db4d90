"""Border levels (simsearch/borders.py): the rings, the learned profile, the divisors, and the engine taking its
image scores with the calibration's profile while its maps stay plain."""
from __future__ import annotations

import numpy as np
import pytest

from realdata import needs_piped, piped_test, piped_train
from simsearch import Engine
from simsearch.borders import RINGS, border_divisors, border_profile, border_rings
from simsearch.scoring import candidates_score, refine_candidates


def test_rings_count_cells_to_the_nearest_edge():
    rings = border_rings((5, 6), rings=8)
    assert rings.shape == (5, 6)
    np.testing.assert_array_equal(rings[0], 0)
    np.testing.assert_array_equal(rings[:, -1], 0)
    assert rings[1, 1] == 1 and rings[2, 2] == 2 and rings[2, 3] == 2
    assert border_rings((20, 20), rings=3).max() == 3  # deeper cells are the interior
    with pytest.raises(ValueError):
        border_rings((0, 4))


def graded_grid(size: int, edge: float, rng) -> np.ndarray:
    """(size, size) scores around 10 whose outermost ring runs `edge` times higher."""
    grid = rng.uniform(9.0, 11.0, (size, size)).astype(np.float32)
    grid[border_rings(grid.shape) == 0] *= edge
    return grid


def test_the_profile_is_each_rings_upper_level_over_the_interiors():
    rng = np.random.default_rng(0)
    profile = border_profile([graded_grid(24, 1.3, rng) for _ in range(20)])
    assert len(profile) == RINGS
    assert profile[0] == pytest.approx(1.3, rel=0.02)
    assert all(f == pytest.approx(1.0, abs=0.02) for f in profile[1:])


def test_edges_that_score_lower_are_left_as_they_are():
    # An object on a plain background: the edges score below the interior; dividing would raise them.
    rng = np.random.default_rng(1)
    profile = border_profile([graded_grid(24, 0.5, rng) for _ in range(5)])
    assert profile[0] == 1.0 and all(f == pytest.approx(1.0, abs=0.01) for f in profile)


def test_grids_without_an_interior_give_no_profile():
    assert border_profile([np.full((6, 6), 3.0, np.float32)]) == [1.0] * RINGS
    with pytest.raises(ValueError):
        border_profile([np.zeros(5)])
    with pytest.raises(ValueError):
        border_profile([np.zeros((4, 4))], quantile=1.0)


def test_divisors_follow_the_rings_row_major_to_the_power():
    profile = [1.5, 1.2] + [1.0] * (RINGS - 2)
    d = border_divisors((5, 5), profile, power=2.0)
    assert d.shape == (25,)
    grid = d.reshape(5, 5)
    assert grid[0, 2] == pytest.approx(2.25) and grid[1, 2] == pytest.approx(1.44) and grid[2, 2] == 1.0
    assert border_divisors((5, 5), None, 1.0) is None
    assert border_divisors((5, 5), profile, 0.0) is None
    with pytest.raises(ValueError):
        border_divisors((5, 5), profile, -1.0)


def test_an_edge_patch_counts_for_less_in_the_image_score():
    scores = np.ones((6, 6), np.float32)
    scores[0, 3] = 12.0  # on the edge
    scores[3, 3] = 10.0  # inside
    positions = np.arange(36)
    divisors = border_divisors((6, 6), [1.5] + [1.0] * (RINGS - 1), 1.0)
    assert candidates_score(positions, scores.ravel(), 1) == pytest.approx(12.0)
    assert candidates_score(positions, scores.ravel(), 1, divisors) == pytest.approx(10.0)


def test_two_stage_refinement_compares_divided_upper_bounds():
    upper = np.array([9.0, 12.0, 5.0], np.float32)
    refined = np.array([False, False, True])
    divisors = np.array([1.0, 1.5, 1.0], np.float32)
    # Level 10: patch 1's bound (12) passes plain, but divided (8) it cannot enter the image score's top k.
    np.testing.assert_array_equal(refine_candidates(upper, refined, 10.0, None), [False, True, False])
    np.testing.assert_array_equal(refine_candidates(upper, refined, 10.0, None, divisors), [False, False, False])
    # ...unless the map needs it near the pixel threshold (the map is plain).
    np.testing.assert_array_equal(refine_candidates(upper, refined, 10.0, 11.0, divisors), [False, True, False])


@needs_piped
def test_calibration_learns_the_profile_and_queries_score_as_it_measured(tmp_path):
    engine = Engine.create(tmp_path / "index")
    engine.add([str(p) for p in piped_train()], holdout=0.25)
    engine.calibrate(target_fpr=0.01)
    latest = engine.latest_calibration()
    profile = latest["details"]["border_profile"]
    assert len(profile) == RINGS and min(profile) >= 1.0
    assert profile[0] > 1.05  # PIPED's good crops score higher at their edges
    # A calibration image queried now scores what the calibration measured for it (the same profile, the same
    # candidates), so the threshold means what it says.
    held = [r["path"] for r in engine.catalog.images("calibration")]
    queried = sorted(engine.query(p).score for p in held)
    np.testing.assert_allclose(queried, sorted(latest["details"]["good_scores"]), rtol=1e-5)

    # The same index without the border division: no profile, higher or equal scores, the same maps.
    plain = Engine.create(tmp_path / "plain", border_discount=0.0)
    plain.add([str(p) for p in piped_train()], holdout=0.25)
    plain.calibrate(target_fpr=0.01)
    assert plain.latest_calibration()["details"]["border_profile"] is None
    for path in piped_test("impurity")[:2] + piped_test("good")[:2]:
        a, b = engine.query(str(path)), plain.query(str(path))
        assert a.score <= b.score + 1e-4
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    engine.close()
    plain.close()


@needs_piped
def test_a_two_stage_calibration_measures_again_with_its_profile(tmp_path):
    # Its first pass refined patches by the undivided rule; measured again with the profile, the calibration images
    # query back to the calibration's scores on a two-stage bank too.
    engine = Engine.create(tmp_path / "index", two_stage="on")
    engine.add([str(p) for p in piped_train()], holdout=0.25)
    engine.calibrate(target_fpr=0.01)
    latest = engine.latest_calibration()
    assert latest["details"]["border_profile"][0] > 1.0
    held = [r["path"] for r in engine.catalog.images("calibration")]
    np.testing.assert_allclose(sorted(engine.query(p).score for p in held), sorted(latest["details"]["good_scores"]),
                               rtol=1e-5)
    engine.close()

