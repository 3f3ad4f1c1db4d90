"""Fine-tuning: a small projection head (simsearch/heads.py) on the frozen patch features, trained on a
product's good images.

Anchor and positive are the same good patch cell seen twice under nuisance changes (a shift of a few
pixels, brightness/contrast, blur, sensor noise): the head should map them close. Negatives are the cells
covered by a synthetic defect (simsearch/synthetic.py) pasted into a good crop, or by a real labelled
defect: the head should map them far from every good cell. Two losses: a triplet loss with batch-hard
negatives, or a normalised-softmax (NormFace-style) classification of good against defect cells.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BadInput, HeadError
from .headfile import HeadInfo
from .heads import ProjectionHead, save_head
from .synthetic import KINDS, random_defect

LOSSES = ("triplet", "softmax")


# -- augmentations and patch sampling -----------------------------------------------------------------
def nuisance(tiles: torch.Tensor, generator: torch.Generator, brightness: float = 0.08, contrast: float = 0.1,
             blur_sigma: float = 1.0, noise: float = 4.0) -> torch.Tensor:
    """Harmless changes a good part may show, per tile: (B, h, w, 3) uint8 -> (B, h, w, 3) uint8.

    Brightness shift up to +-`brightness` x 255, contrast x (1 +- `contrast`) around the tile mean,
    half of the tiles Gaussian-blurred with sigma up to `blur_sigma`, then Gaussian noise with a standard
    deviation up to `noise` grey levels. (Small shifts are made when the crops are cut: see `sample_batch`.)
    """
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != torch.uint8:
        raise ValueError(f"tiles must be (B, h, w, 3) uint8, got {tuple(tiles.shape)} {tiles.dtype}")
    b = tiles.shape[0]
    x = tiles.permute(0, 3, 1, 2).float()  # (B, 3, h, w)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, *shape, generator=generator)

    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(1 - contrast, 1 + contrast, 1, 1, 1) + mean + uniform(-brightness, brightness, 1, 1, 1) * 255
    blurred = []
    sigmas = uniform(0.2, blur_sigma)
    apply_blur = torch.rand(b, generator=generator) < 0.5
    for i in range(b):
        if not apply_blur[i]:
            blurred.append(x[i])
            continue
        radius = max(1, int(np.ceil(2 * float(sigmas[i]))))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (t / sigmas[i]) ** 2)
        k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
        img = F.pad(x[i:i + 1], (radius, radius, radius, radius), mode="reflect")
        img = F.conv2d(F.conv2d(img, k, groups=3), k.transpose(2, 3), groups=3)  # separable: rows, then columns
        blurred.append(img[0])
    x = torch.stack(blurred)
    x = x + torch.randn(x.shape, generator=generator) * uniform(0, noise, 1, 1, 1)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def cell_coverage(mask: np.ndarray, cell: int) -> np.ndarray:
    """(H, W) bool mask -> (H / cell, W / cell) float: the share of each patch cell that is defective."""
    h, w = mask.shape
    if h % cell or w % cell:
        raise ValueError(f"mask {mask.shape} is not a whole number of {cell} px cells")
    return mask.reshape(h // cell, cell, w // cell, cell).mean(axis=(1, 3))


@dataclass
class Batch:
    anchors: np.ndarray  # (B, c, c, 3) uint8: good crops
    positives: np.ndarray  # (B, c, c, 3) uint8: the same crops shifted by a few pixels
    defects: np.ndarray  # (B, c, c, 3) uint8: good crops with a defect in them
    negative_cells: np.ndarray  # (B, c / cell, c / cell) bool: cells of `defects` inside the defect
    kinds: list[str] = field(default_factory=list)  # the defect kind of each row ("real" for labelled ones)


def interior(cells: int, border: int) -> np.ndarray:
    """(cells, cells) bool: cells at least `border` cells from the crop's edge (away from its zero padding)."""
    keep = np.zeros((cells, cells), dtype=bool)
    keep[border:cells - border, border:cells - border] = True
    return keep


def sample_batch(goods: Sequence[np.ndarray], rng: np.random.Generator, *, batch: int, crop: int, cell: int,
                 max_shift: int, border: int, negative_coverage: float,
                 real_defects: Sequence[tuple[np.ndarray, np.ndarray]] = (), real_share: float = 0.5,
                 kinds: Sequence[str] = KINDS) -> Batch:
    """One training batch from good images (and real (image, mask) defects) already at the index's scale.

    Anchor and positive crops of each row are cut at offsets up to `max_shift` px apart (less than a
    cell, so cell (i, j) of one is cell (i, j) of the other). The defect crop's negative cells are the
    interior cells whose share of defective pixels is at least `negative_coverage`; a defect that covers
    none is drawn again.
    """
    n_cells = crop // cell
    keep = interior(n_cells, border)
    anchors, positives, defects, negatives, kinds_used = [], [], [], [], []
    for _ in range(batch):
        image = goods[int(rng.integers(0, len(goods)))]
        h, w = image.shape[:2]
        y = int(rng.integers(max_shift, h - crop - max_shift + 1))
        x = int(rng.integers(max_shift, w - crop - max_shift + 1))
        (ay, ax), (py, px) = rng.integers(-max_shift, max_shift + 1, size=(2, 2))
        anchors.append(image[y + ay:y + ay + crop, x + ax:x + ax + crop])
        positives.append(image[y + py:y + py + crop, x + px:x + px + crop])
        base = image[y:y + crop, x:x + crop]
        for _attempt in range(8):
            if real_defects and rng.random() < real_share:
                defect, mask = _real_defect_crop(real_defects, crop, rng)
                kind = "real"
            else:
                textures = [goods[int(rng.integers(0, len(goods)))]]
                defect, mask, kind = random_defect(base, textures, rng, kinds)
            cells = (cell_coverage(mask, cell) >= negative_coverage) & keep
            if cells.any():
                break
        defects.append(defect)
        negatives.append(cells)
        kinds_used.append(kind)
    return Batch(np.stack(anchors), np.stack(positives), np.stack(defects), np.stack(negatives), kinds_used)


def _real_defect_crop(real_defects: Sequence[tuple[np.ndarray, np.ndarray]], crop: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A crop of a labelled defective image that holds a defective pixel (at a random place in the crop)."""
    image, mask = real_defects[int(rng.integers(0, len(real_defects)))]
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    i = int(rng.integers(0, len(ys)))
    y = int(np.clip(ys[i] - rng.integers(0, crop), 0, h - crop))
    x = int(np.clip(xs[i] - rng.integers(0, crop), 0, w - crop))
    return image[y:y + crop, x:x + crop], mask[y:y + crop, x:x + crop]


# -- losses ---------------------------------------------------------------------------------------------
def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) L2 distances, with a gradient that stays finite at zero."""
    squared = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return torch.sqrt(squared.clamp_min(0) + 1e-12)


def triplet_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                 margin: float) -> torch.Tensor:
    """Batch-hard triplet loss on L2 distances (the index's metric).

    anchors, positives: (N, D), row i of both the same good cell; negatives: (M, D) defect cells.
    Per anchor: relu((d(a, p) - min_n d(a, n)) / s + margin), averaged; s is the mean distance between
    different anchors (good cell to good cell), which makes the loss blind to a uniform rescaling of the
    space (otherwise inflating every vector would satisfy any margin).
    """
    if anchors.shape != positives.shape or anchors.ndim != 2 or negatives.ndim != 2 \
            or negatives.shape[1] != anchors.shape[1] or len(anchors) < 2 or len(negatives) < 1:
        raise ValueError(f"need (N >= 2, D) anchors and positives and (M >= 1, D) negatives, got "
                         f"{tuple(anchors.shape)}, {tuple(positives.shape)}, {tuple(negatives.shape)}")
    d_pos = torch.sqrt(((anchors - positives) ** 2).sum(1) + 1e-12)
    d_neg = _distances(anchors, negatives).min(dim=1).values
    # Paired half the batch apart, so not with a neighbouring cell of the same crop.
    scale = torch.sqrt(((anchors - anchors.roll(len(anchors) // 2, dims=0)) ** 2).sum(1) + 1e-12).mean()
    return F.relu((d_pos - d_neg) / scale + margin).mean()


def softmax_loss(good: torch.Tensor, defect: torch.Tensor, class_weights: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Normalised-softmax (NormFace) classification of good (N, D) against defect (M, D) cells.

    Logits are `temperature` x the cosine between each vector and the two class weights (2, D); the
    cross-entropy is averaged per class, then over the two classes, so the few defect cells count as
    much as the many good ones.
    """
    if good.ndim != 2 or defect.ndim != 2 or class_weights.shape != (2, good.shape[1]) \
            or defect.shape[1] != good.shape[1] or not len(good) or not len(defect):
        raise ValueError(f"need (N, D) good, (M, D) defect and (2, D) class weights, got {tuple(good.shape)}, "
                         f"{tuple(defect.shape)}, {tuple(class_weights.shape)}")
    w = F.normalize(class_weights, dim=1)
    good_logits = temperature * F.normalize(good, dim=1) @ w.T
    defect_logits = temperature * F.normalize(defect, dim=1) @ w.T
    return 0.5 * (F.cross_entropy(good_logits, torch.zeros(len(good), dtype=torch.long))
                  + F.cross_entropy(defect_logits, torch.ones(len(defect), dtype=torch.long)))


# -- training ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneSettings:
    loss: str = "triplet"
    steps: int = 200
    batch: int = 8  # crops per step (each gives an anchor, a positive and a defect crop)
    crop: int = 128  # crop side in pixels at the index's scale
    max_shift: int = 3  # px between anchor and positive crops (under half a cell)
    lr: float = 1e-3
    margin: float = 0.5  # triplet margin, in units of the typical good-to-good distance
    temperature: float = 16.0  # softmax: scale of the cosine logits
    hidden: int | None = None  # head width; None: the feature dimension
    anchors_per_step: int = 512  # good cells drawn from the batch's anchor crops
    negative_coverage: float = 0.1  # a cell is a negative from this share of defective pixels
    border: int = 2  # cells this close to a crop's edge are left out (the index never uses them either)
    real_share: float = 0.5  # with real defects given: the share of defect crops taken from them
    kinds: tuple[str, ...] = KINDS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise BadInput(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.steps < 1 or self.batch < 1 or self.anchors_per_step < 2:
            raise BadInput("steps and batch must be >= 1, anchors per step >= 2")
        if self.crop < 64 or self.crop % 32:
            raise BadInput(f"crop must be a multiple of 32 and >= 64, got {self.crop}")
        if not 0 <= self.max_shift < 4:
            raise BadInput(f"max shift must be in [0, 4) px (under half a patch cell), got {self.max_shift}")
        if self.lr <= 0 or self.margin < 0 or self.temperature <= 0:
            raise BadInput("lr and temperature must be > 0, margin >= 0")
        if not 0 < self.negative_coverage <= 1 or not 0 <= self.real_share <= 1:
            raise BadInput("negative coverage must be in (0, 1], real share in [0, 1]")
        if set(self.kinds) - set(KINDS) or not self.kinds:
            raise BadInput(f"defect kinds must be some of {KINDS}, got {self.kinds}")


FeatureFn = Callable[[np.ndarray], torch.Tensor]  # (B, h, w, 3) uint8 -> (B, h/cell, w/cell, D) float32
StepProgress = Callable[[int, int, float], None]  # (steps done, steps, loss)


@dataclass
class TrainedHead:
    head: ProjectionHead
    losses: list[float]  # one per step
    seconds: float
    settings: FinetuneSettings
    kinds_seen: dict[str, int]  # defect crops per kind


def train_head(goods: Sequence[np.ndarray], features: FeatureFn, dim: int, cell: int, settings: FinetuneSettings,
               real_defects: Sequence[tuple[np.ndarray, np.ndarray]] = (),
               progress: StepProgress | None = None) -> TrainedHead:
    """Train a projection head. `goods`: (H, W, 3) uint8 good images at the index's scale; `features`:
    the frozen embedder on crops; `dim`: its vector size; `cell`: its patch stride. The same inputs
    and seed give the same head, bit for bit (on one machine with the same thread count)."""
    s = settings
    crop = min(s.crop, *(min(g.shape[:2]) - 2 * s.max_shift for g in goods)) // 32 * 32
    if crop < 64:
        raise BadInput(f"the images are too small to fine-tune on ({min(min(g.shape[:2]) for g in goods)} px at "
                         "the index's scale; need 64 px plus the shift)")
    if real_defects and min(min(m.shape) for _, m in real_defects) < crop:
        raise BadInput(f"the defective images are smaller than the {crop} px training crop")
    start = time.perf_counter()
    rng = np.random.default_rng(s.seed)
    generator = torch.Generator().manual_seed(s.seed)
    head = ProjectionHead(dim, s.hidden or dim, generator)
    params = list(head.parameters())
    class_weights = None
    if s.loss == "softmax":
        class_weights = torch.nn.Parameter(torch.randn(2, dim, generator=generator))
        params.append(class_weights)  # not saved: only the head embeds
    optimiser = torch.optim.Adam(params, lr=s.lr)
    keep = interior(crop // cell, s.border)
    losses: list[float] = []
    kinds_seen: dict[str, int] = {}
    for step in range(s.steps):
        batch = sample_batch(goods, rng, batch=s.batch, crop=crop, cell=cell, max_shift=s.max_shift, border=s.border,
                             negative_coverage=s.negative_coverage, real_defects=real_defects,
                             real_share=s.real_share, kinds=s.kinds)
        for kind in batch.kinds:
            kinds_seen[kind] = kinds_seen.get(kind, 0) + 1
        views = nuisance(torch.from_numpy(np.concatenate([batch.anchors, batch.positives, batch.defects])), generator)
        with torch.no_grad():
            feats = features(views.numpy())  # (3B, c/cell, c/cell, D)
        b = s.batch
        if feats.shape != (3 * b, crop // cell, crop // cell, dim):
            raise ValueError(f"features of {tuple(feats.shape)} for {3 * b} crops of {crop} px; expected cells of "
                             f"{cell} px and {dim} dims")
        anchor_cells = np.flatnonzero(np.broadcast_to(keep, (b, *keep.shape)).ravel())
        chosen = torch.from_numpy(np.sort(rng.choice(anchor_cells, min(s.anchors_per_step, len(anchor_cells)),
                                                     replace=False)))
        anchors = head(feats[:b].reshape(-1, dim)[chosen])
        positives = head(feats[b:2 * b].reshape(-1, dim)[chosen])
        negatives = head(feats[2 * b:][torch.from_numpy(batch.negative_cells)])
        if len(negatives):
            if s.loss == "triplet":
                loss = triplet_loss(anchors, positives, negatives, s.margin)
            else:
                loss = softmax_loss(torch.cat([anchors, positives]), negatives, class_weights, s.temperature)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        else:  # every defect of this batch hid in the border: nothing to push away, no step
            losses.append(losses[-1] if losses else float("nan"))
        if progress:
            progress(step + 1, s.steps, losses[-1])
    return TrainedHead(head.eval(), losses, time.perf_counter() - start, s, kinds_seen)


# -- from image files to a head file -----------------------------------------------------------------------
def find_mask(image: str | os.PathLike) -> Path | None:
    """The defect mask of a labelled image: MVTec's `<cat>/ground_truth/<defect>/<stem>_mask.png` for
    `<cat>/test/<defect>/<name>`, or `<stem>_mask.png` beside the image."""
    from .mvtec import mvtec_mask_path

    image = Path(image)
    for candidate in (mvtec_mask_path(image), image.with_name(f"{image.stem}_mask.png")):
        if candidate.is_file():
            return candidate
    return None


def finetune_files(goods: Sequence[str], out: str | os.PathLike, *, defects: Sequence[str] = (),
                   settings: FinetuneSettings = FinetuneSettings(), backbone: str | None = None,
                   weights: str | None = None, progress: StepProgress | None = None,
                   **embedder_settings) -> tuple[HeadInfo, TrainedHead]:
    """Train a head on good image files (and labelled defective ones) and save it to `out`.

    The base embedder is the one `index add` would create with the same options (`backbone`, `weights`,
    `embedder_settings` such as short_side or scale); images are brought to its scale first. Every input
    is checked before training starts, and `out` is only written, whole, once training has finished.
    """
    import cv2

    from .embedders import base_embedder
    from .features import Embedder
    from .images import expand_paths, load_image
    from .tiling import resize_to_scale

    out = Path(out)
    if out.suffix != ".safetensors":
        raise HeadError(f"{out}: the output must be a .safetensors file")
    if not out.parent.is_dir():
        raise HeadError(f"{out.parent}: no such folder for the output")
    good_files, _ = expand_paths(list(goods))
    if not good_files:
        raise HeadError(f"no good images in {', '.join(map(str, goods))}")
    defect_files = expand_paths(list(defects))[0] if defects else []
    if defects and not defect_files:
        raise HeadError(f"no defective images in {', '.join(map(str, defects))}")
    masks = {path: find_mask(path) for path in defect_files}
    unlabelled = [p for p, m in masks.items() if m is None]
    if unlabelled:
        raise HeadError(f"{len(unlabelled)} defective images have no mask (e.g. {unlabelled[0]}); expected "
                        "<cat>/ground_truth/<defect>/<stem>_mask.png or <stem>_mask.png beside the image")
    config, net, _ = base_embedder(backbone, weights, **embedder_settings)

    def scaled(rgb: np.ndarray) -> np.ndarray:
        return resize_to_scale(rgb, config.scale_for(*rgb.shape[:2]), config.interpolation)

    good_images = [scaled(load_image(p).rgb) for p in good_files]
    real = []
    for path, mask_path in masks.items():
        rgb = load_image(path).rgb
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if mask is None or mask.shape != rgb.shape[:2]:
            raise HeadError(f"{mask_path}: unreadable, or not the size of {path}")
        image = scaled(rgb)
        mask = cv2.resize(mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
        if mask.any():  # a "defective" image with an empty mask teaches nothing about where
            real.append((image, mask))
    embedder = Embedder(config, net)
    features = lambda tiles: torch.from_numpy(embedder.embed_tiles(tiles))  # noqa: E731 - train_head takes tensors
    trained = train_head(good_images, features, config.feature_dim, config.patch_stride, settings, real, progress)
    training = {**asdict(settings), "kinds": list(settings.kinds), "images": len(good_images),
                "real_defect_images": len(real), "final_loss": trained.losses[-1] if trained.losses else None}
    info = save_head(out, trained.head, config, config.weights, training)
    return info, trained
