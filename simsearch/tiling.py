"""Tile grid and stitching.

An image is brought to the index's scale, framed by a reflected context margin (so the backbone's
own zero padding, mid-grey after normalisation, falls outside the image instead of on its border
cells), padded by reflection up to a multiple of 32, and cut into overlapping tiles whose last one
sits flush with the padded edge.
The embedder turns each tile into a grid of patch vectors (one per `patch_stride` pixels);
the image's own patch grid takes every cell from the tile in which that cell is most central,
so tile borders (where the backbone sees padding) are used only at the image's own borders.
Nothing is centre-cropped: every pixel of the image lies in some cell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

ALIGN = 32  # backbones downsample by up to 32: tiles are multiples of it so feature grids align

_CV_INTERPOLATION = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def tile_starts(length: int, tile: int, stride: int) -> np.ndarray:
    """Start offsets of tiles of size `tile` every `stride` along `length` (>= tile); the last flush with the end."""
    if length < tile:
        raise ValueError(f"length {length} is shorter than the tile {tile}")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return np.asarray(starts, dtype=np.int64)


def owner_tiles(n_cells: int, cell: int, starts: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """For each cell along one axis: (index of the tile whose centre is nearest, cell index inside that tile).

    Shapes: starts (T,) -> two (n_cells,) int arrays.
    """
    centres = np.arange(n_cells) * cell + cell / 2.0
    tile_centres = starts + tile / 2.0
    owner = np.abs(centres[:, None] - tile_centres[None, :]).argmin(axis=1)
    local = np.arange(n_cells) - starts[owner] // cell
    assert (local >= 0).all() and (local < tile // cell).all()
    return owner, local


@dataclass(frozen=True)
class TileLayout:
    """Where the tiles of one (scaled) image lie and which tile owns each patch cell."""

    height: int  # scaled image, before padding
    width: int
    tile_h: int
    tile_w: int
    ys: np.ndarray  # (Ty,) tile top offsets in the padded image
    xs: np.ndarray  # (Tx,) tile left offsets
    cell: int  # patch stride in pixels
    margin: int = 0  # reflected context added on every side (a multiple of `cell`)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return int(self.ys[-1]) + self.tile_h, int(self.xs[-1]) + self.tile_w

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Cells covering the image itself (the last row/column may be partly padding)."""
        return math.ceil(self.height / self.cell), math.ceil(self.width / self.cell)

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    def tile_boxes(self) -> list[tuple[int, int, int, int]]:
        """(x, y, w, h) of each tile in scaled-image pixels, clipped to the image, row-major (index = iy * Tx + ix)."""
        boxes = []
        for y in self.ys - self.margin:
            for x in self.xs - self.margin:
                x0, y0 = max(int(x), 0), max(int(y), 0)
                x1, y1 = min(int(x) + self.tile_w, self.width), min(int(y) + self.tile_h, self.height)
                boxes.append((x0, y0, max(x1 - x0, 0), max(y1 - y0, 0)))
        return boxes

    def cell_owners(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per cell of the image grid: tile index, row and column inside that tile. Each (Hc, Wc)."""
        hc, wc = self.grid_shape
        ty, ly = owner_tiles(hc, self.cell, self.ys - self.margin, self.tile_h)
        tx, lx = owner_tiles(wc, self.cell, self.xs - self.margin, self.tile_w)
        tile_index = ty[:, None] * len(self.xs) + tx[None, :]
        return tile_index, np.broadcast_to(ly[:, None], (hc, wc)), np.broadcast_to(lx[None, :], (hc, wc))


def plan_tiles(height: int, width: int, tile: int, stride: int, cell: int, margin: int = 0) -> TileLayout:
    """Tiles for an image of (height, width) scaled pixels plus `margin` on every side.

    Small images get one smaller tile. Tile offsets are in the padded frame, whose origin lies
    `margin` pixels above and left of the image.
    """
    if margin % cell:
        raise ValueError(f"margin {margin} must be a multiple of the patch stride {cell}")
    padded_h, padded_w = round_up(height + 2 * margin, ALIGN), round_up(width + 2 * margin, ALIGN)
    tile_h, tile_w = min(tile, padded_h), min(tile, padded_w)
    return TileLayout(height, width, tile_h, tile_w, tile_starts(padded_h, tile_h, stride),
                      tile_starts(padded_w, tile_w, stride), cell, margin)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_to_scale(rgb: np.ndarray, scale: float, interpolation: str = "bicubic") -> np.ndarray:
    """(H, W, 3) uint8 -> (round(H*scale), round(W*scale), 3) uint8. Area averaging when shrinking."""
    h, w = rgb.shape[:2]
    sh, sw = scaled_size(h, w, scale)
    if (sh, sw) == (h, w):
        return rgb
    method = cv2.INTER_AREA if scale < 1 else _CV_INTERPOLATION.get(interpolation, cv2.INTER_LINEAR)
    return cv2.resize(rgb, (sw, sh), interpolation=method)


def cut_tiles(rgb: np.ndarray, layout: TileLayout) -> np.ndarray:
    """(H, W, C) scaled image -> (T, tile_h, tile_w, C) tiles, padding by reflection."""
    ph, pw = layout.padded_shape
    h, w = rgb.shape[:2]
    if (h, w) != (layout.height, layout.width):
        raise ValueError(f"image is {w}x{h}, layout expects {layout.width}x{layout.height}")
    m = layout.margin
    padded = np.pad(rgb, ((m, ph - h - m), (m, pw - w - m), (0, 0)), mode="symmetric")
    return np.stack([padded[y:y + layout.tile_h, x:x + layout.tile_w] for y in layout.ys for x in layout.xs])


def stitch_cells(tile_grids: np.ndarray, layout: TileLayout) -> np.ndarray:
    """(T, h, w, ...) per-tile cell grids -> (Hc, Wc, ...) image grid, each cell from its owner tile."""
    tile_index, rows, cols = layout.cell_owners()
    return tile_grids[tile_index, rows, cols]


def grid_to_image(grid: np.ndarray, layout: TileLayout, out_height: int, out_width: int) -> np.ndarray:
    """(Hc, Wc) float cell values -> (out_height, out_width) float32 map at the original resolution.

    Cells are interpolated bilinearly at their centres onto the scaled image, then resized to the
    original size (the scaled image may differ from it by the index's scale).
    """
    hc, wc = grid.shape
    fine = cv2.resize(grid.astype(np.float32), (wc * layout.cell, hc * layout.cell), interpolation=cv2.INTER_LINEAR)
    fine = fine[: layout.height, : layout.width]
    if fine.shape != (out_height, out_width):
        fine = cv2.resize(fine, (out_width, out_height), interpolation=cv2.INTER_LINEAR)
    return fine
