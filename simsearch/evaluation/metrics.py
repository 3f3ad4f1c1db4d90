"""Every accuracy figure, computed in one place with plain numpy / scikit-learn.

Image level (one score per image, label 1 = defective):
    image_auroc(labels (N,), scores (N,))            -> ROC AUC, None with a single class
    f1_at(labels, scores, threshold)                 -> counts, precision, recall, F1 for score > threshold
    best_f1(labels, scores)                          -> (best F1, threshold t for the rule score > t)

Pixel level (one mask and one map per image, the pair of the same (H_i, W_i); images may differ in size):
    pixel_auroc(masks, maps)                         -> ROC AUC over all pixels pooled
    pro_curve(masks, maps, max_fpr)                  -> (fpr, pro, thresholds) of the PRO curve
    aupro(masks, maps, max_fpr=0.3)                  -> normalised area under the PRO curve up to max_fpr

Masks are bool (numeric masks holding only 0 and 1 are accepted too); maps are float and are compared at
float32 precision (they are pooled as float32 to halve the memory of a full-resolution test set).

Thresholds: F1 figures flag an item when score > threshold. The PRO curve has one point per distinct map
value t, at which a pixel counts as flagged when map >= t (i.e. map > t' for any t' between t and the next
lower distinct value); both the PRO and the FPR of a point use that same rule.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = ["image_auroc", "pixel_auroc", "pro_curve", "aupro", "f1_at", "best_f1"]

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy >= 2.0 renamed trapz


# ---------------------------------------------------------------------------------------------- validation
def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """-> (labels (N,) bool, scores (N,) float64), or ValueError."""
    y = np.asarray(labels)
    s = np.asarray(scores)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {y.shape}")
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (N,), got shape {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    if y.dtype != bool:
        if not (np.issubdtype(y.dtype, np.number) and np.isin(y, (0, 1)).all()):
            raise ValueError(f"labels must be 0/1 (1 = defective), got values {np.unique(y)[:5]}")
        y = y.astype(bool)
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    return y, s


def _mask(m, i: int) -> np.ndarray:
    m = np.asarray(m)
    if m.ndim != 2:
        raise ValueError(f"masks[{i}] must be 2-D (H, W), got shape {m.shape}")
    if m.dtype == bool:
        return m
    if not (np.issubdtype(m.dtype, np.number) and np.isin(m, (0, 1)).all()):
        raise ValueError(f"masks[{i}] must be bool or hold only 0 and 1 (convert e.g. with mask > 0), "
                         f"got dtype {m.dtype} with values {np.unique(m)[:5]}")
    return m.astype(bool)


def _map(a, i: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"maps[{i}] must be 2-D (H, W), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"maps[{i}] must hold real numbers, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"maps[{i}] contains NaN or infinity (or values beyond float32 range)")
    return a


def _pairs(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]):
    """Yield (index, mask (H, W) bool, map (H, W) float32) after checking each pair."""
    for name, seq in (("masks", masks), ("maps", maps)):
        if isinstance(seq, np.ndarray) and seq.ndim == 2:
            raise ValueError(f"{name} must be a list of (H, W) arrays (or an (N, H, W) array), "
                             f"got a single array of shape {seq.shape}")
    masks, maps = list(masks), list(maps)
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} maps")
    if not masks:
        raise ValueError("no images: masks and maps are empty")
    for i, (m, a) in enumerate(zip(masks, maps)):
        m, a = _mask(m, i), _map(a, i)
        if m.shape != a.shape:
            raise ValueError(f"image {i}: mask shape {m.shape} differs from map shape {a.shape}")
        yield i, m, a


# ---------------------------------------------------------------------------------------------- image level
def image_auroc(labels, scores) -> float | None:
    """ROC AUC of image scores.

    labels: (N,) 0/1 or bool, 1 = defective; scores: (N,) float, higher = more anomalous.
    Returns None when only one class is present (the AUC is undefined).
    """
    y, s = _labels_scores(labels, scores)
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, s))


def f1_at(labels, scores, threshold: float) -> dict:
    """Counts and rates when every item with score > threshold is flagged as defective.

    labels: (N,) 0/1 or bool, 1 = defective; scores: (N,) float.
    Returns {"f1", "precision", "recall", "fpr_good", "tp", "fp", "fn", "tn"} with the counts as int.
    precision is 0.0 when nothing is flagged; recall and f1 are None when there is no defective item;
    fpr_good (= fp / number of label-0 items) is None when there is no label-0 item.
    """
    y, s = _labels_scores(labels, scores)
    t = float(threshold)
    if np.isnan(t):
        raise ValueError("threshold is NaN")
    flag = s > t
    tp = int(np.count_nonzero(flag & y))
    fp = int(np.count_nonzero(flag & ~y))
    fn = int(np.count_nonzero(~flag & y))
    tn = int(np.count_nonzero(~flag & ~y))
    n_pos, n_neg = tp + fn, fp + tn
    return {
        "f1": 2 * tp / (2 * tp + fp + fn) if n_pos else None,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / n_pos if n_pos else None,
        "fpr_good": fp / n_neg if n_neg else None,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def best_f1(labels, scores) -> tuple[float, float]:
    """(best F1 over all thresholds, threshold t such that flagging score > t realises it).

    labels: (N,) 0/1 or bool, 1 = defective (at least one needed); scores: (N,) float.
    t is the largest score strictly below the cut, so it is itself one of the scores and `scores > t`
    selects exactly the items at or above the cut whatever the dtype; any value in [t, cut) gives the same
    F1. When the best cut flags everything, t is a value below the smallest score. Among cuts with equal
    F1 the highest (fewest flags) is returned.
    """
    y, s = _labels_scores(labels, scores)
    if not y.any():
        raise ValueError("best_f1 needs at least one defective item (label 1): F1 is undefined otherwise")
    precision, recall, thresholds = precision_recall_curve(y, s)  # flag = score >= thresholds[i]
    p, r = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    i = int(np.flatnonzero(f1 == f1.max())[-1])  # thresholds ascend: the last is the highest cut
    cut = thresholds[i]
    below = s[s < cut]
    t = float(below.max()) if below.size else float(cut - max(1.0, abs(cut)))
    return float(f1[i]), t


# ---------------------------------------------------------------------------------------------- pixel level
def pixel_auroc(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                max_pixels: int = 20_000_000) -> float | None:
    """ROC AUC over all pixels of all images pooled.

    masks: list of (H_i, W_i) bool (True = defect); maps: list of (H_i, W_i) float, same shape per pair.
    Returns None when there is no defect pixel or no normal pixel.

    Up to `max_pixels` pixels in all, scikit-learn computes it on the pooled float32 scores and bool
    labels. Above that it is computed exactly by rank counting (Mann-Whitney U, ties counted half) with
    one sorted float32 copy of the normal pixels, which needs far less memory than scikit-learn's copies.
    """
    ms, scs = [], []
    for _, m, a in _pairs(masks, maps):
        ms.append(m.ravel())
        scs.append(a.ravel())
    y = np.concatenate(ms)
    s = np.concatenate(scs)
    del ms, scs
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    if y.size <= max_pixels:
        return float(roc_auc_score(y, s))
    neg = np.sort(s[~y])
    pos = s[y]
    del s, y
    twice_u = 0  # 2 * (number of (defect, normal) pairs ordered right + half the tied ones)
    for start in range(0, pos.size, 1 << 20):
        chunk = pos[start:start + (1 << 20)]
        twice_u += int(np.searchsorted(neg, chunk, side="left").sum())
        twice_u += int(np.searchsorted(neg, chunk, side="right").sum())
    return twice_u / (2.0 * n_pos * n_neg)


def pro_curve(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray],
              max_fpr: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The per-region-overlap (PRO) curve of Bergmann et al. (IJCV 2021), computed exactly.

    masks: list of (H_i, W_i) bool (True = defect); maps: list of (H_i, W_i) float, same shape per pair.
    Ground-truth regions are the 8-connected components of each mask. At a threshold t (each distinct map
    value), a pixel is flagged when map >= t;
        PRO(t) = mean over all regions of all images of (flagged pixels of the region / its size),
        FPR(t) = flagged normal pixels / all normal pixels (mask False, over all images, defect-free too).
    Returns (fpr (K+1,), pro (K+1,), thresholds (K,)) as float64 / float32 arrays: point 0 is (0, 0)
    (nothing flagged), point k >= 1 belongs to thresholds[k-1], thresholds descend and fpr does not
    decrease. Only the points with FPR <= max_fpr and the first point beyond it are returned (all when
    max_fpr = 1). None when there is no ground-truth region or no normal pixel.

    Vectorised: each pixel carries a weight 1 / (n_regions * size of its region) (0 for normal pixels),
    so after one descending sort the PRO is the cumulative weight and the FPR the cumulative normal count,
    read at the last pixel of each run of equal scores.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    neg_parts, def_parts, inv_size_parts = [], [], []
    n_regions = 0
    for _, m, a in _pairs(masks, maps):
        neg_parts.append(a[~m])
        if m.any():
            n, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
            sizes = np.bincount(lab.ravel(), minlength=n)[1:].astype(np.float64)
            def_parts.append(a[m])
            inv_size_parts.append(1.0 / sizes[lab[m] - 1])
            n_regions += n - 1
    neg = np.concatenate(neg_parts)
    del neg_parts
    n_neg = neg.size
    if n_regions == 0 or n_neg == 0:
        return None
    dft = np.concatenate(def_parts)
    w = np.concatenate(inv_size_parts) / n_regions
    del def_parts, inv_size_parts

    # Only thresholds t >= cut can give FPR <= max_fpr or be the first point beyond it: cut is the
    # k-th largest normal score with k normal pixels surely more than max_fpr * n_neg (one spare).
    k = int(np.floor(max_fpr * n_neg)) + 2
    if k <= n_neg:
        cut = np.partition(neg, n_neg - k)[n_neg - k]
        neg = neg[neg >= cut]
        keep = dft >= cut
        dft, w = dft[keep], w[keep]

    s = np.concatenate([neg, dft])
    wt = np.concatenate([np.zeros(neg.size), w])
    is_neg = np.concatenate([np.ones(neg.size, dtype=bool), np.zeros(dft.size, dtype=bool)])
    del neg, dft, w
    order = np.argsort(-s, kind="stable")
    s = s[order]
    fp = np.cumsum(is_neg[order])
    pro = np.cumsum(wt[order])
    del order, wt, is_neg
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # the last pixel of each run of ties
    thresholds = s[last]
    fpr = np.concatenate([[0.0], fp[last] / n_neg])
    pro = np.concatenate([[0.0], np.minimum(pro[last], 1.0)])

    beyond = np.flatnonzero(fpr > max_fpr)
    if beyond.size:
        end = beyond[0] + 1
        fpr, pro, thresholds = fpr[:end], pro[:end], thresholds[:end - 1]
    return fpr, pro, thresholds


def aupro(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], max_fpr: float = 0.3) -> float | None:
    """Normalised area under the PRO curve from FPR 0 to max_fpr (Bergmann et al., IJCV 2021).

    masks: list of (H_i, W_i) bool (True = defect); maps: list of (H_i, W_i) float, same shape per pair.
    The curve is pro_curve's (exact: one point per distinct map value, flagged = map >= t), starting at
    (0, 0); it is integrated with the trapezoid rule, interpolated linearly at exactly FPR = max_fpr, and
    the area divided by max_fpr so that a perfect map scores 1.0. An image with an all-False mask
    contributes only normal pixels. None when there is no ground-truth region or no normal pixel.
    """
    curve = pro_curve(masks, maps, max_fpr)
    if curve is None:
        return None
    fpr, pro, _ = curve
    inside = fpr <= max_fpr
    x, y = fpr[inside], pro[inside]
    if x[-1] < max_fpr:  # the next point lies beyond max_fpr (the last point of a curve has FPR 1)
        x0, y0, x1, y1 = x[-1], y[-1], fpr[x.size], pro[x.size]
        x = np.append(x, max_fpr)
        y = np.append(y, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0))
    return float(_trapezoid(y, x) / max_fpr)
