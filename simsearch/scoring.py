"""Anomaly scores from nearest-neighbour distances (PatchCore), maps and regions: the one scoring chain.

    distances -> patch scores -> image score -> map          (`score_vectors`, `score_grid`)

A patch's score is its L2 distance to the nearest reference patch (mean over k neighbours when
k > 1); the image score is the mean of the highest patch scores, optionally discounted where the
nearest reference lies in a sparse part of the bank, and near the image's edges by the level good images
reach there (borders.py; the calibration learns it). The map interpolates patch scores to the
index's scale, smooths them with a Gaussian there, as PatchCore does, and resizes them to the
original. The engine, the eval runner and the bench scripts all score through `score_vectors` /
`score_grid`.

`bank` below is anything with VectorIndex's `search`, `ntotal`, `spread`, `typical_spread` and
`spread_neighbours` (simsearch/store/vectors.py). A bank with `two_stage` set (store/twostage.py) also has
`coarse_search`, whose distances are upper bounds of `search`'s, and `refine` (the full search, told stage 1's
answers): `two_stage_neighbours` then decides which patches need it, so that the image score is the one the full
search alone gives.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .borders import border_divisors
from .config import SearchConfig
from .tiling import grid_to_image


@dataclass(frozen=True)
class PatchScores:
    """One image's patches scored against a bank."""

    scores: np.ndarray  # (N,) float32 patch scores (L2 to the nearest reference, or the mean over k)
    nearest_ids: np.ndarray  # (N,) int64 id of each patch's nearest reference vector
    nearest_distances: np.ndarray  # (N,) float32 L2 distance to it
    image_score: float  # the mean of the top_k highest discounted patch scores
    refined: np.ndarray | None = None  # (N,) bool: searched in the whole bank (two-stage banks; None: all were)
    # The patches the image score was taken from (`score_candidates`): positions and sparse-discounted scores,
    # before any border divisor, so a calibration can take its score again once it has learned the borders.
    candidates: np.ndarray | None = None  # (n,) int64
    candidate_scores: np.ndarray | None = None  # (n,) float32


@dataclass(frozen=True)
class ScoredImage:
    """`PatchScores` laid out on the image's patch grid, with its anomaly map."""

    grid: object  # the PatchGrid the vectors came from (simsearch/features.py)
    scores: np.ndarray  # (Hc, Wc) float32
    nearest_ids: np.ndarray  # (Hc, Wc) int64
    nearest_distances: np.ndarray  # (Hc, Wc) float32
    score: float  # the image score
    anomaly_map: np.ndarray  # (H, W) float32 at the image's own resolution
    candidates: np.ndarray | None = None  # see PatchScores (positions in the grid, row-major)
    candidate_scores: np.ndarray | None = None


def score_vectors(bank, vectors: np.ndarray, search: SearchConfig, refine_above: float | None = None,
                  divisors: np.ndarray | None = None) -> PatchScores:
    """(N, D) float32 patch vectors of one image -> PatchScores against `bank`, with the search
    configuration's k neighbours, image top-k and sparse discount. `refine_above`: on a two-stage bank, patches
    whose stage-1 score exceeds it are searched fully too (the map near the pixel threshold). `divisors` (N,):
    each patch's border divisor for the image score (borders.border_divisors; None: none)."""
    refined = None
    if getattr(bank, "two_stage", False):
        distances, ids, refined = two_stage_neighbours(bank, vectors, search, refine_above, divisors)
    else:
        distances, ids = bank.search(vectors, search.k_neighbours)
    scores = patch_scores(distances)
    positions, values = score_candidates(scores, ids[:, 0], bank, search.image_top_k, search.sparse_discount)
    return PatchScores(scores, ids[:, 0].copy(), distances[:, 0].copy(),
                       candidates_score(positions, values, search.image_top_k, divisors), refined, positions, values)


TOP_MARGIN = 16  # stage 2's first round: image_top_k + this many patches by stage-1 score (docs/benchmarks.md)


def refine_candidates(upper: np.ndarray, refined: np.ndarray, level: float, floor: float | None,
                      divisors: np.ndarray | None = None) -> np.ndarray:
    """(N,) stage-1 patch scores (upper bounds of the full search's), (N,) bool already refined, the `image_top_k`-th
    highest discounted score among the refined, and an optional floor -> (N,) bool: the unrefined patches that can
    still matter. One whose upper bound is <= `level` cannot enter the image score's top k (its true score, and
    discounting only lowers it, is <= level); one above `floor` may shape the map near the pixel threshold.
    `divisors` (N,): the border divisors the image score applies (`level` is then of divided scores)."""
    u = np.asarray(upper, np.float32)
    need = (u if divisors is None else u / divisors) > level
    if floor is not None:
        need |= u > floor
    return need & ~np.asarray(refined, bool)


def two_stage_neighbours(bank, vectors: np.ndarray, search: SearchConfig, refine_above: float | None = None,
                         divisors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D) patch vectors of one image -> (N, k) distances, (N, k) ids and (N,) bool refined, from a two-stage bank.

    Stage 1 (`bank.coarse_search`) for every patch; stage 2 (`bank.refine`) for the image_top_k + TOP_MARGIN
    highest, then for every patch `refine_candidates` still names (with `refine_above` as its floor). With an exact
    stage 2 the image score equals the full search's (ties aside); unrefined patches keep their stage-1 distances
    (upper bounds) on the map.
    """
    k = search.k_neighbours
    d, ids = bank.coarse_search(vectors, k)
    upper = patch_scores(np.where(np.isfinite(d), d, np.float32(3.0e38)))
    refined = np.zeros(len(upper), bool)

    def refine(mask: np.ndarray) -> None:
        rows = np.flatnonzero(mask)
        if len(rows):
            d2, i2 = bank.refine(vectors[rows], d[rows], ids[rows], k)
            from .store.twostage import merge_neighbours  # faiss-free callers never get here
            d[rows], ids[rows] = merge_neighbours(d[rows], ids[rows], d2, i2, k)
            refined[rows] = True

    n = min(len(upper), search.image_top_k + TOP_MARGIN)
    first = np.zeros(len(upper), bool)
    first[np.argpartition(upper, len(upper) - n)[-n:]] = True
    refine(first)
    exact = patch_scores(d[refined])
    top = min(search.image_top_k, len(exact))
    if search.sparse_discount > 0 and bank.ntotal > bank.spread_neighbours:
        exact = discounted(exact, bank.spread(ids[refined, 0]), bank.typical_spread(), search.sparse_discount)
    if divisors is not None:
        exact = exact / divisors[refined]
    level = float(np.partition(exact, len(exact) - top)[-top]) if len(exact) >= search.image_top_k else -np.inf
    refine(refine_candidates(upper, refined, level, refine_above, divisors))
    return d, ids, refined


def anomaly_map(grid_scores: np.ndarray, layout, height: int, width: int, sigma: float) -> np.ndarray:
    """(Hc, Wc) patch scores on a tile layout -> (height, width) float32 map, Gaussian-smoothed with `sigma`
    pixels at the layout's (the index's) scale.

    The blur runs at that scale and the map is resized to the original after it: blurring a 7000 x 7000
    original with the same sigma in its own pixels (146) took 75 s, at the index scale it takes
    milliseconds. Both orders give the same map up to interpolation (blur and bilinear resize nearly
    commute on a map this smooth): tests/test_scoring.py bounds the difference at 0.5% of the map's range.
    """
    fine = smooth(grid_to_image(grid_scores, layout, layout.height, layout.width), sigma)
    if fine.shape != (height, width):
        fine = cv2.resize(fine, (width, height), interpolation=cv2.INTER_LINEAR)
    return fine


def score_grid(bank, grid, search: SearchConfig, refine_above: float | None = None,
               border_profile: list[float] | None = None) -> ScoredImage:
    """A PatchGrid (`features` (Hc, Wc, D), `layout`, `original_size`) -> ScoredImage (`refine_above`: see
    `score_vectors`; `border_profile`: a calibration's, borders.border_profile, applied to the image score with
    the configuration's border power; the map stays plain)."""
    hc, wc = grid.grid_shape
    divisors = border_divisors((hc, wc), border_profile, search.border_discount)
    scored = score_vectors(bank, grid.features.reshape(hc * wc, -1), search, refine_above, divisors)
    scores = scored.scores.reshape(hc, wc)
    height, width = grid.original_size
    return ScoredImage(grid=grid, scores=scores, nearest_ids=scored.nearest_ids.reshape(hc, wc),
                       nearest_distances=scored.nearest_distances.reshape(hc, wc), score=scored.image_score,
                       anomaly_map=anomaly_map(scores, grid.layout, height, width, search.blur_sigma),
                       candidates=scored.candidates, candidate_scores=scored.candidate_scores)


def patch_scores(distances: np.ndarray) -> np.ndarray:
    """(N, k) L2 distances to the k nearest reference patches -> (N,) patch scores."""
    d = np.asarray(distances, dtype=np.float32)
    if d.ndim != 2 or d.shape[1] < 1:
        raise ValueError(f"distances must be (N, k), got {d.shape}")
    return d.mean(axis=1) if d.shape[1] > 1 else d[:, 0].copy()


def image_score(scores: np.ndarray, top_k: int = 1) -> float:
    """Patch scores (any shape) -> the image's score: the mean of its `top_k` most anomalous patches.

    top_k = 1 is PatchCore's max; a few more make one noisy patch matter less than a defect's several.
    """
    flat = np.asarray(scores, dtype=np.float32).ravel()
    if flat.size == 0:
        raise ValueError("no patch scores")
    k = min(max(int(top_k), 1), flat.size)
    return float(np.max(flat)) if k == 1 else float(np.partition(flat, flat.size - k)[-k:].mean())


def discounted(scores: np.ndarray, spreads: np.ndarray, typical: float, power: float) -> np.ndarray:
    """(N,) patch scores and (N,) spreads of their nearest references -> (N,) float32 scores, each times
    (typical / max(spread, typical)) ** power.

    A match in a part of the bank sparser than `typical` (a rare but good look, met by chance) counts
    for less; matches where the bank is typical or denser keep their score. power 0 changes nothing.
    """
    s, sp = np.asarray(scores, np.float32), np.asarray(spreads, np.float32)
    if s.shape != sp.shape or s.ndim != 1:
        raise ValueError(f"scores and spreads must be (N,) alike, got {s.shape} and {sp.shape}")
    if typical <= 0 or power < 0:
        raise ValueError(f"need typical > 0 and power >= 0, got {typical} and {power}")
    return s * (typical / np.maximum(sp, typical)) ** power


def discount_candidates(patches: int, top_k: int) -> int:
    """How many of an image's `patches` highest plain scores the sparse discount looks at: 16 x top_k, at least
    256. With 64 the tire's image AUROC was 0.011 lower: heavily discounted patches (rare but good looks) pushed
    the true top 16 beyond them (docs/benchmarks.md, "Border levels")."""
    return min(patches, max(16 * top_k, 256))


def score_candidates(scores: np.ndarray, nearest_ids: np.ndarray, bank, top_k: int,
                     power: float) -> tuple[np.ndarray, np.ndarray]:
    """Patch scores (any shape) and the ids of their nearest references in `bank` (a VectorIndex) -> the
    patches an image score is taken from: (n,) int64 positions (in the flattened scores) and their (n,) float32
    `discounted` scores.

    Only the `discount_candidates` highest plain scores are looked up: discounting only lowers a score (so
    does a border divisor). With no discount (power 0, or too few references to tell sparse from dense) every
    patch is a candidate.
    """
    flat, ids = np.asarray(scores, np.float32).ravel(), np.asarray(nearest_ids, np.int64).ravel()
    if flat.shape != ids.shape:
        raise ValueError(f"scores and ids must match, got {flat.shape} and {ids.shape}")
    if flat.size == 0:
        raise ValueError("no patch scores")
    if power == 0 or bank.ntotal <= bank.spread_neighbours:
        return np.arange(flat.size, dtype=np.int64), flat
    n = discount_candidates(flat.size, top_k)
    top = np.argpartition(flat, flat.size - n)[-n:].astype(np.int64)
    return top, discounted(flat[top], bank.spread(ids[top]), bank.typical_spread(), power)


def candidates_score(positions: np.ndarray, values: np.ndarray, top_k: int, divisors: np.ndarray | None = None) -> float:
    """`score_candidates`' (n,) positions and (n,) scores, and optional border divisors of every patch
    ((N,), borders.border_divisors) -> the image score: the mean of the `top_k` highest (divided) scores."""
    v = np.asarray(values, np.float32)
    return image_score(v if divisors is None else v / divisors[np.asarray(positions, np.int64)], top_k)


def discounted_image_score(scores: np.ndarray, nearest_ids: np.ndarray, bank, top_k: int, power: float,
                           divisors: np.ndarray | None = None) -> float:
    """Patch scores (any shape) and the ids of their nearest references in `bank` (a VectorIndex) -> the mean
    of the `top_k` highest `discounted` patch scores (each divided by its border divisor, if given)."""
    return candidates_score(*score_candidates(scores, nearest_ids, bank, top_k, power), top_k, divisors)


def smooth(anomaly_map: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W) float32 -> Gaussian-smoothed (H, W) float32 (sigma in pixels; 0 = unchanged)."""
    if sigma <= 0:
        return anomaly_map.astype(np.float32, copy=False)
    ksize = 2 * int(4 * sigma + 0.5) + 1
    return cv2.GaussianBlur(anomaly_map.astype(np.float32, copy=False), (ksize, ksize), sigmaX=sigma, sigmaY=sigma,
                            borderType=cv2.BORDER_REFLECT)


@dataclass
class Region:
    x: int
    y: int
    w: int
    h: int
    area: int
    score: float  # the map's maximum inside the region
    peak: tuple[int, int]  # (x, y) of that maximum, original-image pixels


def find_regions(anomaly_map: np.ndarray, threshold: float, min_area: int) -> list[Region]:
    """Connected components (8-connected) of map > threshold with at least `min_area` pixels, by score."""
    mask = (anomaly_map > threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    regions = []
    for label in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < min_area:
            continue
        window = np.where(labels[y:y + h, x:x + w] == label, anomaly_map[y:y + h, x:x + w], -np.inf)
        py, px = np.unravel_index(int(np.argmax(window)), window.shape)
        regions.append(Region(x, y, w, h, area, float(window[py, px]), (x + int(px), y + int(py))))
    return sorted(regions, key=lambda r: -r.score)


def has_region(anomaly_map: np.ndarray, threshold: float, min_area: int) -> bool:
    mask = (anomaly_map > threshold).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return n > 1 and int(stats[1:, cv2.CC_STAT_AREA].max()) >= min_area


def region_level(anomaly_map: np.ndarray, min_area: int, iterations: int = 30) -> float:
    """The highest threshold t at which map > t still has a component of >= min_area pixels.

    An image shows a region at a pixel threshold exactly when this level exceeds it, so the
    levels of good images calibrate the pixel threshold. Bisection on t.
    """
    lo, hi = float(anomaly_map.min()), float(anomaly_map.max())
    if min_area <= 1:
        return hi  # any single pixel above t is a region
    if not has_region(anomaly_map, lo, min_area):
        return lo
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if has_region(anomaly_map, mid, min_area):
            lo = mid
        else:
            hi = mid
    return lo


def similarity_from_score(score: float, threshold: float | None) -> float | None:
    """Image similarity to the good parts in [0, 1]: 0.5 ** (score / threshold).

    1 = identical to a reference patch everywhere, 0.5 = exactly at the threshold, toward 0 far
    beyond it. None without a threshold: distances have no absolute scale of their own.
    """
    if threshold is None or threshold <= 0:
        return None
    return float(0.5 ** (max(score, 0.0) / threshold))
