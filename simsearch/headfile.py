"""Fine-tuned head files read without torch: their metadata (what kind of file, the base embedder it was
trained on) and the check that a head fits an index. The head model and its tensors are in heads.py."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .config import IndexConfig
from .errors import HeadError

HEAD_KIND = "projection-head"
HEAD_FORMAT = "1"
# The configuration fields that decide what a head's input vectors are: a head is only valid on an index
# whose values of these match the ones it was trained with.
HEAD_BASE_FIELDS = ("backbone", "weights_sha256", "mean", "std", "interpolation", "short_side", "scale", "layers",
                    "patch_stride", "neighbourhood", "dims", "pipeline_version")


def base_fields(config: IndexConfig) -> dict:
    """The HEAD_BASE_FIELDS of a configuration, as JSON values."""
    d = config.to_dict()
    return {k: d[k] for k in HEAD_BASE_FIELDS}


@dataclass(frozen=True)
class HeadInfo:
    """What a head file says about itself."""

    sha256: str  # of its tensors
    in_dim: int
    hidden: int
    base: dict  # HEAD_BASE_FIELDS of the embedder it was trained on
    base_weights: str  # "embedded", "hub" or "file": where the base weights came from
    base_fingerprint: str
    training: dict


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """A safetensors file's metadata, or None if the file is not safetensors."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - safetensors raises its own types for a damaged header
        return None


def is_head_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a simsearch projection head (rather than backbone weights)."""
    metadata = read_metadata(path)
    return metadata is not None and metadata.get("simsearch_kind") == HEAD_KIND


def read_head_info(path: str | os.PathLike) -> HeadInfo:
    metadata = read_metadata(path)
    if metadata is None or metadata.get("simsearch_kind") != HEAD_KIND:
        raise HeadError(f"{path}: not a simsearch projection head (no simsearch_kind={HEAD_KIND} in its metadata)")
    if metadata.get("format") != HEAD_FORMAT:
        raise HeadError(f"{path}: head format {metadata.get('format')!r}; this simsearch reads {HEAD_FORMAT}")
    try:
        return HeadInfo(sha256=metadata["sha256"], in_dim=int(metadata["in_dim"]), hidden=int(metadata["hidden"]),
                        base=json.loads(metadata["base_config"]), base_weights=metadata["base_weights"],
                        base_fingerprint=metadata["base_fingerprint"], training=json.loads(metadata["training"]))
    except (KeyError, ValueError) as exc:
        raise HeadError(f"{path}: damaged head metadata ({exc})") from None


def check_base(info: HeadInfo, config: IndexConfig, what: str = "the index") -> None:
    """Refuse a head trained on another embedder than `config`'s (backbone, weights, layers, scale...)."""
    ours = base_fields(config)
    differences = [f"{k} {info.base.get(k)!r} (head) vs {ours[k]!r} ({what})" for k in HEAD_BASE_FIELDS
                   if info.base.get(k) != ours[k]]
    if differences:
        raise HeadError("the head was fine-tuned on another embedder than " + what + "'s: "
                        + "; ".join(d.replace("weights_sha256 ", "weights hash ") for d in differences))
