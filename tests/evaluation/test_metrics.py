"""Accuracy metrics on tiny cases worked by hand, plus the exact AUPRO against a slow reference."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from simsearch.evaluation.metrics import aupro, best_f1, f1_at, image_auroc, pixel_auroc, pro_curve

approx = pytest.approx


# ---------------------------------------------------------------------------------------------- image_auroc
def test_image_auroc_perfect_and_reversed():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0


def test_image_auroc_mixed_and_ties():
    # (defective, good) pairs: 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == approx(0.75)
    # a tie counts half: 1 pair, tied -> 0.5; bool labels accepted
    assert image_auroc(np.array([False, True]), [0.5, 0.5]) == approx(0.5)


def test_image_auroc_one_class_is_none():
    assert image_auroc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert image_auroc([0, 0], [0.1, 0.2]) is None


@pytest.mark.parametrize("labels, scores", [
    ([[0, 1]], [[0.1, 0.2]]),            # 2-D
    ([0, 1, 1], [0.1, 0.2]),              # lengths differ
    ([0, 2], [0.1, 0.2]),                 # label not 0/1
    ([0, 1], [0.1, float("nan")]),        # NaN score
    ([], []),                             # empty
])
def test_image_level_bad_input_raises(labels, scores):
    for fn in (image_auroc, best_f1):
        with pytest.raises(ValueError):
            fn(labels, scores)
    with pytest.raises(ValueError):
        f1_at(labels, scores, 0.5)


# ---------------------------------------------------------------------------------------------- pixel_auroc
def test_pixel_auroc_by_hand():
    # image 0: defect 0.6 vs normals 0.7, 0.2, 0.1; image 1: defect 0.9, normal 0.3.
    # Pooled: 0.6 beats 0.2, 0.1, 0.3 (3 of 4); 0.9 beats all 4 -> (3 + 4) / (2 * 4) = 7/8
    masks = [np.array([[1, 0], [0, 0]], bool), np.array([[0, 1]], bool)]
    maps = [np.array([[0.6, 0.7], [0.2, 0.1]]), np.array([[0.3, 0.9]])]
    assert pixel_auroc(masks, maps) == approx(7 / 8)
    # single 2x2 image alone: 0.6 beats 2 of 3 normals -> 2/3
    assert pixel_auroc(masks[:1], maps[:1]) == approx(2 / 3)
    # the rank-counting path (used above max_pixels) gives the same
    assert pixel_auroc(masks, maps, max_pixels=0) == approx(7 / 8)


def test_pixel_auroc_large_path_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    masks = [rng.random((20, 30)) < 0.2 for _ in range(3)]
    maps = [np.round(rng.random(m.shape) + 0.3 * m, 1) for m in masks]  # rounded: many ties
    assert pixel_auroc(masks, maps, max_pixels=0) == approx(pixel_auroc(masks, maps), abs=1e-12)


def test_pixel_auroc_none_and_bad_input():
    assert pixel_auroc([np.zeros((2, 2), bool)], [np.ones((2, 2))]) is None  # no defect pixel
    assert pixel_auroc([np.ones((2, 2), bool)], [np.ones((2, 2))]) is None   # no normal pixel
    ok_mask, ok_map = np.zeros((2, 2), bool), np.zeros((2, 2))
    with pytest.raises(ValueError, match="image 1"):
        pixel_auroc([ok_mask, np.zeros((2, 3), bool)], [ok_map, np.zeros((3, 2))])
    with pytest.raises(ValueError, match="masks"):
        pixel_auroc([ok_mask], [ok_map, ok_map])
    with pytest.raises(ValueError, match="mask > 0"):
        pixel_auroc([np.array([[0, 255], [0, 0]], np.uint8)], [ok_map])  # 0/255 PNG mask
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc([ok_mask], [np.full((2, 2), np.nan)])
    with pytest.raises(ValueError):
        pixel_auroc([], [])


# ---------------------------------------------------------------------------------------------- aupro
def blob_masks(rng, shapes):
    """Random masks of a few rectangles (some touching, some diagonal), the last image empty."""
    masks = []
    for h, w in shapes:
        m = np.zeros((h, w), bool)
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h), rng.integers(0, w)
            m[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
        masks.append(m)
    masks.append(np.zeros((6, 9), bool))
    return masks


def test_aupro_perfect_map_is_one():
    masks = blob_masks(np.random.default_rng(1), [(12, 15), (9, 20)])
    maps = [m.astype(np.float32) for m in masks]
    for max_fpr in (0.01, 0.3, 1.0):
        assert aupro(masks, maps, max_fpr) == approx(1.0)


# 1x10 image: region A = pixels 1-2 (size 2), region B = pixels 5-7 (size 3), normals 0, 3, 4, 8, 9.
TWO_MASK = np.array([[0, 1, 1, 0, 0, 1, 1, 1, 0, 0]], bool)
TWO_MAP = np.array([[0.1, 0.9, 0.4, 0.7, 0.2, 0.8, 0.5, 0.3, 0.5, 0.0]])
#                      N    A    A    N    N    B    B    B    N    N
# flagged = map >= t;  PRO = (frac of A + frac of B) / 2;  FPR = flagged normals / 5
#   t=0.9: A 1/2          -> PRO 3/12,  FPR 0
#   t=0.8: B 1/3          -> PRO 5/12,  FPR 0
#   t=0.7: normal         -> PRO 5/12,  FPR 1/5
#   t=0.5: B 2/3 + normal -> PRO 7/12,  FPR 2/5   (a defect and a normal pixel tie: a sloped segment)
#   t=0.4: A 2/2          -> PRO 10/12, FPR 2/5
#   t=0.3: B 3/3          -> PRO 1,     FPR 2/5
#   t=0.2, 0.1, 0.0       -> PRO 1,     FPR 3/5, 4/5, 1
TWO_FPR = [0, 0, 0, 0.2, 0.4, 0.4, 0.4, 0.6, 0.8, 1.0]
TWO_PRO = [0, 3 / 12, 5 / 12, 5 / 12, 7 / 12, 10 / 12, 1, 1, 1, 1]


def test_pro_curve_two_regions_by_hand():
    fpr, pro, thr = pro_curve([TWO_MASK], [TWO_MAP])
    assert fpr == approx(TWO_FPR)
    assert pro == approx(TWO_PRO)
    assert thr == approx([0.9, 0.8, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    # truncated: the points with FPR <= 0.3 and the first one beyond
    fpr, pro, thr = pro_curve([TWO_MASK], [TWO_MAP], max_fpr=0.3)
    assert fpr == approx(TWO_FPR[:5]) and pro == approx(TWO_PRO[:5]) and thr.size == 4


def test_aupro_two_regions_interpolated_at_max_fpr():
    # 0 -> 0.2: flat at 5/12 -> 0.2 * 5/12 = 1/12 = 20/240.
    # 0.2 -> 0.4 rises 5/12 -> 7/12, so at 0.3 the PRO is 6/12: 0.1 * (5/12 + 6/12) / 2 = 11/240.
    # area 31/240, / 0.3 -> 31/72
    assert aupro([TWO_MASK], [TWO_MAP], max_fpr=0.3) == approx(31 / 72)


def test_aupro_max_fpr_one_by_hand():
    # 0 -> 0.2: 1/12; 0.2 -> 0.4: 0.2 * (5/12 + 7/12) / 2 = 1/10; 0.4 -> 1: 0.6 * 1 -> 1/12 + 1/10 + 6/10
    assert aupro([TWO_MASK], [TWO_MAP], max_fpr=1.0) == approx(1 / 12 + 1 / 10 + 6 / 10)  # 47/60


def test_aupro_weights_regions_not_pixels():
    # small region: pixel 0 (size 1) at 0.9; big region: pixels 2-9 (size 8) at 0.2; normals 1, 10, 11 at 0.5
    mask = np.array([[1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]], bool)
    amap = np.array([[0.9, 0.5, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.5, 0.5]])
    fpr, pro, thr = pro_curve([mask], [amap])
    # t=0.9: the small region fully found, the big one missed -> PRO (1 + 0) / 2 = 0.5 at FPR 0,
    # although only 1 of 9 defect pixels (recall 0.11) is flagged. t=0.5: all normals -> FPR 1.
    assert thr[0] == approx(0.9) and fpr[1] == 0 and pro[1] == approx(0.5)
    assert fpr[2] == 1.0 and pro[2] == approx(0.5)
    # the curve is flat at 0.5 up to FPR 1, so the normalised area is 0.5 for any max_fpr < 1
    assert aupro([mask], [amap], max_fpr=0.3) == approx(0.5)


def test_aupro_regions_are_8_connected():
    # (0,0) and (1,1) touch diagonally: one region of 2 (two regions with 4-connectivity); (3,3) is apart.
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = True
    amap = np.zeros((4, 4))
    amap[3, 3] = 1.0
    fpr, pro, _ = pro_curve([mask], [amap])
    assert fpr[1] == 0 and pro[1] == approx(1 / 2)  # would be 1/3 with 4-connectivity


def test_aupro_none_without_region_or_normal_pixel():
    assert aupro([np.zeros((3, 3), bool)] * 2, [np.random.default_rng(0).random((3, 3))] * 2) is None
    assert aupro([np.ones((3, 3), bool)], [np.ones((3, 3))]) is None
    assert pro_curve([np.zeros((3, 3), bool)], [np.ones((3, 3))]) is None


def test_aupro_bad_input():
    m, a = np.zeros((2, 2), bool), np.zeros((2, 2))
    with pytest.raises(ValueError, match="image 0"):
        aupro([m], [np.zeros((2, 3))])
    with pytest.raises(ValueError, match="max_fpr"):
        aupro([m], [a], max_fpr=0)
    with pytest.raises(ValueError, match="max_fpr"):
        aupro([m], [a], max_fpr=1.5)
    with pytest.raises(ValueError, match="single array"):
        aupro(m, a)


def slow_aupro(masks, maps, max_fpr):
    """Reference: loop over every distinct threshold, regions from scipy.ndimage.label (3x3 ones)."""
    maps = [np.asarray(a, np.float32) for a in maps]
    labelled = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    n_regions = sum(int(lab.max()) for lab in labelled)
    n_neg = sum(int((~m).sum()) for m in masks)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]:
        fp, overlap = 0, 0.0
        for m, a, lab in zip(masks, maps, labelled):
            flag = a >= t
            fp += int((flag & ~m).sum())
            for r in range(1, lab.max() + 1):
                region = lab == r
                overlap += (flag & region).sum() / region.sum()
        fprs.append(fp / n_neg)
        pros.append(overlap / n_regions)
    fprs, pros = np.array(fprs), np.array(pros)
    x, y = fprs[fprs <= max_fpr], pros[fprs <= max_fpr]
    if max_fpr not in fprs:
        x, y = np.append(x, max_fpr), np.append(y, np.interp(max_fpr, fprs, pros))
    return np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / max_fpr


@pytest.mark.parametrize("seed", range(4))
def test_aupro_equals_slow_reference(seed):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, [(12, 15), (9, 20), (16, 16), (7, 5)])
    maps = [rng.random(m.shape).astype(np.float32) + 0.5 * m for m in masks]
    if seed % 2:  # quantised: ties within and across defect / normal pixels
        maps = [np.round(a * 8) / 8 for a in maps]
    for max_fpr in (0.02, 0.3, 1.0):
        assert aupro(masks, maps, max_fpr) == approx(slow_aupro(masks, maps, max_fpr), abs=1e-9)


# ---------------------------------------------------------------------------------------------- f1
LABELS = [0, 0, 1, 1, 1]
SCORES = [0.1, 0.5, 0.5, 0.7, 0.2]


def test_f1_at_by_hand():
    # t=0.4: flagged 0.5(good) 0.5(bad) 0.7(bad) -> tp 2, fp 1, fn 1 (0.2), tn 1
    r = f1_at(LABELS, SCORES, 0.4)
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (2, 1, 1, 1)
    assert r["precision"] == approx(2 / 3) and r["recall"] == approx(2 / 3)
    assert r["f1"] == approx(2 / 3) and r["fpr_good"] == approx(1 / 2)
    # t=0.5: strict >, the two tied 0.5 items are not flagged -> tp 1, fp 0, fn 2, tn 2
    r = f1_at(LABELS, SCORES, 0.5)
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (1, 0, 2, 2)
    assert r["precision"] == 1.0 and r["recall"] == approx(1 / 3)
    assert r["f1"] == approx(2 * 1 / (2 * 1 + 0 + 2)) and r["fpr_good"] == 0.0


def test_f1_at_edge_cases():
    r = f1_at(LABELS, SCORES, 1.0)  # nothing flagged
    assert r["precision"] == 0.0 and r["recall"] == 0.0 and r["f1"] == 0.0
    r = f1_at([1, 1], [0.2, 0.8], 0.5)  # no good item
    assert r["fpr_good"] is None and r["f1"] == approx(2 / 3)
    r = f1_at([0, 0], [0.2, 0.8], 0.5)  # no defective item
    assert r["f1"] is None and r["recall"] is None and r["fpr_good"] == 0.5 and r["precision"] == 0.0


def test_best_f1_by_hand():
    # flag >= cut: 0.7 -> tp1 fp0 fn2: 2/4; 0.5 -> tp2 fp1 fn1: 4/6; 0.2 -> tp3 fp1 fn0: 6/7; 0.1 -> 6/8.
    # Best 6/7 flags {0.2, 0.5, 0.5, 0.7}: with the strict rule, t = 0.1 (the next score below).
    f1, t = best_f1(LABELS, SCORES)
    assert f1 == approx(6 / 7) and t == approx(0.1)
    assert f1_at(LABELS, SCORES, t)["f1"] == approx(f1)


def test_best_f1_when_everything_is_flagged():
    # cuts 0.4: 2/4; 0.3 (a good and a bad tie): tp2 fp1 fn1 4/6; 0.2: tp3 fp1 6/7 -> flag all, t < 0.2
    labels, scores = [1, 1, 1, 0], np.array([0.2, 0.3, 0.4, 0.3], np.float32)
    f1, t = best_f1(labels, scores)
    assert f1 == approx(6 / 7) and t < 0.2
    assert f1_at(labels, scores, t)["tp"] == 3 and (scores > t).all()


def test_best_f1_tie_takes_highest_cut():
    # cut 0.9: tp1 fn1 -> 2/3; 0.6: 2/4; 0.5: 2/5; 0.1: tp2 fp2 -> 4/6 = 2/3. Tie: the highest cut, t = 0.6
    f1, t = best_f1([1, 0, 0, 1], [0.9, 0.6, 0.5, 0.1])
    assert f1 == approx(2 / 3) and t == approx(0.6)


def test_best_f1_needs_a_defective_item():
    with pytest.raises(ValueError, match="defective"):
        best_f1([0, 0], [0.1, 0.2])


@pytest.mark.parametrize("seed", range(5))
def test_best_f1_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 30)
    labels[0] = 1
    scores = (np.round(rng.random(30) + 0.3 * labels, 1)).astype(np.float32)  # float32 with ties
    f1, t = best_f1(labels, scores)
    candidates = np.append(np.unique(scores), scores.min() - 1)  # every distinct "score > t" split
    brute = max(f1_at(labels, scores, c)["f1"] for c in candidates)
    assert f1 == approx(brute)
    assert f1_at(labels, scores, t)["f1"] == approx(f1)
    assert f1_at(labels, scores, np.float32(t))["f1"] == approx(f1)
