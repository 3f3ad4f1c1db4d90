"""Patch vectors from tiles, whatever computes them: image -> tiles -> one vector per patch cell.

`TileEmbedder` applies one index configuration (scale, tiling, stitching, batching across images) and leaves
the network's forward pass, `_forward`, to its subclasses: the torch one (simsearch/features.py) and the ONNX
Runtime one (simsearch/onnx_embedder.py), so both see exactly the same tiles. This module needs no torch.
`TileEmbedder.embed_many` runs the network on batches of tiles taken across consecutive images (a
magnetic-tile image has about six tiles: alone it would leave the batch short), and yields each image's grid
as soon as it is complete.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from .config import IndexConfig
from .images import Image
from .tiling import TileLayout, cut_tiles, plan_tiles, resize_to_scale, stitch_cells

# Pixels per backbone call. On the 2-core CPU a 256 px tile cost about 30 ms in batches of 2, 37 ms
# alone or in fours and 52-55 ms in batches of 8-16 (activations outgrow the caches); 192 px tiles were
# fastest in fours (docs/benchmarks.md). So: 2 tiles of 256 px, 3 of 192 px, 8 of 128 px per call.
BATCH_PIXELS = 2 * 256 * 256
MAX_WAITING = 16  # images whose tiles may wait for a batch to fill


def tiles_per_batch(height: int, width: int, batch_pixels: int = BATCH_PIXELS) -> int:
    """How many (height, width) tiles go into one backbone call."""
    return max(1, batch_pixels // max(1, height * width))


@dataclass
class PatchGrid:
    """One image's patch vectors and where they came from."""

    features: np.ndarray  # (Hc, Wc, D) float32
    tile_index: np.ndarray  # (Hc, Wc) int: the tile each cell was taken from
    layout: TileLayout
    original_size: tuple[int, int]  # (H, W) of the image as given

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.features.shape[0], self.features.shape[1]

    def cell_boxes(self) -> np.ndarray:
        """(Hc, Wc, 4) int boxes (x, y, w, h) of each cell in original-image pixels."""
        hc, wc = self.grid_shape
        h0, w0 = self.original_size
        sy, sx = self.layout.height / h0, self.layout.width / w0
        c = self.layout.cell
        ys = np.arange(hc) * c
        xs = np.arange(wc) * c
        y0 = np.floor(ys / sy).astype(int)
        x0 = np.floor(xs / sx).astype(int)
        y1 = np.minimum(np.ceil(np.minimum(ys + c, self.layout.height) / sy).astype(int), h0)
        x1 = np.minimum(np.ceil(np.minimum(xs + c, self.layout.width) / sx).astype(int), w0)
        boxes = np.zeros((hc, wc, 4), dtype=np.int64)
        boxes[..., 0] = x0[None, :]
        boxes[..., 1] = y0[:, None]
        boxes[..., 2] = (x1 - x0)[None, :]
        boxes[..., 3] = (y1 - y0)[:, None]
        return boxes


@dataclass
class _Pending:
    """An image whose tiles are (partly) waiting for the backbone."""

    image: Image
    layout: TileLayout
    tiles: np.ndarray  # (T, h, w, 3) uint8
    feats: list = field(default_factory=list)  # per tile: (h/stride, w/stride, D) float32, None until run
    done: int = 0


class TileEmbedder:
    """Applies one index configuration: image(s) -> PatchGrid(s). Subclasses give `_forward` and `dim`."""

    config: IndexConfig
    runtime = "none"  # what runs the network: "torch" or "onnxruntime"

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """(B, h, w, 3) uint8 RGB tiles of one shape -> (B, h/stride, w/stride, D) float32, one network call."""
        raise NotImplementedError

    def embed_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """(T, h, w, 3) uint8 RGB tiles -> (T, h/stride, w/stride, D) float32 patch vectors."""
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise ValueError(f"tiles must be (T, h, w, 3) uint8, got {tiles.shape} {tiles.dtype}")
        step = tiles_per_batch(tiles.shape[1], tiles.shape[2])
        return np.concatenate([self._forward(tiles[start:start + step]) for start in range(0, len(tiles), step)])

    def tiles_of(self, image: Image) -> tuple[np.ndarray, TileLayout]:
        """The image at the index's scale, cut into (T, h, w, 3) uint8 tiles, and their layout."""
        rgb = resize_to_scale(image.rgb, self.config.scale_for(image.height, image.width), self.config.interpolation)
        layout = plan_tiles(rgb.shape[0], rgb.shape[1], self.config.tile_size, self.config.tile_stride,
                            self.config.patch_stride, self.config.context_margin)
        return cut_tiles(rgb, layout), layout

    def _grid(self, layout: TileLayout, tile_feats: np.ndarray, image: Image) -> PatchGrid:
        tile_index, _, _ = layout.cell_owners()
        return PatchGrid(features=np.ascontiguousarray(stitch_cells(tile_feats, layout)),
                         tile_index=np.ascontiguousarray(tile_index), layout=layout,
                         original_size=(image.height, image.width))

    def embed(self, image: Image) -> PatchGrid:
        tiles, layout = self.tiles_of(image)
        return self._grid(layout, self.embed_tiles(tiles), image)

    def embed_many(self, images: Iterable[Image], batch_pixels: int = BATCH_PIXELS) -> Iterator[PatchGrid]:
        """Images -> their PatchGrids, in the same order, with the backbone run on batches of tiles
        (`tiles_per_batch` of them for their size) taken across consecutive images.

        Tiles wait per shape (a small image has smaller tiles) until a batch of that shape is full;
        a grid is yielded once all its tiles have run. At most `MAX_WAITING` images wait at once (then
        every waiting batch runs, full or not), so memory stays that of a few images. Each tile's
        vectors are the ones `embed` gives, up to float rounding (the batch differs). Small images
        gain most: a one-tile image alone would leave the batch short.
        """
        if batch_pixels < 1:
            raise ValueError(f"batch_pixels must be >= 1, got {batch_pixels}")
        pending: deque[_Pending] = deque()
        waiting: dict[tuple[int, int], list[tuple[_Pending, int]]] = {}

        def run(shape: tuple[int, int]) -> None:
            items = waiting.pop(shape)
            feats = self._forward(np.stack([entry.tiles[i] for entry, i in items]))
            for (entry, i), f in zip(items, feats):
                entry.feats[i] = f
                entry.done += 1

        def finished() -> Iterator[PatchGrid]:
            while pending and pending[0].done == len(pending[0].tiles):
                entry = pending.popleft()
                yield self._grid(entry.layout, np.stack(entry.feats), entry.image)

        for image in images:
            tiles, layout = self.tiles_of(image)
            entry = _Pending(image, layout, tiles, [None] * len(tiles))
            pending.append(entry)
            shape = (int(tiles.shape[1]), int(tiles.shape[2]))
            for i in range(len(tiles)):
                waiting.setdefault(shape, []).append((entry, i))
                if len(waiting[shape]) >= tiles_per_batch(*shape, batch_pixels):
                    run(shape)
            if len(pending) > MAX_WAITING:  # a rare tile shape must not hold back every image behind it
                for key in list(waiting):
                    run(key)
            yield from finished()
        for key in list(waiting):
            run(key)
        yield from finished()
