"""The one heatmap overlay: `simsearch query --heatmap-dir`, the eval report and the server's dashboard all draw
their pictures with `heatmap_overlay`.

A good part should look like itself: the map is transparent below the ramp's floor (FLOOR x the pixel threshold),
so only areas on their way to a region get colour, and the colour says how far: violet at the floor, magenta at
the pixel threshold, red at TOP x it and beyond. The scale is absolute (fixed by the threshold), so two
overlays compare. Without a threshold (an uncalibrated index, a baseline) the map's own upper half is ramped.
"""
from __future__ import annotations

import cv2
import numpy as np

FLOOR = 0.8  # the ramp starts at FLOOR * pixel threshold (the threshold's lower range: on PIPED 2.5% of a good
TOP = 1.5  # image's pixels lie above it, 98% of the defect pixels) and saturates at TOP * pixel threshold
BOX_BGR = (255, 255, 0)  # cyan: stands out against the violet-red ramp and most parts
TRUTH_BGR = (0, 230, 0)  # the ground-truth contour in the eval report
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def ramp_range(anomaly_map: np.ndarray, pixel_threshold: float | None) -> tuple[float, float]:
    """(floor, top) of the colour ramp: map values at or below floor stay transparent, top and above saturate."""
    if pixel_threshold is not None and pixel_threshold > 0:
        return FLOOR * pixel_threshold, TOP * pixel_threshold
    lo, hi = float(anomaly_map.min()), float(anomaly_map.max())
    return lo + 0.5 * (hi - lo), max(hi, lo + 1e-12)


def ramp_colours(level: np.ndarray) -> np.ndarray:
    """(...) levels in [0, 1] -> (..., 3) uint8 BGR, a hue sweep few parts share: violet at the floor (0),
    magenta at the pixel threshold, red at the top (1). (Green stays 0: the ground-truth contour's colour.)"""
    level = np.clip(np.asarray(level, np.float32), 0.0, 1.0)
    at = (1.0 - FLOOR) / (TOP - FLOOR)  # where the threshold sits on the ramp
    red = np.where(level <= at, 128 + 127 * level / at, 255.0)
    blue = np.where(level <= at, 255.0, 255 * (1 - (level - at) / (1 - at)))
    return np.stack([blue, np.zeros_like(level), red], -1).round().astype(np.uint8)


def _text_scale(width: int) -> tuple[float, int]:
    """(font scale, line height px) readable on an image `width` px wide, from 128 px parts to large ones."""
    scale = float(np.clip(width / 400.0, 0.33, 0.9))
    return scale, int(round(26 * scale)) + 5


def _put_fitting(strip: np.ndarray, variants: list[str], org: tuple[int, int], scale: float, right: bool = False,
                 colour=(255, 255, 255)) -> None:
    """Write the first of `variants` (longest first) that fits the strip's width, left- or right-aligned."""
    width = strip.shape[1] - 6
    for text in variants:
        (tw, _), _ = cv2.getTextSize(text, _FONT, scale, 1)
        if tw <= width or text is variants[-1]:
            x = max(3, strip.shape[1] - 3 - tw) if right else org[0]
            cv2.putText(strip, text, (x, org[1]), _FONT, scale, colour, 1, cv2.LINE_AA)
            return


def _legend(width: int, floor: float, top: float, pixel_threshold: float | None,
            score: float | None, image_threshold: float | None) -> np.ndarray:
    """A strip under the image: the score against its threshold, and the colour bar from the floor to the top
    with the pixel threshold marked."""
    scale, line = _text_scale(width)
    bar_h = max(5, line // 2)
    strip = np.full((2 * line + bar_h + 2, width, 3), 32, np.uint8)
    if score is not None:
        if image_threshold is None:
            variants = [f"score {score:.4g} (uncalibrated)", f"score {score:.4g}"]
        else:
            sign = ">" if score > image_threshold else "<="
            variants = [f"score {score:.4g} {sign} threshold {image_threshold:.4g}",
                        f"score {score:.4g} {sign} thr {image_threshold:.4g}", f"{score:.4g} {sign} thr {image_threshold:.4g}"]
        _put_fitting(strip, variants, (3, line - 5), scale,
                     colour=(120, 120, 255) if image_threshold is not None and score > image_threshold else (255,) * 3)
    x0, x1 = 3, width - 3
    strip[line:line + bar_h, x0:x1] = ramp_colours(np.tile(np.linspace(0.0, 1.0, max(1, x1 - x0))[None, :], (bar_h, 1)))
    low = line + bar_h + line - 5
    if pixel_threshold is not None and top > floor:
        tick = x0 + int(round((pixel_threshold - floor) / (top - floor) * (x1 - x0 - 1)))
        cv2.line(strip, (tick, line - 3), (tick, line + bar_h + 2), (255, 255, 255), 1)
        _put_fitting(strip, [f"{floor:.4g}"], (x0, low), scale, colour=(210, 210, 210))
        _put_fitting(strip, [f"pixel thr {pixel_threshold:.4g}", f"px thr {pixel_threshold:.4g}"], (0, low), scale,
                     right=True, colour=(210, 210, 210))
    else:
        _put_fitting(strip, ["no pixel threshold: the map's own range", "map's own range"], (x0, low), scale,
                     colour=(210, 210, 210))
    return strip


def heatmap_overlay(rgb: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float | None,
                    regions: list | None = None, *, score: float | None = None,
                    image_threshold: float | None = None, truth: np.ndarray | None = None,
                    legend: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 RGB image + (H, W) float map -> BGR overlay for cv2.imwrite, at the image's own resolution.

    Pixels whose map value is at or below the ramp's floor are the image unchanged; above it they blend in the
    ramp's colour, more opaque the higher they are. `regions` (anything with x, y, w, h: the flagged regions,
    best first) are boxed and numbered 1, 2, ... as in the JSON record. `truth`: an (H, W) bool ground-truth mask
    whose contour is drawn. `legend` adds a strip below the image (width W, so the result is (H + strip, W, 3)):
    the image score against `image_threshold`, and the colour bar with the pixel threshold marked.
    """
    h, w = anomaly_map.shape
    if rgb.shape[:2] != (h, w):
        raise ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]}, map is {w}x{h}")
    floor, top = ramp_range(anomaly_map, pixel_threshold)
    out = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    tinted = anomaly_map > floor  # usually a small part: only those pixels are blended (cheap on large images)
    level = (anomaly_map[tinted].astype(np.float32) - floor) / np.float32(top - floor)
    alpha = (0.3 + 0.5 * np.clip(level, 0.0, 1.0))[:, None]
    colour = ramp_colours(level).astype(np.float32)
    out[tinted] = (out[tinted].astype(np.float32) * (1.0 - alpha) + colour * alpha).round().astype(np.uint8)
    thick = max(1, int(round(min(h, w) / 400)))
    if truth is not None and truth.any():
        contours, _ = cv2.findContours(truth.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, TRUTH_BGR, thick, cv2.LINE_8)
    scale, line = _text_scale(w)
    for number, r in enumerate(regions or [], 1):
        cv2.rectangle(out, (r.x, r.y), (r.x + r.w - 1, r.y + r.h - 1), BOX_BGR, thick)
        label = str(number)
        (tw, th), _ = cv2.getTextSize(label, _FONT, scale, 1)
        ty = r.y - 2 if r.y - th - 2 >= 0 else min(h - 1, r.y + r.h + th + 1)  # above the box, else below
        tx = min(max(0, r.x), w - tw)
        cv2.putText(out, label, (tx, ty), _FONT, scale, (0, 0, 0), 2 * thick + 1, cv2.LINE_AA)
        cv2.putText(out, label, (tx, ty), _FONT, scale, BOX_BGR, thick, cv2.LINE_AA)
    if legend:
        out = np.vstack([out, _legend(w, floor, top, pixel_threshold, score, image_threshold)])
    return out
